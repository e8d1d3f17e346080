"""Jobs chained with --then run in order in one session; a wrong step runs nothing, a failing one keeps what the steps
before it committed and runs none after it."""

from __future__ import annotations

import numpy as np
from conftest import run_job, write_embeddings


def test_a_wrong_step_is_found_before_anything_runs(spark, tmp_path, capsys):
    write_embeddings(spark, tmp_path / "emb", np.eye(4, 8, dtype=np.float32))
    code = run_job(
        spark, "index", "--embeddings", tmp_path / "emb", "--output", tmp_path / "index",
        "--then", "search", "--index", tmp_path / "index", "--all", "--bogus", "1",
    )  # fmt: skip
    assert code == 2 and not (tmp_path / "index").exists()
    assert "step 2 of 2 (search) is wrong: nothing was run" in capsys.readouterr().err


def test_a_failing_step_keeps_the_ones_before_and_runs_none_after(spark, tmp_path, capsys):
    rng = np.random.default_rng(3)
    write_embeddings(spark, tmp_path / "emb", rng.standard_normal((60, 8)).astype(np.float32))
    index, graph = tmp_path / "index", tmp_path / "graph"
    chain = [
        *("index", "--embeddings", tmp_path / "emb", "--output", index),
        *("--then", "search", "--index", index, "--all", "-k", "3", "--output", graph),
        *("--then", "search", "--index", tmp_path / "nowhere", "--all", "--output", tmp_path / "lost"),
        *("--then", "evaluate", "--index", index, "--output", tmp_path / "evaluation.json"),
    ]
    assert run_job(spark, *chain) == 2
    err = capsys.readouterr().err
    assert "step 3 of 4 (search) failed; the 2 before it are done, the 1 after it were not run" in err
    assert spark.read.parquet(str(graph)).count() == 60 * 3  # the second step's answers, on the first's index
    assert not (tmp_path / "evaluation.json").exists() and not (tmp_path / "lost").exists()

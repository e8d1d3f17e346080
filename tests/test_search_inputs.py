"""Bad indexes, catalogs and queries: one line on stderr and exit code 2, nothing written."""

from __future__ import annotations

import json

import pytest
from conftest import force_plan, run_job, write_embeddings

from jobs.embed import EMBEDDINGS_SCHEMA


def test_an_index_from_an_older_version_says_rebuild(spark, catalog, tmp_path, capsys):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "index.json").write_text(json.dumps({"model": "resnet18", "dim": 64, "count": 3, "params": {}}))
    capsys.readouterr()
    assert run_job(spark, "search", "--index", tmp_path / "old", "--query-ids", "x", "--output", tmp_path / "nb") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "older version" in err[0] and "rebuild" in err[0]


@pytest.mark.parametrize(
    "case",
    [
        "missing columns",
        "mixed dims",
        "empty catalog",
        "unknown ids",
        "other model",
        "other weights",
        "mixed weights",
        "not an index",
        "no lsh keys",
        "queries mixing weights",
        "queries of another length",
        "queries of another length, exact",
        "queries of another length, routed",
    ],
)
def test_malformed_inputs_exit_2(spark, catalog, tmp_path, capsys, monkeypatch, case):
    folder, vectors, _, ids = catalog
    if case.endswith("routed"):  # seen by the tasks that route the queries, before the tiles' tasks
        force_plan(monkeypatch, 1, 2)
    index_args = ["search", "--index", folder / "index", "--output", tmp_path / "nb"]
    if case == "missing columns":
        spark.createDataFrame([("a", [1.0])], "image_id string, embedding array<float>").write.parquet(
            str(tmp_path / "bad")
        )
        args = ["index", "--embeddings", tmp_path / "bad", "--output", tmp_path / "i"]
    elif case == "mixed dims":
        write_embeddings(spark, tmp_path / "bad", vectors[:5])
        write_embeddings(spark, tmp_path / "bad2", vectors[:5, :32], prefix="x")
        spark.read.parquet(str(tmp_path / "bad2")).write.mode("append").parquet(str(tmp_path / "bad"))
        args = ["index", "--embeddings", tmp_path / "bad", "--output", tmp_path / "i"]
    elif case == "empty catalog":
        spark.createDataFrame([], EMBEDDINGS_SCHEMA).write.parquet(str(tmp_path / "bad"))
        args = ["index", "--embeddings", tmp_path / "bad", "--output", tmp_path / "i"]
    elif case == "unknown ids":
        args = [*index_args, "--query-ids", f"{ids[0]},nope"]
    elif case == "other weights":
        write_embeddings(spark, tmp_path / "e", vectors[:50], weights="a" * 64)
        write_embeddings(spark, tmp_path / "q", vectors[:3], prefix="q", weights="b" * 64)
        assert run_job(spark, "index", "--embeddings", tmp_path / "e", "--output", tmp_path / "i") == 0
        args = ["search", "--index", tmp_path / "i", "--queries", tmp_path / "q", "--output", tmp_path / "nb"]
    elif case == "mixed weights":
        write_embeddings(spark, tmp_path / "bad", vectors[:5], weights="a" * 64)
        write_embeddings(spark, tmp_path / "bad2", vectors[5:10], prefix="x", weights="b" * 64)
        spark.read.parquet(str(tmp_path / "bad2")).write.mode("append").parquet(str(tmp_path / "bad"))
        args = ["index", "--embeddings", tmp_path / "bad", "--output", tmp_path / "i"]
    elif case == "other model":
        write_embeddings(spark, tmp_path / "q", vectors[:3], model="mobilenet_v2")
        args = [*index_args, "--queries", tmp_path / "q"]
    elif case == "queries mixing weights":  # ivf checks what its probe pass saw
        write_embeddings(spark, tmp_path / "q", vectors[:5], weights="a" * 64)
        write_embeddings(spark, tmp_path / "q2", vectors[5:10], prefix="x", weights="b" * 64)
        spark.read.parquet(str(tmp_path / "q2")).write.mode("append").parquet(str(tmp_path / "q"))
        args = [*index_args, "--queries", tmp_path / "q"]
    elif case.startswith("queries of another length"):
        write_embeddings(spark, tmp_path / "q", vectors[:5, :32])
        args = [*index_args, "--queries", tmp_path / "q", *(["--method", "exact"] if case.endswith("exact") else [])]
    elif case == "no lsh keys":
        write_embeddings(spark, tmp_path / "e", vectors[:50])
        assert (
            run_job(
                spark, "index", "--embeddings", tmp_path / "e", "--output", tmp_path / "i", "--num-hash-tables", "0"
            )
            == 0
        )
        args = [
            "search",
            "--index",
            tmp_path / "i",
            "--query-ids",
            "img00001",
            "--output",
            tmp_path / "nb",
            "--method",
            "lsh",
        ]
    else:
        args = ["search", "--index", tmp_path, "--query-ids", ids[0], "--output", tmp_path / "nb"]
    capsys.readouterr()
    assert run_job(spark, *args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error:" in err[0], err
    assert not (tmp_path / "nb").exists() and not list(tmp_path.glob(".nb.*"))  # nothing staged is left
    if "another length" in case:
        assert "32-d" in err[0] and f"{vectors.shape[1]}-d" in err[0], err
    if "weights" in case:
        assert "aaaaaaaaaaaa" in err[0] and "bbbbbbbbbbbb" in err[0], err

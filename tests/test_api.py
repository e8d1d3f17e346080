"""The Python API: the README's example as written, and the API's answers equal to the command line's."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import read_neighbours, search, write_embeddings

from jobs.api import Index
from jobs.errors import UsageError
from scripts.vectors import clustered_unit_vectors

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    section = README.read_text().split("### From Python", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_example_runs_as_written(spark, tmp_path):
    """In a Python of its own started where out/ is (Spark resolves relative paths from its JVM's directory)."""
    vectors, clusters = clustered_unit_vectors(600, dim=32, cluster_size=20, noise=0.5, seed=1)
    write_embeddings(spark, tmp_path / "out/demo/embeddings", vectors[:500], clusters[:500])
    write_embeddings(spark, tmp_path / "out/demo/query_embeddings", vectors[500:], prefix="q")
    env = {**os.environ, "PYTHONPATH": str(README.parent), "PYSPARK_PYTHON": sys.executable}
    done = subprocess.run(
        [sys.executable, "-c", readme_example()], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    shown = done.stdout
    assert (
        re.search(r"\|q000\d\d +\|img00\d\d\d +\|0\.\d+", shown)
        and "Index('out/demo/api_index': 500 resnet18 32-d vectors" in shown
    )
    graph = spark.read.parquet(str(tmp_path / "out/demo/knn_graph"))
    assert graph.count() == 5000 and graph.where("query_id = neighbor_id").count() == 0


def test_the_api_answers_as_the_command_line_does(spark, catalog, tmp_path):
    folder, vectors, _, ids = catalog
    asked, _ = clustered_unit_vectors(150, dim=64, cluster_size=30, noise=0.5, seed=9)
    write_embeddings(spark, tmp_path / "q", asked, prefix="q")
    cli = search(spark, folder / "index", tmp_path / "cli", "--queries", tmp_path / "q", "-k", "5")
    index = Index.open(str(folder / "index"))
    assert (index.count, index.dim, index.cells) == (3000, 64, cli["touched"]["cells"])
    found = index.search(spark.read.parquet(str(tmp_path / "q")).select("image_id", "embedding"), k=5)
    assert index.last_search["nprobe"] == cli["nprobe"] and index.last_search["recall_estimate"]["sample"] == 150
    columns = ["query_id", "rank", "neighbor_id", "similarity"]
    ours = found.toPandas().sort_values(["query_id", "rank"])[columns].reset_index(drop=True)
    theirs = read_neighbours(spark, tmp_path / "cli")[columns].reset_index(drop=True)
    assert len(ours) == 750 and ours[columns[:3]].equals(theirs[columns[:3]])
    # the same scores up to float32 rounding: the queries are scored in other batches when read as a DataFrame
    np.testing.assert_allclose(ours["similarity"], theirs["similarity"], rtol=0, atol=1e-6)


def test_build_update_and_search_through_the_api_alone(spark, tmp_path):
    vectors, _ = clustered_unit_vectors(400, dim=16, cluster_size=20, noise=0.4, seed=2)
    ids = write_embeddings(spark, tmp_path / "emb", vectors)
    table = spark.read.parquet(str(tmp_path / "emb"))
    index = Index.build(table.where("image_id < 'img00300'"), str(tmp_path / "index"), target_recall=0.9)
    assert index.count == 300 and index.calibration["target_recall"] == 0.9
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb", "index"]  # the staged table removed
    index.update(table.where("image_id >= 'img00100'"))
    assert index.count == 300
    graph = index.search(all=True, k=3).toPandas()
    assert set(graph["query_id"]) == set(ids[100:]) and not set(graph["neighbor_id"]) & set(ids[:100])
    pairs = index.search(duplicates=True, min_similarity=0.999).toPandas()
    assert {"image_a", "image_b", "similarity"} <= set(pairs.columns) and (pairs["similarity"] >= 0.999).all()


def test_bad_input_raises_the_command_lines_message(spark, catalog):
    folder, *_ = catalog
    index = Index.open(str(folder / "index"))
    with pytest.raises(UsageError, match="--target-recall"):
        index.search(all=True, target_recall=2)
    with pytest.raises(UsageError, match="image_id and embedding"):
        index.search(spark.range(3))
    with pytest.raises(UsageError, match="invalid options"):
        index.search(all=True, no_such_option=1)
    assert np.isfinite(index.nprobe)

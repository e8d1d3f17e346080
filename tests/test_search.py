"""index, search and evaluate on small synthetic tables: exact is exact, lsh keeps the contract, errors are clear."""

from __future__ import annotations

import json
from datetime import datetime

import numpy as np
import pandas as pd
import pytest
from conftest import run_job
from pyspark.ml.feature import BucketedRandomProjectionLSHModel
from pyspark.ml.functions import array_to_vector

from jobs.embed import EMBEDDINGS_SCHEMA
from jobs.evaluate import label_metrics, recall_at_k
from jobs.index import load_index
from jobs.knn import LshParams, bucket_keys, exact_topk
from scripts.vectors import clustered_unit_vectors


def write_embeddings(spark, path, vectors: np.ndarray, labels=None, prefix="img", model="resnet18") -> list[str]:
    ids = [f"{prefix}{i:05d}" for i in range(len(vectors))]
    rows = [
        (ids[i], f"file:/data/{prefix}/{i}.jpg", None if labels is None else str(labels[i]), 10, 10, model,
         [float(x) for x in vectors[i]], None, 100, datetime(2024, 1, 1))
        for i in range(len(vectors))
    ]
    spark.createDataFrame(rows, EMBEDDINGS_SCHEMA).repartition(3).write.mode("overwrite").parquet(str(path))
    return ids


@pytest.fixture(scope="module")
def catalog(spark, tmp_path_factory):
    folder = tmp_path_factory.mktemp("search")
    vectors, clusters = clustered_unit_vectors(3000, dim=64, cluster_size=30, noise=0.5, seed=3)
    ids = write_embeddings(spark, folder / "emb", vectors, clusters)
    assert run_job(spark, "index", "--embeddings", folder / "emb", "--output", folder / "index") == 0
    return folder, vectors, clusters, ids


def read_neighbours(spark, path) -> pd.DataFrame:
    return spark.read.parquet(str(path)).toPandas().sort_values(["query_id", "rank"])


def test_index_uses_the_spark_model_hashes(spark, catalog):
    folder, vectors, _, _ = catalog
    index = load_index(spark, str(folder / "index"))
    assert index.count == 3000 and index.dim == 64 and index.params == LshParams()
    model = BucketedRandomProjectionLSHModel.load(str(folder / "index" / "model"))
    assert model.getNumHashTables() == LshParams().num_hash_tables
    sample = spark.createDataFrame([([float(x) for x in v],) for v in vectors[:20]], "e array<float>")
    spark_hashes = np.array([[h[0] for h in row.hashes] for row in model.transform(sample.select(array_to_vector("e").alias("features"))).collect()])
    ours = np.floor(vectors[:20].astype(np.float32) @ index.rand_unit_vectors.T / index.params.bucket_length)
    np.testing.assert_array_equal(ours, spark_hashes)
    stored = spark.read.parquet(str(folder / "index" / "catalog")).toPandas().set_index("image_id").loc[catalog[3][:20], "buckets"]
    np.testing.assert_array_equal(np.stack(stored.to_numpy()), bucket_keys(vectors[:20], index.rand_unit_vectors, index.params))


def test_exact_search_is_exactly_right(spark, catalog, tmp_path):
    folder, vectors, _, ids = catalog
    queries, _ = clustered_unit_vectors(40, dim=64, cluster_size=30, noise=0.5, seed=99)
    query_ids = write_embeddings(spark, tmp_path / "q", queries, prefix="q")
    assert run_job(spark, "search", "--index", folder / "index", "--queries", tmp_path / "q", "--output", tmp_path / "nb", "-k", "7", "--method", "exact") == 0
    got = read_neighbours(spark, tmp_path / "nb")
    truth_idx, truth_dist = exact_topk(queries, vectors, 7)
    assert len(got) == 40 * 7
    for qi, qid in enumerate(query_ids):
        rows = got[got["query_id"] == qid]
        assert list(rows["rank"]) == list(range(1, 8))
        assert list(rows["neighbor_id"]) == [ids[i] for i in truth_idx[qi]]
        np.testing.assert_allclose(rows["distance"], truth_dist[qi], atol=1e-4)
        np.testing.assert_allclose(rows["similarity"], vectors[truth_idx[qi]] @ queries[qi], atol=1e-4)
        assert rows["query_path"].iloc[0] == f"file:/data/q/{qi}.jpg"


def test_lsh_returns_k_sorted_rows_per_query_with_high_recall(spark, catalog, tmp_path):
    folder, vectors, _, ids = catalog
    picked = ids[:50]
    assert run_job(spark, "search", "--index", folder / "index", "--query-ids", ",".join(picked), "--output", tmp_path / "nb", "-k", "10", "--exclude-self") == 0
    got = read_neighbours(spark, tmp_path / "nb")
    assert set(got["query_id"]) == set(picked)
    for qid, rows in got.groupby("query_id"):
        assert list(rows["rank"]) == list(range(1, 11))
        assert (np.diff(rows["distance"].to_numpy()) >= 0).all()
        assert qid not in set(rows["neighbor_id"])
    truth_idx, _ = exact_topk(vectors[:50], vectors, 11)
    truth = {ids[q]: {ids[i] for i in truth_idx[q] if i != q} for q in range(50)}
    recall = np.mean([len(set(rows["neighbor_id"]) & truth[q]) / 10 for q, rows in got.groupby("query_id")])
    assert recall >= 0.9
    summary = json.loads((tmp_path / "nb" / "_summary.json").read_text())
    assert summary["counts"]["queries"] == 50 and summary["counts"]["rows"] == 500


def test_lsh_falls_back_to_exact_when_buckets_are_too_small(spark, catalog, tmp_path):
    folder, vectors, _, ids = catalog
    # 64 hashes ANDed in a single table, no probes: nearly every bucket holds one vector
    assert run_job(spark, "index", "--embeddings", folder / "emb", "--output", tmp_path / "tiny", "--num-hash-tables", "1", "--hashes-per-table", "64", "--probes", "0") == 0
    assert run_job(spark, "search", "--index", tmp_path / "tiny", "--query-ids", ",".join(ids[:5]), "--output", tmp_path / "nb", "-k", "5") == 0
    got = read_neighbours(spark, tmp_path / "nb")
    assert got.groupby("query_id").size().tolist() == [5] * 5
    assert json.loads((tmp_path / "nb" / "_summary.json").read_text())["counts"]["lsh_fallback_queries"] >= 4
    truth_idx, _ = exact_topk(vectors[:5], vectors, 5)
    assert [set(r["neighbor_id"]) for _, r in got.groupby("query_id")] == [{ids[i] for i in t} for t in truth_idx]


def test_duplicates_lists_each_close_pair_once(spark, tmp_path):
    rng = np.random.default_rng(0)
    base = rng.standard_normal((200, 32)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    near = base[:10] + 0.01 * rng.standard_normal((10, 32)).astype(np.float32)
    vectors = np.vstack([base, near / np.linalg.norm(near, axis=1, keepdims=True)])
    ids = write_embeddings(spark, tmp_path / "emb", vectors)
    assert run_job(spark, "index", "--embeddings", tmp_path / "emb", "--output", tmp_path / "index") == 0
    assert run_job(spark, "search", "--index", tmp_path / "index", "--duplicates", "--threshold", "0.2", "--output", tmp_path / "dups", "-k", "3") == 0
    pairs = spark.read.parquet(str(tmp_path / "dups")).toPandas()
    assert {(a, b) for a, b in zip(pairs["image_a"], pairs["image_b"])} == {(ids[i], ids[200 + i]) for i in range(10)}
    assert (pairs["distance"] < 0.2).all()


def test_evaluate_reports_recall_precision_and_map(spark, catalog, tmp_path):
    folder, *_ = catalog
    assert run_job(spark, "evaluate", "--index", folder / "index", "-k", "5", "--sample", "60", "--output", tmp_path / "eval.json") == 0
    metrics = json.loads((tmp_path / "eval.json").read_text())["metrics"]
    assert metrics["queries"] == 60 and metrics["recall@5"] >= 0.9
    assert metrics["exact_precision@5"] > 0.9  # neighbours in these clusters share the cluster label


def test_recall_and_label_metrics_on_known_cases():
    exact = pd.DataFrame({"query_id": ["q"] * 4, "rank": [1, 2, 3, 4], "neighbor_id": ["a", "b", "c", "d"]})
    approx = pd.DataFrame({"query_id": ["q"] * 4, "rank": [1, 2, 3, 4], "neighbor_id": ["a", "x", "c", "y"]})
    assert recall_at_k(approx, exact, 4) == 0.5
    neighbours = pd.DataFrame({"query_id": ["q"] * 4, "rank": [1, 2, 3, 4], "neighbor_label": ["car", "bus", "car", "bus"]})
    metrics = label_metrics(neighbours, {"q": "car"}, {"car": 3, "bus": 9}, k=4, self_in_catalog=True)
    assert metrics["precision@4"] == 0.5
    assert metrics["mAP@4"] == pytest.approx((1 / 1 + 2 / 3) / 2)  # two relevant images exist besides the query


@pytest.mark.parametrize("case", ["missing columns", "mixed dims", "empty catalog", "k too large", "unknown ids", "other model", "not an index"])
def test_malformed_inputs_exit_2(spark, catalog, tmp_path, capsys, case):
    folder, vectors, _, ids = catalog
    index_args = ["search", "--index", folder / "index", "--output", tmp_path / "nb"]
    if case == "missing columns":
        spark.createDataFrame([("a", [1.0])], "image_id string, embedding array<float>").write.parquet(str(tmp_path / "bad"))
        args = ["index", "--embeddings", tmp_path / "bad", "--output", tmp_path / "i"]
    elif case == "mixed dims":
        write_embeddings(spark, tmp_path / "bad", vectors[:5])
        write_embeddings(spark, tmp_path / "bad2", vectors[:5, :32], prefix="x")
        spark.read.parquet(str(tmp_path / "bad2")).write.mode("append").parquet(str(tmp_path / "bad"))
        args = ["index", "--embeddings", tmp_path / "bad", "--output", tmp_path / "i"]
    elif case == "empty catalog":
        spark.createDataFrame([], EMBEDDINGS_SCHEMA).write.parquet(str(tmp_path / "bad"))
        args = ["index", "--embeddings", tmp_path / "bad", "--output", tmp_path / "i"]
    elif case == "k too large":
        args = [*index_args, "--query-ids", ids[0], "-k", "5000"]
    elif case == "unknown ids":
        args = [*index_args, "--query-ids", f"{ids[0]},nope"]
    elif case == "other model":
        write_embeddings(spark, tmp_path / "q", vectors[:3], model="mobilenet_v2")
        args = [*index_args, "--queries", tmp_path / "q"]
    else:
        args = ["search", "--index", tmp_path, "--query-ids", ids[0], "--output", tmp_path / "nb"]
    capsys.readouterr()
    assert run_job(spark, *args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error:" in err[0], err

"""The search job's answers: exact and IVF against brute force, every plan the same, odd catalogs."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from conftest import read_neighbours, run_job, search, write_embeddings

from jobs import ivf
from jobs.knn import exact_topk
from jobs.search import direct
from jobs.search import queries as query_tables
from jobs.search.scoring import Wanted
from jobs.vectors import binary_from_matrix
from scripts.vectors import clustered_unit_vectors


@pytest.mark.parametrize("method", ["exact", "exact-read-by-spark", "ivf-all-cells", "ivf-all-cells-read-by-spark"])
def test_exact_and_ivf_probing_every_cell_are_exactly_right(spark, catalog, tmp_path, method):
    folder, vectors, _, ids = catalog
    queries, _ = clustered_unit_vectors(40, dim=64, cluster_size=30, noise=0.5, seed=99)
    query_ids = write_embeddings(spark, tmp_path / "q", queries, prefix="q")
    args = ["--method", "exact"] if method.startswith("exact") else ["--method", "ivf", "--nprobe", "100000"]
    args += ["--reader", "spark" if method.endswith("spark") else "direct"]
    search(spark, folder / "index", tmp_path / "nb", "--queries", tmp_path / "q", "-k", "7", *args)
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


@pytest.mark.parametrize("method", ["ivf", "lsh"])
def test_approximate_methods_return_k_sorted_rows_per_query_with_high_recall(spark, catalog, tmp_path, method):
    folder, vectors, _, ids = catalog
    picked = ids[:50]
    summary = search(spark, folder / "index", tmp_path / "nb", "--query-ids", ",".join(picked), "-k", "10", "--exclude-self", "--method", method)
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
    assert summary["counts"]["queries"] == 50 and summary["counts"]["rows"] == 500


def test_queries_answered_in_their_own_tasks_or_shuffled_to_the_files_get_the_same_answers(spark, catalog, tmp_path, monkeypatch):
    from jobs.search import local

    folder, vectors, _, ids = catalog
    asked, _ = clustered_unit_vectors(300, dim=64, cluster_size=30, noise=0.5, seed=21)
    write_embeddings(spark, tmp_path / "q", asked, prefix="q")
    plans = {"local": search(spark, folder / "index", tmp_path / "local", "--queries", tmp_path / "q", "-k", "7")}
    assert spark.conf.get("spark.sql.codegen.wholeStage") == "true"  # off while the local plan wrote, then as it was
    # one task a core, as where a single task would read much
    monkeypatch.setattr(local, "SPREAD_READ_BYTES", 0)
    plans["cores"] = search(spark, folder / "index", tmp_path / "cores", "--queries", tmp_path / "q", "-k", "7")
    # the same plan spread over twice the cores, each query's cells held apart (a part per query, files read again)
    monkeypatch.setattr(local, "SPREAD_QUERIES", 0)
    monkeypatch.setattr(local, "HOLD_BYTES", 1)
    plans["parts"] = search(spark, folder / "index", tmp_path / "parts", "--queries", tmp_path / "q", "-k", "7")
    # shuffled to the files' tasks, the queries spread and each file's visitors split over several tasks
    monkeypatch.setattr(local, "LOCAL_READ_BYTES", -1)
    monkeypatch.setattr(query_tables, "SPREAD_BYTES", 0)
    monkeypatch.setattr(direct, "SPLIT_QUERIES", 0)
    assert direct.tasks_per_file(spark, 1, 300) == 2 * spark.sparkContext.defaultParallelism
    spread = query_tables.spread(spark, query_tables.unchecked_from_table(spark, str(tmp_path / "q")), 300, 64)
    assert spread.rdd.getNumPartitions() == 2 * spark.sparkContext.defaultParallelism
    plans["files"] = search(spark, folder / "index", tmp_path / "files", "--queries", tmp_path / "q", "-k", "7")
    assert plans["local"]["touched"]["plan"] == "in the queries' own 1 task(s)" and "plan" not in plans["files"]["touched"]
    assert plans["cores"]["touched"]["plan"] == f"in the queries' own {spark.sparkContext.defaultParallelism} task(s)"
    assert plans["parts"]["touched"]["plan"] == f"in the queries' own {2 * spark.sparkContext.defaultParallelism} task(s)"
    # a part per query re-reads files: more row groups than one pass over the probed cells
    assert plans["parts"]["touched"]["row_groups_read"] > plans["local"]["touched"]["row_groups_read"]
    columns = ["query_id", "rank", "neighbor_id", "distance"]
    answers = {plan: read_neighbours(spark, tmp_path / plan)[columns].reset_index(drop=True) for plan in plans}
    for plan, summary in plans.items():
        assert summary["counts"]["queries"] == 300 and summary["counts"]["rows"] == len(answers[plan]) == 300 * 7, plan
        pd.testing.assert_frame_equal(answers["local"], answers[plan])


def test_ties_are_broken_by_id(spark, tmp_path):
    # exactly representable vectors: every copy of a vector is at exactly the same distance
    base = np.eye(8, dtype=np.float32)
    vectors = np.vstack([base[[i % 8 for i in range(40)]]])
    order = np.random.default_rng(1).permutation(40)
    ids = write_embeddings(spark, tmp_path / "emb", vectors[order])
    assert run_job(spark, "index", "--embeddings", tmp_path / "emb", "--output", tmp_path / "index", "--cells", "4") == 0
    write_embeddings(spark, tmp_path / "q", base[:2], prefix="q")
    for method in ("exact", "ivf"):
        search(spark, tmp_path / "index", tmp_path / method, "--queries", tmp_path / "q", "-k", "3", "--method", method)
        got = read_neighbours(spark, tmp_path / method)
        for q, rows in got.groupby("query_id"):
            twins = sorted(ids[i] for i in range(40) if order[i] % 8 == int(q[1:]))
            assert list(rows["neighbor_id"]) == twins[:3], method


def test_odd_cells_huge_cell_empty_cells_and_short_probes(spark, tmp_path):
    rng = np.random.default_rng(5)
    crowd = np.tile(np.array([[1.0] + [0.0] * 15], np.float32), (300, 1)) + 0.01 * rng.standard_normal((300, 16)).astype(np.float32)
    rest, _ = clustered_unit_vectors(200, dim=16, cluster_size=10, noise=0.3, seed=6)
    vectors = np.vstack([crowd / np.linalg.norm(crowd, axis=1, keepdims=True), rest])
    ids = write_embeddings(spark, tmp_path / "emb", vectors)
    assert run_job(spark, "index", "--embeddings", tmp_path / "emb", "--output", tmp_path / "index", "--cells", "60", "--max-group-rows", "40") == 0
    index = ivf.load(spark, str(tmp_path / "index"))
    assert index.plan.sizes.max() > 40 and index.plan.parts.max() > 1  # the crowd's cell is split over groups
    assert index.meta["largest_cell"] == index.plan.sizes.max()
    queries = np.vstack([vectors[:3], vectors[300:303]])
    write_embeddings(spark, tmp_path / "q", queries, prefix="q")
    # nprobe 1 with k 30: the probed cell holds fewer than 30 rows for most queries, so they probe further
    search(spark, tmp_path / "index", tmp_path / "nb", "--queries", tmp_path / "q", "-k", "30", "--nprobe", "1")
    got = read_neighbours(spark, tmp_path / "nb")
    assert got.groupby("query_id").size().tolist() == [30] * 6
    truth_idx, _ = exact_topk(queries, vectors, 1)
    assert list(got[got["rank"] == 1]["neighbor_id"]) == [ids[i] for i in truth_idx[:, 0]]


def test_k_larger_than_the_catalog_returns_the_whole_catalog(spark, tmp_path):
    vectors, _ = clustered_unit_vectors(12, dim=8, cluster_size=4, seed=2)
    ids = write_embeddings(spark, tmp_path / "emb", vectors)
    assert run_job(spark, "index", "--embeddings", tmp_path / "emb", "--output", tmp_path / "index") == 0
    for method in ("ivf", "exact", "lsh"):
        search(spark, tmp_path / "index", tmp_path / method, "--query-ids", ids[0], "-k", "50", "--exclude-self", "--method", method)
        got = read_neighbours(spark, tmp_path / method)
        assert set(got["neighbor_id"]) == set(ids[1:]) and list(got["rank"]) == list(range(1, 12)), method


def test_queries_held_together_are_ordered_by_their_nearest_cell_with_their_probes():
    from jobs.search.local import by_nearest_cell

    cells, offsets = np.array([5, 1, 2, 0, 9, 3, 4]), np.array([0, 2, 4, 4, 7])  # the third query probes nothing
    order, moved, moved_offsets = by_nearest_cell(cells, offsets)
    assert order.tolist() == [2, 1, 0, 3]
    assert [moved[moved_offsets[i] : moved_offsets[i + 1]].tolist() for i in range(4)] == [[], [2, 0], [5, 1], [9, 3, 4]]


def test_a_shard_holding_fewer_rows_than_k_pads_cleanly_with_integer_keys():
    # pc.rank gives uint64; against TopK's int64 keys they became float64 and the padding key overflowed (a warning per query)
    from jobs.search.scoring import ShardRows
    from jobs.vectors import binary_from_values

    vectors = np.eye(3, 4, dtype=np.float32)
    rows = pa.table({"cell": pa.array([0, 0, 1], pa.int32()), "image_id": ["c", "a", "b"], "path": ["/c", "/a", "/b"],
                     "label": pa.nulls(3, pa.string()), "vector": binary_from_matrix(vectors)})
    shard = ShardRows.of(rows, 4)
    assert shard.keys.dtype == np.int64
    queries = pa.RecordBatch.from_arrays([pa.array([0, 1], pa.int64()), pa.array(["q0", "q1"]), pa.array(["/q0", "/q1"]), pa.nulls(2, pa.string()),
                                          binary_from_matrix(vectors[:2]), binary_from_values(np.array([0, 1, 1], np.int32), np.array([0, 2, 3], np.int32))],
                                         names=["qidx", "id", "path", "label", "vector", "probes"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        found = shard.answer(queries, Wanted(5)).to_pandas()
    assert sorted(found.groupby("qidx")["neighbor_id"].apply(sorted).to_dict().items()) == [(0, ["a", "b", "c"]), (1, ["b"])]


def test_query_ids_take_paths_and_unique_path_ends_and_an_ambiguous_end_lists_its_matches(spark, tmp_path, capsys):
    vectors, _ = clustered_unit_vectors(16, dim=8, cluster_size=4, seed=3)
    ids = write_embeddings(spark, tmp_path / "emb", vectors[:8], prefix="train")  # paths file:/data/train/0.jpg ...
    write_embeddings(spark, tmp_path / "test", vectors[8:], prefix="test")  # and file:/data/test/0.jpg ...
    spark.read.parquet(str(tmp_path / "test")).write.mode("append").parquet(str(tmp_path / "emb"))
    assert run_job(spark, "index", "--embeddings", tmp_path / "emb", "--output", tmp_path / "index") == 0
    search(spark, tmp_path / "index", tmp_path / "nb", "--query-ids", f"train/3.jpg,file:/data/test/5.jpg,{ids[1]}", "-k", "1")
    got = read_neighbours(spark, tmp_path / "nb")
    assert sorted(got["query_path"]) == ["file:/data/test/5.jpg", "file:/data/train/1.jpg", "file:/data/train/3.jpg"]
    assert (got["query_id"] == got["neighbor_id"]).all()  # each found itself: the right rows were picked
    capsys.readouterr()
    assert run_job(spark, "search", "--index", tmp_path / "index", "--query-ids", "3.jpg", "--output", tmp_path / "nb2") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "file:/data/test/3.jpg" in err[0] and "file:/data/train/3.jpg" in err[0] and "several" in err[0]

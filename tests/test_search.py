"""The search job's answers: exact and IVF against brute force, every plan the same, odd catalogs."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import force_plan, read_neighbours, row_groups_holding, run_job, search, write_embeddings
from pyspark.sql.pandas.types import to_arrow_schema

from jobs import ivf
from jobs.knn import exact_topk
from jobs.search import plan, results
from jobs.search.scoring import ShardRows
from jobs.search.topk import TopK
from jobs.tables import NEIGHBOURS_SCHEMA
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
    summary = search(
        spark,
        folder / "index",
        tmp_path / "nb",
        "--query-ids",
        ",".join(picked),
        "-k",
        "10",
        "--exclude-self",
        "--method",
        method,
    )
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


@pytest.mark.parametrize("method", ["ivf", "exact"])
def test_every_tiling_gives_the_same_answers_for_one_query_or_many(spark, catalog, tmp_path, monkeypatch, method):
    folder, vectors, _, ids = catalog
    asked, _ = clustered_unit_vectors(300, dim=64, cluster_size=30, noise=0.5, seed=21)
    write_embeddings(spark, tmp_path / "q", asked, prefix="q")
    write_embeddings(spark, tmp_path / "q1", asked[:1], prefix="q")
    columns = ["query_id", "rank", "neighbor_id", "distance"]
    answers, plans = {}, {}
    # one task; a block a core; queries routed to ranges of cells, with blocks; a task holding 40 queries at a time
    for name, blocks, ranges, task_bytes in [
        ("one", 1, 1, None),
        ("blocks", 3, 1, None),
        ("routed", 1, 2, None),
        ("grid", 2, 3, None),
        ("passes", 1, 1, 40),
        ("routed passes", 1, 3, 40),
    ]:
        force_plan(monkeypatch, blocks, ranges)
        if task_bytes:  # chunks of 40 queries: each its own pass over the cells they probe
            monkeypatch.setattr(plan, "TASK_BYTES", task_bytes * (4 * 64 + plan.QUERY_STRING_BYTES))
        for queries in ("q", "q1"):
            out = tmp_path / f"{name}-{queries}".replace(" ", "-")
            summary = search(
                spark, folder / "index", out, "--queries", tmp_path / queries, "-k", "7", "--method", method
            )
            plans[name, queries] = summary["touched"]
            answers[name, queries] = read_neighbours(spark, out)[columns].reset_index(drop=True)
            assert summary["counts"]["queries"] == len(answers[name, queries]) // 7 == (300 if queries == "q" else 1)
        monkeypatch.undo()
    for key, found in answers.items():
        pd.testing.assert_frame_equal(answers["one", key[1]], found, check_exact=False, atol=1e-6)
    assert plans["grid", "q"]["tasks"] == 6 and "routed to 3 ranges" in plans["grid", "q"]["plan"]
    assert plans["blocks", "q"]["tasks"] == 3 and "routed" not in plans["blocks", "q"]["plan"]
    # chunks of 40 queries: 8 passes over the cells they probe, each reading their row groups again
    assert plans["passes", "q"]["row_groups_read"] > plans["one", "q"]["row_groups_read"]
    if method == "exact":
        truth, _ = exact_topk(asked, vectors, 7)
        assert list(answers["one", "q"]["neighbor_id"]) == [ids[i] for q in range(300) for i in truth[q]]


@pytest.mark.parametrize("blocks, ranges", [(2, 1), (1, 3)])
def test_the_tasks_that_answer_write_the_table_as_sparks_writer_would(
    spark, catalog, tmp_path, monkeypatch, blocks, ranges
):
    folder, *_ = catalog
    asked, _ = clustered_unit_vectors(60, dim=64, cluster_size=30, noise=0.5, seed=23)
    write_embeddings(spark, tmp_path / "q", asked, prefix="q")
    force_plan(monkeypatch, blocks, ranges)
    direct = search(spark, folder / "index", tmp_path / "direct", "--queries", tmp_path / "q", "-k", "5")
    monkeypatch.setattr(results, "writable", lambda spark, uri: None)  # as for hdfs://, which pyarrow does not open
    by_spark = search(spark, folder / "index", tmp_path / "spark", "--queries", tmp_path / "q", "-k", "5")
    pd.testing.assert_frame_equal(
        read_neighbours(spark, tmp_path / "direct").reset_index(drop=True),
        read_neighbours(spark, tmp_path / "spark").reset_index(drop=True),
    )
    assert direct["counts"]["rows"] == by_spark["counts"]["rows"] == 300
    parts = sorted((tmp_path / "direct").glob("part-*.parquet"))  # one a task that answered (the merge's, if routed)
    assert 1 <= len(parts) <= (blocks if ranges == 1 else 8) and (tmp_path / "direct" / "_SUCCESS").exists()
    assert pq.read_schema(parts[0]).remove_metadata() == to_arrow_schema(NEIGHBOURS_SCHEMA)
    assert not list(tmp_path.glob(".direct*")) and not list((tmp_path / "direct").glob(".part-*"))  # no hidden part


def test_answers_of_no_rows_are_written_as_an_empty_table_with_its_schema(spark, tmp_path):
    def nothing(batches):
        yield from ()

    answers = results.Answers(spark.range(3, numPartitions=3), nothing, NEIGHBOURS_SCHEMA)
    assert results.write(spark, answers, str(tmp_path / "nb"), True) == 0
    table = spark.read.parquet(str(tmp_path / "nb"))
    assert table.count() == 0 and table.columns == NEIGHBOURS_SCHEMA.names


def test_a_task_reads_each_probed_row_group_once_a_pass_and_a_routed_search_reads_it_once(
    spark, catalog, tmp_path, monkeypatch
):
    folder, *_ = catalog
    asked, _ = clustered_unit_vectors(300, dim=64, cluster_size=30, noise=0.5, seed=22)
    write_embeddings(spark, tmp_path / "q", asked, prefix="q")
    index = ivf.load(spark, str(folder / "index"))
    cells, _ = index.probe(asked, index.params.nprobe, 7)
    holding = row_groups_holding(
        [folder / "index" / "catalog" / f["name"] for f in index.meta["files"]], np.unique(cells)
    )
    read = {}
    for name, blocks, ranges in [("one", 1, 1), ("blocks", 3, 1), ("routed", 1, 3)]:
        force_plan(monkeypatch, blocks, ranges)
        read[name] = search(
            spark, folder / "index", tmp_path / name, "--queries", tmp_path / "q", "-k", "7", "--recall-sample", "0"
        )["touched"]
    assert read["one"]["row_groups_read"] == holding  # one pass: every probed row group once
    assert (
        holding < read["blocks"]["row_groups_read"] <= 3 * holding
    )  # each block reads the row groups its own queries probe
    # each range's tile reads its own cells' row groups; a row group holding cells of two ranges is read by both tiles
    assert holding <= read["routed"]["row_groups_read"] <= holding + 2
    assert (
        read["one"]["catalog_rows_scanned"]
        == read["routed"]["catalog_rows_scanned"]
        == index.plan.sizes[np.unique(cells)].sum()
    )


def test_ties_are_broken_by_id(spark, tmp_path):
    # exactly representable vectors: every copy of a vector is at exactly the same distance
    base = np.eye(8, dtype=np.float32)
    vectors = np.vstack([base[[i % 8 for i in range(40)]]])
    order = np.random.default_rng(1).permutation(40)
    ids = write_embeddings(spark, tmp_path / "emb", vectors[order])
    assert (
        run_job(spark, "index", "--embeddings", tmp_path / "emb", "--output", tmp_path / "index", "--cells", "4") == 0
    )
    write_embeddings(spark, tmp_path / "q", base[:2], prefix="q")
    for method in ("exact", "ivf"):
        search(spark, tmp_path / "index", tmp_path / method, "--queries", tmp_path / "q", "-k", "3", "--method", method)
        got = read_neighbours(spark, tmp_path / method)
        for q, rows in got.groupby("query_id"):
            twins = sorted(ids[i] for i in range(40) if order[i] % 8 == int(q[1:]))
            assert list(rows["neighbor_id"]) == twins[:3], method


def test_odd_cells_huge_cell_empty_cells_and_short_probes(spark, tmp_path):
    rng = np.random.default_rng(5)
    crowd = np.tile(np.array([[1.0] + [0.0] * 15], np.float32), (300, 1)) + 0.01 * rng.standard_normal(
        (300, 16)
    ).astype(np.float32)
    rest, _ = clustered_unit_vectors(200, dim=16, cluster_size=10, noise=0.3, seed=6)
    vectors = np.vstack([crowd / np.linalg.norm(crowd, axis=1, keepdims=True), rest])
    ids = write_embeddings(spark, tmp_path / "emb", vectors)
    assert (
        run_job(
            spark,
            "index",
            "--embeddings",
            tmp_path / "emb",
            "--output",
            tmp_path / "index",
            "--cells",
            "60",
            "--max-group-rows",
            "40",
        )
        == 0
    )
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
        search(
            spark,
            tmp_path / "index",
            tmp_path / method,
            "--query-ids",
            ids[0],
            "-k",
            "50",
            "--exclude-self",
            "--method",
            method,
        )
        got = read_neighbours(spark, tmp_path / method)
        assert set(got["neighbor_id"]) == set(ids[1:]) and list(got["rank"]) == list(range(1, 12)), method


def test_a_shard_holding_fewer_rows_than_k_pads_cleanly_with_integer_keys():
    # pc.rank gives uint64; against TopK's int64 keys they became float64 and the padding key overflowed (a warning per
    # query)
    vectors = np.eye(3, 4, dtype=np.float32)
    rows = pa.table(
        {
            "cell": pa.array([0, 0, 1], pa.int32()),
            "image_id": ["c", "a", "b"],
            "path": ["/c", "/a", "/b"],
            "label": pa.nulls(3, pa.string()),
            "vector": binary_from_matrix(vectors),
        }
    )
    shard = ShardRows.of(rows, 4, np.ones(3, bool))
    assert shard.keys.dtype == np.int64
    keep = TopK(2, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        shard.score(keep, vectors[:2], (np.array([0, 1, 1], np.int32), np.array([0, 2, 3])), None, 0)
    q, found, _ = keep.found()
    named = shard.rows.column("image_id").take(pa.array(shard.order[found])).to_pylist()
    assert sorted((int(a), b) for a, b in zip(q, named)) == [(0, "a"), (0, "b"), (0, "c"), (1, "b")]


def test_query_ids_take_paths_and_unique_path_ends_and_an_ambiguous_end_lists_its_matches(spark, tmp_path, capsys):
    vectors, _ = clustered_unit_vectors(16, dim=8, cluster_size=4, seed=3)
    ids = write_embeddings(spark, tmp_path / "emb", vectors[:8], prefix="train")  # paths file:/data/train/0.jpg ...
    write_embeddings(spark, tmp_path / "test", vectors[8:], prefix="test")  # and file:/data/test/0.jpg ...
    spark.read.parquet(str(tmp_path / "test")).write.mode("append").parquet(str(tmp_path / "emb"))
    assert run_job(spark, "index", "--embeddings", tmp_path / "emb", "--output", tmp_path / "index") == 0
    search(
        spark,
        tmp_path / "index",
        tmp_path / "nb",
        "--query-ids",
        f"train/3.jpg,file:/data/test/5.jpg,{ids[1]}",
        "-k",
        "1",
    )
    got = read_neighbours(spark, tmp_path / "nb")
    assert sorted(got["query_path"]) == ["file:/data/test/5.jpg", "file:/data/train/1.jpg", "file:/data/train/3.jpg"]
    assert (got["query_id"] == got["neighbor_id"]).all()  # each found itself: the right rows were picked
    capsys.readouterr()
    assert (
        run_job(spark, "search", "--index", tmp_path / "index", "--query-ids", "3.jpg", "--output", tmp_path / "nb2")
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1
        and "file:/data/test/3.jpg" in err[0]
        and "file:/data/train/3.jpg" in err[0]
        and "several" in err[0]
    )

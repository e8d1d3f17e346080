"""Recall measured on the search's own queries: the nprobe chosen for queries unlike the catalog, the estimate beside
the truth, and the warning where a fixed nprobe falls short."""

from __future__ import annotations

import numpy as np
from conftest import read_neighbours, run_job, search, write_embeddings

from jobs.knn import exact_topk


def true_recall(spark, out, queries: np.ndarray, catalog: np.ndarray, ids: list[str], k: int = 10) -> float:
    truth, _ = exact_topk(queries, catalog, k)
    found = read_neighbours(spark, out).groupby("query_id")["neighbor_id"].apply(set)
    return float(np.mean([len(found[f"q{i:05d}"] & {ids[j] for j in truth[i]}) / k for i in range(len(queries))]))


def shifted_queries(dim: int, count: int, seed: int) -> np.ndarray:
    """Queries unlike a clustered catalog: directions at random, far from its clusters."""
    vectors = np.random.default_rng(seed).standard_normal((count, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_shifted_queries_get_the_nprobe_that_reaches_the_target_and_an_estimate_near_the_truth(
    spark, catalog, tmp_path, capsys
):
    folder, vectors, _, ids = catalog
    queries = shifted_queries(vectors.shape[1], 1000, seed=5)
    write_embeddings(spark, tmp_path / "q", queries, prefix="q")
    index_nprobe = search(
        spark, folder / "index", tmp_path / "fixed", "--queries", tmp_path / "q", "--recall-sample", "0"
    )["nprobe"]
    fixed = true_recall(spark, tmp_path / "fixed", queries, vectors, ids)
    assert fixed < 0.93, "the index's own calibration must fall short on these queries for this test to mean anything"

    summary = search(spark, folder / "index", tmp_path / "chosen", "--queries", tmp_path / "q")
    measured, truth = summary["recall_estimate"], true_recall(spark, tmp_path / "chosen", queries, vectors, ids)
    assert measured["nprobe_chosen_by_estimate"] and summary["nprobe"] == measured["nprobe"] > index_nprobe
    assert truth >= 0.94 and abs(measured["recall"] - truth) <= 0.03 and measured["sample"] == 400
    assert measured["interval_95"][0] <= measured["recall"] <= measured["interval_95"][1]
    assert "recall@10" in capsys.readouterr().out

    summary = search(
        spark, folder / "index", tmp_path / "short", "--queries", tmp_path / "q", "--nprobe", str(index_nprobe)
    )
    measured = summary["recall_estimate"]
    assert not measured["nprobe_chosen_by_estimate"] and abs(measured["recall"] - fixed) <= 0.03
    assert measured["nprobe_reaching_target"] > index_nprobe
    assert f"--nprobe {measured['nprobe_reaching_target']} would reach it" in capsys.readouterr().out


def test_every_query_sampled_measures_them_exactly_and_a_lower_target_probes_fewer_cells(spark, catalog, tmp_path):
    folder, vectors, _, ids = catalog
    queries = shifted_queries(vectors.shape[1], 150, seed=6)
    write_embeddings(spark, tmp_path / "q", queries, prefix="q")
    high = search(spark, folder / "index", tmp_path / "high", "--queries", tmp_path / "q")
    low = search(spark, folder / "index", tmp_path / "low", "--queries", tmp_path / "q", "--target-recall", "0.8")
    for summary, out in ((high, "high"), (low, "low")):
        measured = summary["recall_estimate"]
        assert measured["sample"] == 150 and measured["standard_error"] == 0
        assert measured["recall"] == np.float32(true_recall(spark, tmp_path / out, queries, vectors, ids)).round(4)
    assert low["nprobe"] < high["nprobe"] and 0.8 <= low["recall_estimate"]["recall"] < 0.95


def test_the_knn_graph_and_duplicates_measure_their_recall_too(spark, catalog, tmp_path):
    folder, *_ = catalog
    graph = search(spark, folder / "index", tmp_path / "graph", "--all")["recall_estimate"]
    pairs = search(spark, folder / "index", tmp_path / "dups", "--duplicates", "--min-similarity", "0.8")
    assert graph["recall"] >= 0.95 and graph["sample"] == 400
    assert pairs["recall_estimate"]["recall"] >= 0.95


def test_recall_options_are_checked(spark, catalog, tmp_path):
    folder, *_ = catalog
    for bad in (["--target-recall", "1.5"], ["--target-recall", "0.9", "--nprobe", "3"], ["--recall-sample", "-1"]):
        assert run_job(spark, "search", "--index", folder / "index", "--all", "--output", tmp_path / "x", *bad) == 2
    exact = search(spark, folder / "index", tmp_path / "exact", "--all", "--method", "exact")
    assert exact["recall_estimate"] is None


def test_a_few_queries_are_measured_only_when_asked(spark, catalog, tmp_path):
    """A few queries read a few cells; their measure would read every one."""
    folder, vectors, _, ids = catalog
    write_embeddings(spark, tmp_path / "q", shifted_queries(vectors.shape[1], 20, seed=7), prefix="q")
    quiet = search(spark, folder / "index", tmp_path / "quiet", "--queries", tmp_path / "q")
    asked = search(spark, folder / "index", tmp_path / "asked", "--queries", tmp_path / "q", "--recall-sample", "400")
    assert quiet["recall_estimate"] is None and asked["recall_estimate"]["sample"] == 20


def test_the_drivers_sample_of_a_table_is_drawn_batch_by_batch_as_from_the_whole_row_group(
    spark, tmp_path, monkeypatch
):
    import pyarrow.parquet as pq

    from jobs.search import recall
    from jobs.search.queries import QueryFiles

    vectors = np.random.default_rng(4).standard_normal((500, 8)).astype(np.float32)
    write_embeddings(spark, tmp_path / "q", vectors, prefix="q")
    one = tmp_path / "one"  # the table as one file of one row group of 500 rows, a few rows without a vector
    table = pq.read_table(tmp_path / "q")
    embedding = table.column("embedding").to_pylist()
    embedding[3] = embedding[77] = None
    one.mkdir()
    pq.write_table(
        table.set_column(table.schema.get_field_index("embedding"), "embedding", [embedding]), one / "a.parquet"
    )
    files = QueryFiles.listed(spark, str(one))
    assert len(files.groups) == 1 and files.groups[0][2] == 500
    whole = recall.sample_files(files, 8, 40)
    monkeypatch.setattr(recall, "SAMPLE_BATCH_ROWS", 7)
    batched = recall.sample_files(files, 8, 40)
    assert batched[1] == whole[1] and len(whole[1]) == 40 and whole[2] == 500
    assert np.array_equal(batched[0], whole[0])
    ids = table.column("image_id").to_pylist()
    assert ids[3] not in whole[1] and all(np.allclose(vectors[int(i[1:])], v) for i, v in zip(whole[1], whole[0]))

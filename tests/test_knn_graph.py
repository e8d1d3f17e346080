"""The whole catalog as queries: the kNN graph, duplicate pairs and their groups."""

from __future__ import annotations

import numpy as np
import pandas as pd
from conftest import force_plan, read_neighbours, run_job, search, write_embeddings

from jobs.knn import exact_topk
from jobs.search import plan


def test_all_gives_the_knn_graph_and_duplicates_lists_each_close_pair_once(spark, tmp_path):
    rng = np.random.default_rng(0)
    base = rng.standard_normal((200, 32)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    near = base[:10] + 0.01 * rng.standard_normal((10, 32)).astype(np.float32)
    vectors = np.vstack([base, near / np.linalg.norm(near, axis=1, keepdims=True)])
    ids = write_embeddings(spark, tmp_path / "emb", vectors, labels=[f"l{i % 200 % 7}" for i in range(210)])
    assert run_job(spark, "index", "--embeddings", tmp_path / "emb", "--output", tmp_path / "index") == 0
    search(spark, tmp_path / "index", tmp_path / "dups", "--duplicates", "--min-similarity", "0.98", "-k", "3")
    pairs = spark.read.parquet(str(tmp_path / "dups")).toPandas()
    assert {(a, b) for a, b in zip(pairs["image_a"], pairs["image_b"])} == {(ids[i], ids[200 + i]) for i in range(10)}
    assert (pairs["similarity"] >= 0.98).all() and (pairs["label_a"] == pairs["label_b"]).all()
    summary = search(spark, tmp_path / "index", tmp_path / "graph", "--all", "-k", "4", "--method", "exact")
    graph = read_neighbours(spark, tmp_path / "graph")
    assert (
        summary["counts"]["queries"] == 210
        and len(graph) == 840
        and not (graph["query_id"] == graph["neighbor_id"]).any()
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dups", "emb", "graph", "index"]  # nothing left aside
    truth_idx, _ = exact_topk(vectors, vectors, 5)
    assert all(
        list(graph[graph["query_id"] == ids[q]]["neighbor_id"]) == [ids[i] for i in truth_idx[q] if i != q][:4]
        for q in range(0, 210, 15)
    )


def test_all_answers_the_catalog_in_place_and_every_tiling_agrees(spark, catalog, tmp_path, monkeypatch):
    folder, vectors, _, ids = catalog
    summary = search(spark, folder / "index", tmp_path / "graph", "--all", "-k", "5")
    graph = read_neighbours(spark, tmp_path / "graph")
    assert "routed" not in summary["touched"]["plan"] and summary["counts"]["queries"] == 3000
    assert len(graph) == 15000 and not (graph["query_id"] == graph["neighbor_id"]).any()
    assert (
        graph.groupby("query_id")["rank"].apply(list) == pd.Series([[1, 2, 3, 4, 5]] * 3000, index=sorted(ids))
    ).all()
    truth_idx, _ = exact_topk(vectors, vectors, 6)
    truth = {ids[q]: {ids[i] for i in truth_idx[q] if i != q} for q in range(3000)}
    assert np.mean([len(set(rows["neighbor_id"]) & truth[q]) / 5 for q, rows in graph.groupby("query_id")]) >= 0.95
    # routed to ranges of cells; read by Spark (copied to the executors); in chunks of 400 rows, each its own pass
    others = {}
    for name, blocks, ranges, extra in [
        ("routed", 1, 3, []),
        ("spark", 2, 1, ["--reader", "spark"]),
        ("chunks", 3, 1, []),
    ]:
        force_plan(monkeypatch, blocks, ranges)
        if name == "chunks":
            monkeypatch.setattr(plan, "TASK_BYTES", 400 * (4 * 64 + 200))
        others[name] = search(spark, folder / "index", tmp_path / name, "--all", "-k", "5", *extra)["touched"]
        monkeypatch.undo()
        other = read_neighbours(spark, tmp_path / name)
        assert (other["query_id"].to_numpy() == graph["query_id"].to_numpy()).all() and (
            other["rank"].to_numpy() == graph["rank"].to_numpy()
        ).all()
        # matrix products of other shapes round differently: a near-tie may swap, the distances agree
        assert (other["neighbor_id"].to_numpy() == graph["neighbor_id"].to_numpy()).mean() > 0.999, name
        np.testing.assert_allclose(other["distance"].to_numpy(), graph["distance"].to_numpy(), atol=1e-5)
    assert "routed to 3 ranges" in others["routed"]["plan"]
    assert (
        others["chunks"]["row_groups_read"] > summary["touched"]["row_groups_read"]
    )  # each chunk reads the cells it probes


def test_duplicates_keep_every_pair_once_inclusive_threshold_and_empty_results(spark, tmp_path):
    rng = np.random.default_rng(4)
    base = rng.standard_normal((300, 24)).astype(np.float32)
    crowd = base[0] + 0.002 * rng.standard_normal((15, 24)).astype(np.float32)  # 16 near-copies of one image
    vectors = np.vstack([base, crowd])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = write_embeddings(spark, tmp_path / "emb", vectors)
    assert run_job(spark, "index", "--embeddings", tmp_path / "emb", "--output", tmp_path / "index") == 0
    similarity = vectors @ vectors.T
    truth = {
        (ids[a], ids[b])
        for a in range(len(ids))
        for b in range(len(ids))
        if ids[a] < ids[b] and similarity[a, b] >= 0.99
    }
    assert len(truth) == 16 * 15 // 2
    for method in ("ivf", "exact"):
        summary = search(
            spark, tmp_path / "index", tmp_path / method, "--duplicates", "--min-similarity", "0.99", "--method", method
        )
        pairs = spark.read.parquet(str(tmp_path / method)).toPandas()
        assert (
            len(pairs) == len(truth) == summary["counts"]["rows"]
            and {(a, b) for a, b in zip(pairs["image_a"], pairs["image_b"])} == truth
        ), method
    weakest = float(pairs["similarity"].min())  # the threshold is inclusive: a pair exactly at it stays
    search(
        spark,
        tmp_path / "index",
        tmp_path / "at",
        "--duplicates",
        "--min-similarity",
        repr(weakest),
        "--method",
        "exact",
    )
    at = spark.read.parquet(str(tmp_path / "at")).toPandas()
    assert len(at) >= 1 and (at["similarity"] >= weakest).all() and weakest in set(at["similarity"])
    search(spark, tmp_path / "index", tmp_path / "none", "--duplicates", "--min-similarity", "1.5")
    empty = spark.read.parquet(str(tmp_path / "none"))
    assert empty.count() == 0 and empty.columns == [
        "image_a",
        "path_a",
        "label_a",
        "image_b",
        "path_b",
        "label_b",
        "distance",
        "similarity",
    ]


def test_duplicate_groups_join_chains_in_spark_and_count_images_with_pairs(spark, tmp_path):
    rng = np.random.default_rng(8)
    others = rng.standard_normal((200, 24)).astype(np.float32)
    others[:, :4] = 0  # far from the chain and the pair, which live in dimensions 0-3
    step = np.arccos(0.995)  # neighbours on the chain are at cosine 0.995, two steps apart at 0.980
    chain = np.zeros((6, 24), np.float32)
    chain[:, 0], chain[:, 1] = np.cos(step * np.arange(6)), np.sin(step * np.arange(6))
    pair = np.zeros((2, 24), np.float32)
    pair[:, 2], pair[:, 3] = [1, np.cos(step)], [0, np.sin(step)]
    vectors = np.vstack([others, chain, pair])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = write_embeddings(spark, tmp_path / "emb", vectors)
    assert (
        run_job(spark, "index", "--embeddings", tmp_path / "emb", "--output", tmp_path / "index", "--cells", "4") == 0
    )
    summary = search(
        spark,
        tmp_path / "index",
        tmp_path / "dups",
        "--duplicates",
        "--min-similarity",
        "0.99",
        "--groups",
        tmp_path / "groups",
        "--method",
        "exact",
    )
    pairs = spark.read.parquet(str(tmp_path / "dups")).toPandas()
    assert len(pairs) == 5 + 1 and (pairs["similarity"] < 0.99).sum() == 0  # the chain's 5 links (not a-c) and the pair
    groups = spark.read.parquet(str(tmp_path / "groups")).toPandas()
    members = groups.groupby("group_id")["image_id"].apply(set).to_dict()
    assert members == {ids[200]: set(ids[200:206]), ids[206]: set(ids[206:208])}
    assert (groups["group_size"] == groups["group_id"].map(lambda g: len(members[g]))).all()
    assert (
        summary["counts"]["images_with_pairs"] == 8
        and summary["counts"]["groups"] == 2
        and summary["counts"]["largest_group"] == 6
    )
    search(
        spark,
        tmp_path / "index",
        tmp_path / "none",
        "--duplicates",
        "--min-similarity",
        "1.5",
        "--groups",
        tmp_path / "nogroups",
    )
    empty = spark.read.parquet(str(tmp_path / "nogroups"))
    assert empty.count() == 0 and empty.columns == ["group_id", "group_size", "image_id", "path", "label"]

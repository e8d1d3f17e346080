"""index and search on small vectors: IVF cells and pruning, exact correctness, ties, odd cell sizes, LSH, evaluate."""

from __future__ import annotations

import json
import warnings
from datetime import datetime

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import run_job
from pyspark.ml.feature import BucketedRandomProjectionLSHModel
from pyspark.ml.functions import array_to_vector

from jobs import ivf
from jobs.embed import EMBEDDINGS_SCHEMA
from jobs.evaluate import label_metrics, recall_at_k
from jobs.index import write
from jobs.ivf import rand_unit_vectors
from jobs.knn import LshParams, bucket_keys, exact_topk, squared_distances
from jobs.search import direct, itself
from jobs.search import queries as query_tables
from jobs.search.scoring import Wanted
from jobs.vectors import binary_from_matrix, gather_matrix
from scripts.vectors import clustered_unit_vectors


def write_embeddings(spark, path, vectors: np.ndarray, labels=None, prefix="img", model="resnet18", weights=None) -> list[str]:
    ids = [f"{prefix}{i:05d}" for i in range(len(vectors))]
    rows = [
        (ids[i], f"file:/data/{prefix}/{i}.jpg", None if labels is None else str(labels[i]), 10, 10, model,
         [float(x) for x in vectors[i]], None, 100, datetime(2024, 1, 1), weights)
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


def search(spark, index, out, *args) -> dict:
    assert run_job(spark, "search", "--index", index, "--output", out, *args) == 0
    return json.loads((out / "_summary.json").read_text())


def test_index_stores_the_catalog_clustered_by_nearest_cell(spark, catalog):
    folder, vectors, _, ids = catalog
    index = ivf.load(spark, str(folder / "index"))
    assert index.count == 3000 and index.dim == 64 and index.cells == round(4 * np.sqrt(3000))
    assert index.plan.sizes.sum() == 3000 and index.params.nprobe == round(2.25 * np.sqrt(index.cells))
    stored = spark.read.parquet(index.catalog_uri).toPandas().set_index("image_id").loc[ids]
    nearest = np.argmin(squared_distances(vectors, index.centroids), axis=1)
    np.testing.assert_array_equal(stored["cell"].to_numpy(), nearest)
    assert (stored["group"].to_numpy() == index.plan.first_group[nearest]).all()  # no cell is split here
    for entry in index.meta["files"]:  # every file holds a run of groups, sorted by group then cell, in several row groups
        table = pq.read_table(folder / "index" / "catalog" / entry["name"]).to_pandas()
        assert list(table["group"]) == sorted(table["group"]) and (table["group"].min(), table["group"].max()) == (entry["first_group"], entry["last_group"])
        assert all((g["cell"].diff().dropna() >= 0).all() for _, g in table.groupby("group"))
    sizes, row_groups = write.RowGroupSizes.for_dim(64), 0
    for entry in index.meta["files"]:  # row groups end at cell boundaries: a probed cell is read without its neighbours
        meta = pq.ParquetFile(folder / "index" / "catalog" / entry["name"]).metadata
        ranges = [(s.min, s.max) for s in (meta.row_group(g).column(1).statistics for g in range(meta.num_row_groups))]
        assert all(high < low for (_, high), (low, _) in zip(ranges, ranges[1:]))
        assert all(meta.row_group(g).num_rows >= sizes.least for g in range(meta.num_row_groups - 1))
        row_groups += meta.num_row_groups
    assert row_groups >= 3000 // (sizes.least + 40)  # cells of up to 40 rows
    assert sorted(p.name for p in (folder / "index" / "catalog").iterdir()) == sorted([f["name"] for f in index.meta["files"]] + ["_SUCCESS"])
    model = BucketedRandomProjectionLSHModel.load(str(folder / "index" / "model"))
    assert model.getNumHashTables() == LshParams().num_hash_tables
    sample = spark.createDataFrame([([float(x) for x in v],) for v in vectors[:20]], "e array<float>")
    spark_hashes = np.array([[h[0] for h in row.hashes] for row in model.transform(sample.select(array_to_vector("e").alias("features"))).collect()])
    projections = rand_unit_vectors(spark, str(folder / "index" / "model"))
    np.testing.assert_array_equal(np.floor(vectors[:20] @ projections.T / index.lsh.bucket_length), spark_hashes)
    np.testing.assert_array_equal(np.stack(stored["buckets"].iloc[:20].to_numpy()), bucket_keys(vectors[:20], projections, index.lsh))


def test_row_groups_end_at_cell_boundaries_and_only_a_cell_longer_than_the_largest_is_cut():
    sizes = write.RowGroupSizes(least=4, most=10)
    cells = np.repeat([0, 1, 2, 3, 4], [2, 3, 25, 1, 4])
    assert write.row_group_ends(cells, 0, None, sizes) == ([5, 15, 25, 30], 5)
    assert write.row_group_ends(cells[5:], 4, 1, sizes) == ([0, 10, 20, 25], 5)  # the open rows end where cell 2 begins
    assert write.row_group_ends(cells[5:], 3, 1, sizes) == ([7, 17, 25], 5)  # too few: they and cell 2 share row groups
    rng = np.random.default_rng(5)
    for _ in range(20):  # cut into batches anywhere, the row groups are the same as in one pass
        cells = np.sort(rng.integers(0, 30, 300))
        whole, _ = write.row_group_ends(cells, 0, None, sizes)
        ends, open_rows, last, start = [], 0, None, 0
        for end in [*np.sort(rng.choice(np.arange(1, 300), 6, replace=False)).tolist(), 300]:
            found, open_rows = write.row_group_ends(cells[start:end], open_rows, last, sizes)
            ends += [start + e for e in found if start + e > 0]
            last, start = int(cells[end - 1]), end
        assert ends == whole and all(b - a <= 10 for a, b in zip([0, *ends], ends))


def test_a_catalog_file_holds_what_its_manifest_entry_says_and_an_abandoned_one_leaves_nothing(tmp_path):
    import pyarrow.fs as pafs

    schema, sizes = write.catalog_schema(False), write.RowGroupSizes(least=2, most=4)
    rows = pa.RecordBatch.from_pylist([{"group": 3 + i // 5, "cell": i // 2, "image_id": f"i{i}", "path": f"p{i}", "label": None,
                                        "vector": np.full(4, i, np.float32).tobytes()} for i in range(9)])
    for abandoned in (False, True):
        writer = write.CatalogFileWriter(pafs.LocalFileSystem(), str(tmp_path / "part.parquet"), schema, sizes)
        writer.add(rows.slice(0, 4))
        writer.add(rows.slice(4))
        if abandoned:
            writer.abandon()
            assert list(tmp_path.iterdir()) == []
            continue
        entry = writer.close()
        meta = pq.ParquetFile(tmp_path / "part.parquet").metadata
        assert entry == {"first_group": 3, "last_group": 4, "rows": 9, "bytes": (tmp_path / "part.parquet").stat().st_size}
        assert [meta.row_group(g).num_rows for g in range(meta.num_row_groups)] == [2, 2, 2, 2, 1]  # a cell a row group; the last one open when the file closed
        assert pq.read_table(tmp_path / "part.parquet").schema == schema
        (tmp_path / "part.parquet").unlink()


def test_where_pyarrow_cannot_write_the_index_spark_writes_the_same_catalog(spark, catalog, tmp_path, monkeypatch):
    folder, vectors, _, ids = catalog
    monkeypatch.setattr(write, "writable", lambda spark, uri: None)  # as for hdfs://, which pyarrow does not open here
    assert run_job(spark, "index", "--embeddings", folder / "emb", "--output", tmp_path / "index") == 0
    both = [ivf.load(spark, str(path)) for path in (folder / "index", tmp_path / "index")]
    assert [[(f["first_group"], f["last_group"], f["rows"]) for f in index.meta["files"]] for index in both] == [[(f["first_group"], f["last_group"], f["rows"]) for f in both[0].meta["files"]]] * 2
    stored = [spark.read.parquet(index.catalog_uri).toPandas().sort_values("image_id", ignore_index=True) for index in both]
    pd.testing.assert_frame_equal(*stored)
    answers = [search(spark, path, tmp_path / f"nb{n}", "--query-ids", ids[7], "-k", "5") and read_neighbours(spark, tmp_path / f"nb{n}")
               for n, path in enumerate((folder / "index", tmp_path / "index"))]
    pd.testing.assert_frame_equal(*answers)


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
    from jobs.search import direct, local

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


def test_the_local_plan_reads_its_queries_itself_skipping_failed_rows_like_spark(spark, catalog, tmp_path, monkeypatch):
    from jobs.search import local

    folder, _, _, _ = catalog
    asked, _ = clustered_unit_vectors(40, dim=64, cluster_size=30, noise=0.5, seed=5)
    failed = np.arange(40) % 7 == 3  # an error, or no embedding: left out by both routes
    # written by pyarrow in two files of several row groups; the second from an older embed, without the columns
    # error and weights_sha256 (its failed rows have no embedding)
    (tmp_path / "q").mkdir()
    for part, rows in enumerate((slice(0, 25), slice(25, 40))):
        table = pa.table({"image_id": [f"q{i}" for i in range(40)][rows], "path": [f"/q/{i}.jpg" for i in range(40)][rows], "label": pa.nulls(40, pa.string())[rows],
                          "model": ["resnet18"] * (rows.stop - rows.start),
                          "embedding": [None if failed[i] and (i % 2 or part) else asked[i].tolist() for i in range(40)][rows],
                          "error": ["bad jpeg" if failed[i] else None for i in range(40)][rows], "weights_sha256": pa.nulls(40, pa.string())[rows]})
        pq.write_table(table if part == 0 else table.drop_columns(["error", "weights_sha256"]), tmp_path / "q" / f"part-{part}.parquet", row_group_size=10)
    listed = query_tables.QueryFiles.listed(spark, str(tmp_path / "q"))
    assert listed.rows == 40 and len(listed.groups) == 5 and {"error", "weights_sha256"} <= set(listed.columns)
    for tasks in (1, 3, 7):  # every row in exactly one run, the runs within a row of each other
        runs = listed.runs(tasks)
        numbered = sorted(qidx + row for run in runs for _, _, first, end, qidx in run for row in range(first, end))
        sizes = [sum(end - first for _, _, first, end, _ in run) for run in runs]
        assert numbered == list(range(40)) and max(sizes) - min(sizes) <= 1
    own = search(spark, folder / "index", tmp_path / "own", "--queries", tmp_path / "q", "-k", "5")
    monkeypatch.setattr(local, "LOCAL_READ_BYTES", -1)  # the probe pass: Spark reads the table
    shuffled = search(spark, folder / "index", tmp_path / "shuffled", "--queries", tmp_path / "q", "-k", "5")
    assert own["touched"]["queries_read_by"] == "the tasks (pyarrow)" and "queries_read_by" not in shuffled["touched"]
    assert own["counts"]["queries"] == shuffled["counts"]["queries"] == 40 - failed.sum()
    columns = ["query_id", "rank", "neighbor_id", "distance"]
    answers = [read_neighbours(spark, tmp_path / out)[columns].reset_index(drop=True) for out in ("own", "shuffled")]
    assert set(answers[0]["query_id"]) == {f"q{i}" for i in np.flatnonzero(~failed)}
    pd.testing.assert_frame_equal(*answers)


def row_groups_holding(catalog_files: list, cells: np.ndarray) -> int:
    """Row groups whose cell range (Parquet statistics) holds one of these cells."""
    count = 0
    for path in catalog_files:
        meta = pq.ParquetFile(path).metadata
        column = [meta.row_group(0).column(c).path_in_schema for c in range(meta.num_columns)].index("cell")
        for group in range(meta.num_row_groups):
            stats = meta.row_group(group).column(column).statistics
            count += any(stats.min <= c <= stats.max for c in cells)
    return count


@pytest.mark.parametrize("reader,plan", [("direct", "local"), ("direct", "files"), ("spark", "files")])
def test_one_query_reads_only_the_files_and_row_groups_of_its_cells(spark, catalog, tmp_path, monkeypatch, reader, plan):
    from jobs.search import local

    folder, vectors, _, ids = catalog
    index = ivf.load(spark, str(folder / "index"))
    if plan == "files":  # the query goes to the files' tasks (cells.py), as a big query set would
        monkeypatch.setattr(local, "LOCAL_READ_BYTES", -1)
    summary = search(spark, folder / "index", tmp_path / "nb", "--query-ids", ids[7], "-k", "5", "--nprobe", "2", "--reader", reader)
    touched = summary["touched"]
    cells, _ = index.probe(vectors[7:8], 2, 5)
    files = [folder / "index" / "catalog" / f["name"] for f in index.meta["files"]]
    catalog_bytes = sum(f.stat().st_size for f in files)
    assert touched["catalog_bytes"] == catalog_bytes and touched["catalog_files"] == len(files) > touched["catalog_files_read"] >= 1
    assert touched["cells_probed"] == len(cells) == 2 and touched["catalog_rows"] == 3000
    assert touched["catalog_rows_scanned"] == index.plan.sizes[cells].sum() < 100  # only the probed cells' rows are scored
    if reader == "direct":  # counted by the executors as they read: the footer and the row groups that hold the two cells
        total = sum(pq.ParquetFile(f).metadata.num_row_groups for f in files)
        assert ("plan" in touched) == (plan == "local")
        assert touched["reader"] == "executors" and 1 <= touched["row_groups_read"] == row_groups_holding(files, cells) <= 4 < total
        assert 0 < touched["catalog_bytes_read"] < 0.2 * catalog_bytes
    else:
        assert touched["reader"] == "spark" and touched["groups_probed"] <= 2 < touched["groups"]
    got = read_neighbours(spark, tmp_path / "nb")
    assert got["neighbor_id"].iloc[0] == ids[7] and len(got) == 5


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


def test_cells_are_trained_by_cosine_and_stay_even(spark, tmp_path):
    # 600 tight groups, about 220 cells. With Euclidean centroids the groups no centroid claims fall into
    # the cell of the shortest centroid; at 1M that cell was 86x the mean (bench), but at this size the
    # cells stay even either way, so the unit centroids are what fails here if training is not cosine
    vectors, _ = clustered_unit_vectors(3000, dim=64, cluster_size=5, noise=0.6, seed=3)
    write_embeddings(spark, tmp_path / "emb", vectors)
    assert run_job(spark, "index", "--embeddings", tmp_path / "emb", "--output", tmp_path / "index") == 0
    index = ivf.load(spark, str(tmp_path / "index"))
    assert np.allclose(np.linalg.norm(index.centroids, axis=1), 1.0, atol=1e-5)
    assert index.plan.sizes.max() <= 4 * len(vectors) / index.cells, (index.plan.sizes.max(), index.cells)


def test_k_larger_than_the_catalog_returns_the_whole_catalog(spark, tmp_path):
    vectors, _ = clustered_unit_vectors(12, dim=8, cluster_size=4, seed=2)
    ids = write_embeddings(spark, tmp_path / "emb", vectors)
    assert run_job(spark, "index", "--embeddings", tmp_path / "emb", "--output", tmp_path / "index") == 0
    for method in ("ivf", "exact", "lsh"):
        search(spark, tmp_path / "index", tmp_path / method, "--query-ids", ids[0], "-k", "50", "--exclude-self", "--method", method)
        got = read_neighbours(spark, tmp_path / method)
        assert set(got["neighbor_id"]) == set(ids[1:]) and list(got["rank"]) == list(range(1, 12)), method


def test_an_index_from_an_older_version_says_rebuild(spark, catalog, tmp_path, capsys):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "index.json").write_text(json.dumps({"model": "resnet18", "dim": 64, "count": 3, "params": {}}))
    capsys.readouterr()
    assert run_job(spark, "search", "--index", tmp_path / "old", "--query-ids", "x", "--output", tmp_path / "nb") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "older version" in err[0] and "rebuild" in err[0]


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
    assert summary["counts"]["queries"] == 210 and len(graph) == 840 and not (graph["query_id"] == graph["neighbor_id"]).any()
    assert not [p.name for p in tmp_path.iterdir() if "probes" in p.name]  # the assigned catalog was written aside, then removed
    truth_idx, _ = exact_topk(vectors, vectors, 5)
    assert all(list(graph[graph["query_id"] == ids[q]]["neighbor_id"]) == [ids[i] for i in truth_idx[q] if i != q][:4] for q in range(0, 210, 15))


def test_all_answers_each_catalog_file_in_place_like_the_shuffled_search(spark, catalog, tmp_path):
    folder, vectors, _, ids = catalog
    summary = search(spark, folder / "index", tmp_path / "graph", "--all", "-k", "5")
    graph = read_neighbours(spark, tmp_path / "graph")
    assert summary["touched"]["reader"].startswith("executors, file by file") and summary["counts"]["queries"] == 3000
    assert len(graph) == 15000 and not (graph["query_id"] == graph["neighbor_id"]).any()
    assert (graph.groupby("query_id")["rank"].apply(list) == pd.Series([[1, 2, 3, 4, 5]] * 3000, index=sorted(ids))).all()
    truth_idx, _ = exact_topk(vectors, vectors, 6)
    truth = {ids[q]: {ids[i] for i in truth_idx[q] if i != q} for q in range(3000)}
    assert np.mean([len(set(rows["neighbor_id"]) & truth[q]) / 5 for q, rows in graph.groupby("query_id")]) >= 0.95
    # the same answers as the probe-and-shuffle search, and with chunks of 40 rows, each its own pass over the catalog
    # (matrix products of other shapes round differently: near-ties may swap, distances agree)
    search(spark, folder / "index", tmp_path / "shuffled", "--all", "-k", "5", "--reader", "spark")
    index = ivf.load(spark, str(folder / "index"))
    small = itself.search(spark, index, direct.chosen(spark, index, "direct"), index.params.nprobe, Wanted(5, True), chunk_rows=40)
    for other in (read_neighbours(spark, tmp_path / "shuffled"), small.found.toPandas().sort_values(["query_id", "rank"])):
        assert (other["query_id"].to_numpy() == graph["query_id"].to_numpy()).all() and (other["rank"].to_numpy() == graph["rank"].to_numpy()).all()
        assert (other["neighbor_id"].to_numpy() == graph["neighbor_id"].to_numpy()).mean() > 0.999
        np.testing.assert_allclose(other["distance"].to_numpy(), graph["distance"].to_numpy(), atol=1e-5)
    assert small.touched()["catalog_rows_scanned"] > 3000  # each chunk reads the cells it probes


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


def newest_job(spark) -> int:
    """The newest Spark job's id (Spark keeps a bounded list of jobs, so their number stops growing; this does not)."""
    return max(spark.sparkContext.statusTracker().getJobIdsForGroup(), default=-1)


def test_a_queries_table_is_counted_from_its_footers_without_a_spark_job(spark, tmp_path):
    ids = write_embeddings(spark, tmp_path / "q", np.eye(8, dtype=np.float32)[np.arange(37) % 8])
    before = newest_job(spark)
    assert before >= 0  # the table's write was seen, so a job run by the count would be too
    assert query_tables.estimated_count(spark, str(tmp_path / "q"), 8) == len(ids) == 37
    assert newest_job(spark) == before


def test_a_table_is_opened_with_its_footers_schema_without_a_spark_job(spark, tmp_path):
    from jobs.tables import footer_schema, open_embeddings

    write_embeddings(spark, tmp_path / "spark", np.eye(4, dtype=np.float32), labels=["a", "b", "c", "d"])
    (tmp_path / "arrow").mkdir()  # written by pyarrow: no Spark schema in its footer, its Arrow types converted
    pq.write_table(pq.read_table(tmp_path / "spark"), tmp_path / "arrow" / "part-0.parquet")
    for name in ("spark", "arrow"):
        before = newest_job(spark)
        opened = open_embeddings(spark, str(tmp_path / name), "queries table")
        assert newest_job(spark) == before, name
        inferred = spark.read.parquet(str(tmp_path / name))  # Spark's own inference (a job) for comparison
        assert footer_schema(spark, str(tmp_path / name)) == inferred.schema, name
        rows = sorted((r["image_id"], r["label"], tuple(r["embedding"])) for r in opened.collect())
        assert rows == [(f"img{i:05d}", "abcd"[i], tuple(np.eye(4)[i])) for i in range(4)], name
    (tmp_path / "parted" / "day=1").mkdir(parents=True)  # partition folders add columns only Spark knows of
    pq.write_table(pq.read_table(tmp_path / "spark"), tmp_path / "parted" / "day=1" / "part-0.parquet")
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "part-0.parquet").write_text("not parquet")
    assert footer_schema(spark, str(tmp_path / "parted")) is None and footer_schema(spark, str(tmp_path / "text")) is None


def test_catalog_files_read_ahead_in_threads_come_back_in_order_and_counted(spark, catalog):
    folder, *_ = catalog
    index = ivf.load(spark, str(folder / "index"))
    files = direct.locate(spark, index)
    catalog_files = itself.CatalogFiles(index, files, direct.ReadCounters.start(spark), files.filesystem(memory_map=True))
    probed = np.zeros(index.cells, bool)
    probed[:: 3] = True
    wanted = np.arange(len(index.meta["files"]))[::-1]
    got = list(catalog_files.rows(wanted, probed, at_once=2))
    assert [file for file, _, _ in got] == wanted.tolist()
    expected_bytes = 0
    for file, table, keep in got:
        one, one_keep, nbytes, _, _ = direct.read_probed(files.filesystem(), f"{files.root}/{index.meta['files'][file]['name']}", probed)
        assert table.equals(one) and np.array_equal(keep, one_keep)
        expected_bytes += nbytes
    assert sum(keep.sum() for _, _, keep in got) == index.plan.sizes[probed].sum() > 0
    assert catalog_files.counters.totals()["catalog_bytes_read"] == expected_bytes
    assert len(catalog_files.footers) == len(wanted)  # kept for the next read of these files


def test_python_workers_get_4_kib_pages_kept_for_reuse_from_pyarrows_allocator(spark):
    def environment(batches):
        import os

        for batch in batches:
            yield pa.RecordBatch.from_pydict({key: [os.environ.get(f"MIMALLOC_{key.upper()}")] * len(batch) for key in ("allow_thp", "purge_delay")})

    assert spark.range(1).mapInArrow(environment, "allow_thp string, purge_delay string").first().asDict() == {"allow_thp": "0", "purge_delay": "-1"}


def test_queries_held_together_are_ordered_by_their_nearest_cell_with_their_probes():
    from jobs.search.local import by_nearest_cell

    cells, offsets = np.array([5, 1, 2, 0, 9, 3, 4]), np.array([0, 2, 4, 4, 7])  # the third query probes nothing
    order, moved, moved_offsets = by_nearest_cell(cells, offsets)
    assert order.tolist() == [2, 1, 0, 3]
    assert [moved[moved_offsets[i] : moved_offsets[i + 1]].tolist() for i in range(4)] == [[], [2, 0], [5, 1], [9, 3, 4]]


def test_gathering_vectors_from_a_chunked_column_picks_the_same_rows_as_combining_it():
    matrix = np.arange(7 * 3, dtype=np.float32).reshape(7, 3)
    chunked = pa.chunked_array([binary_from_matrix(matrix[:2]), binary_from_matrix(matrix[2:2]), binary_from_matrix(matrix[2:])])
    for rows in (None, np.array([0, 3, 4, 6]), np.array([6, 0, 5, 1]), np.array([], np.int64)):
        assert np.array_equal(gather_matrix(chunked, 3, rows), matrix if rows is None else matrix[rows])


@pytest.mark.parametrize("case", ["missing columns", "mixed dims", "empty catalog", "unknown ids", "other model", "other weights", "mixed weights", "not an index",
                                  "no lsh keys", "queries mixing weights", "queries of another length", "queries of another length, exact",
                                  "queries of another length, files"])
def test_malformed_inputs_exit_2(spark, catalog, tmp_path, capsys, monkeypatch, case):
    from jobs.search import local

    folder, vectors, _, ids = catalog
    if case.endswith("files"):  # checked by the probe pass, before the files' tasks (not after, as in the queries' own tasks)
        monkeypatch.setattr(local, "LOCAL_READ_BYTES", -1)
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
        assert run_job(spark, "index", "--embeddings", tmp_path / "e", "--output", tmp_path / "i", "--num-hash-tables", "0") == 0
        args = ["search", "--index", tmp_path / "i", "--query-ids", "img00001", "--output", tmp_path / "nb", "--method", "lsh"]
    else:
        args = ["search", "--index", tmp_path, "--query-ids", ids[0], "--output", tmp_path / "nb"]
    capsys.readouterr()
    assert run_job(spark, *args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error:" in err[0], err
    assert not (tmp_path / "nb").exists()
    if "another length" in case:
        assert "32-d" in err[0] and f"{vectors.shape[1]}-d" in err[0], err
    if "weights" in case:
        assert "aaaaaaaaaaaa" in err[0] and "bbbbbbbbbbbb" in err[0], err


def test_partition_keys_land_exactly_where_spark_hashes_them(spark):
    from pyspark.sql import functions as F

    from jobs.partitions import partition_key, spark_hash_int

    assert [spark_hash_int(i) for i in (-7, 0, 1, 2**31 - 1)] == [r[0] for r in spark.createDataFrame([(-7,), (0,), (1,), (2**31 - 1,)], "v int").select(F.hash("v")).collect()]
    spread = spark.range(60).select((F.col("id") % 12).cast("int").alias("target")).repartition(12, partition_key(F.col("target"), 12))
    placed = spread.rdd.mapPartitionsWithIndex(lambda p, rows: [(p, r.target) for r in rows]).collect()
    assert all(p == target for p, target in placed) and len(placed) == 60


def test_duplicates_keep_every_pair_once_inclusive_threshold_and_empty_results(spark, tmp_path):
    rng = np.random.default_rng(4)
    base = rng.standard_normal((300, 24)).astype(np.float32)
    crowd = base[0] + 0.002 * rng.standard_normal((15, 24)).astype(np.float32)  # 16 near-copies of one image
    vectors = np.vstack([base, crowd])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = write_embeddings(spark, tmp_path / "emb", vectors)
    assert run_job(spark, "index", "--embeddings", tmp_path / "emb", "--output", tmp_path / "index") == 0
    similarity = vectors @ vectors.T
    truth = {(ids[a], ids[b]) for a in range(len(ids)) for b in range(len(ids)) if ids[a] < ids[b] and similarity[a, b] >= 0.99}
    assert len(truth) == 16 * 15 // 2
    for method in ("ivf", "exact"):
        summary = search(spark, tmp_path / "index", tmp_path / method, "--duplicates", "--min-similarity", "0.99", "--method", method)
        pairs = spark.read.parquet(str(tmp_path / method)).toPandas()
        assert len(pairs) == len(truth) == summary["counts"]["rows"] and {(a, b) for a, b in zip(pairs["image_a"], pairs["image_b"])} == truth, method
    weakest = float(pairs["similarity"].min())  # the threshold is inclusive: a pair exactly at it stays
    search(spark, tmp_path / "index", tmp_path / "at", "--duplicates", "--min-similarity", repr(weakest), "--method", "exact")
    at = spark.read.parquet(str(tmp_path / "at")).toPandas()
    assert len(at) >= 1 and (at["similarity"] >= weakest).all() and weakest in set(at["similarity"])
    search(spark, tmp_path / "index", tmp_path / "none", "--duplicates", "--min-similarity", "1.5")
    empty = spark.read.parquet(str(tmp_path / "none"))
    assert empty.count() == 0 and empty.columns == ["image_a", "path_a", "label_a", "image_b", "path_b", "label_b", "distance", "similarity"]


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
    assert run_job(spark, "index", "--embeddings", tmp_path / "emb", "--output", tmp_path / "index", "--cells", "4") == 0
    summary = search(spark, tmp_path / "index", tmp_path / "dups", "--duplicates", "--min-similarity", "0.99", "--groups", tmp_path / "groups", "--method", "exact")
    pairs = spark.read.parquet(str(tmp_path / "dups")).toPandas()
    assert len(pairs) == 5 + 1 and (pairs["similarity"] < 0.99).sum() == 0  # the chain's 5 links (not a-c) and the pair
    groups = spark.read.parquet(str(tmp_path / "groups")).toPandas()
    members = groups.groupby("group_id")["image_id"].apply(set).to_dict()
    assert members == {ids[200]: set(ids[200:206]), ids[206]: set(ids[206:208])}
    assert (groups["group_size"] == groups["group_id"].map(lambda g: len(members[g]))).all()
    assert summary["counts"]["images_with_pairs"] == 8 and summary["counts"]["groups"] == 2 and summary["counts"]["largest_group"] == 6
    search(spark, tmp_path / "index", tmp_path / "none", "--duplicates", "--min-similarity", "1.5", "--groups", tmp_path / "nogroups")
    empty = spark.read.parquet(str(tmp_path / "nogroups"))
    assert empty.count() == 0 and empty.columns == ["group_id", "group_size", "image_id", "path", "label"]


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


def test_a_shard_holding_fewer_rows_than_k_pads_cleanly_with_integer_keys():
    # pc.rank gives uint64; against TopK's int64 keys they became float64 and the padding key overflowed (a warning per query)
    from jobs.search.scoring import ShardRows
    from jobs.vectors import binary_from_matrix, binary_from_values

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

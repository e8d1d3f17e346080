"""The index job: the catalog stored clustered by cell, in row groups that end at cell boundaries."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from conftest import read_neighbours, run_job, search, write_embeddings
from pyspark.ml.common import _py2java
from pyspark.ml.feature import BucketedRandomProjectionLSHModel
from pyspark.ml.functions import array_to_vector
from pyspark.ml.linalg import DenseMatrix

from jobs import ivf
from jobs.ivf import write
from jobs.knn import LshParams, bucket_keys, squared_distances
from scripts.vectors import clustered_unit_vectors


def test_index_stores_the_catalog_clustered_by_nearest_cell(spark, catalog):
    folder, vectors, _, ids = catalog
    index = ivf.load(spark, str(folder / "index"))
    assert index.count == 3000 and index.dim == 64 and index.cells == round(4 * np.sqrt(3000))
    assert index.plan.sizes.sum() == 3000 and index.params.nprobe == index.meta["calibration"]["nprobe"] < index.cells
    stored = spark.read.parquet(index.catalog_uri).toPandas().set_index("image_id").loc[ids]
    nearest = np.argmin(squared_distances(vectors, index.centroids), axis=1)
    np.testing.assert_array_equal(stored["cell"].to_numpy(), nearest)
    assert (stored["group"].to_numpy() == index.plan.first_group[nearest]).all()  # no cell is split here
    for entry in index.meta[
        "files"
    ]:  # every file holds a run of groups, sorted by group then cell, in several row groups
        table = pq.read_table(folder / "index" / "catalog" / entry["name"]).to_pandas()
        assert list(table["group"]) == sorted(table["group"]) and (table["group"].min(), table["group"].max()) == (
            entry["first_group"],
            entry["last_group"],
        )
        assert all((g["cell"].diff().dropna() >= 0).all() for _, g in table.groupby("group"))
    sizes, row_groups = write.RowGroupSizes.for_dim(64), 0
    for entry in index.meta["files"]:  # row groups end at cell boundaries: a probed cell is read without its neighbours
        meta = pq.ParquetFile(folder / "index" / "catalog" / entry["name"]).metadata
        ranges = [(s.min, s.max) for s in (meta.row_group(g).column(1).statistics for g in range(meta.num_row_groups))]
        assert all(high < low for (_, high), (low, _) in zip(ranges, ranges[1:]))
        assert all(meta.row_group(g).num_rows >= sizes.least for g in range(meta.num_row_groups - 1))
        row_groups += meta.num_row_groups
    assert row_groups >= 3000 // (sizes.least + 40)  # cells of up to 40 rows
    assert sorted(p.name for p in (folder / "index" / "catalog").iterdir()) == sorted(
        [f["name"] for f in index.meta["files"]] + ["_SUCCESS"]
    )
    # the LSH functions, kept with the cells: unit vectors that hash as Spark ML's BucketedRandomProjectionLSH does
    projections = index.lsh_vectors
    assert projections.shape == (LshParams().num_hash_tables, 64)
    assert np.allclose(np.linalg.norm(projections, axis=1), 1, atol=1e-5)
    jvm = spark._jvm.org.apache.spark.ml
    matrix = _py2java(spark.sparkContext, DenseMatrix(len(projections), 64, projections.T.astype(float).ravel()))
    java_model = jvm.feature.BucketedRandomProjectionLSHModel("brp", matrix)  # Spark's own hashing of them
    java_model.set(java_model.bucketLength(), index.lsh.bucket_length).setInputCol("features").setOutputCol("hashes")
    model = BucketedRandomProjectionLSHModel(java_model)
    sample = spark.createDataFrame([([float(x) for x in v],) for v in vectors[:20]], "e array<float>")
    spark_hashes = np.array(
        [
            [h[0] for h in row.hashes]
            for row in model.transform(sample.select(array_to_vector("e").alias("features"))).collect()
        ]
    )
    np.testing.assert_array_equal(np.floor(vectors[:20] @ projections.T / index.lsh.bucket_length), spark_hashes)
    np.testing.assert_array_equal(
        np.stack(stored["buckets"].iloc[:20].to_numpy()), bucket_keys(vectors[:20], projections, index.lsh)
    )


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
    rows = pa.RecordBatch.from_pylist(
        [
            {
                "group": 3 + i // 5,
                "cell": i // 2,
                "image_id": f"i{i}",
                "path": f"p{i}",
                "label": None,
                "vector": np.full(4, i, np.float32).tobytes(),
                "fingerprint": i,
            }
            for i in range(9)
        ]
    )
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
        assert entry == {
            "first_group": 3,
            "last_group": 4,
            "first_cell": 0,
            "last_cell": 4,
            "rows": 9,
            "bytes": (tmp_path / "part.parquet").stat().st_size,
        }
        assert [meta.row_group(g).num_rows for g in range(meta.num_row_groups)] == [
            2,
            2,
            2,
            2,
            1,
        ]  # a cell a row group; the last one open when the file closed
        assert pq.read_table(tmp_path / "part.parquet").schema == schema
        (tmp_path / "part.parquet").unlink()


def test_where_pyarrow_cannot_write_the_index_spark_writes_the_same_catalog(spark, catalog, tmp_path, monkeypatch):
    folder, vectors, _, ids = catalog
    monkeypatch.setattr(write, "writable", lambda spark, uri: None)  # as for hdfs://, which pyarrow does not open here
    assert run_job(spark, "index", "--embeddings", folder / "emb", "--output", tmp_path / "index") == 0
    both = [ivf.load(spark, str(path)) for path in (folder / "index", tmp_path / "index")]
    assert [[(f["first_group"], f["last_group"], f["rows"]) for f in index.meta["files"]] for index in both] == [
        [(f["first_group"], f["last_group"], f["rows"]) for f in both[0].meta["files"]]
    ] * 2
    stored = [
        spark.read.parquet(index.catalog_uri).toPandas().sort_values("image_id", ignore_index=True) for index in both
    ]
    pd.testing.assert_frame_equal(*stored)
    answers = [
        search(spark, path, tmp_path / f"nb{n}", "--query-ids", ids[7], "-k", "5")
        and read_neighbours(spark, tmp_path / f"nb{n}")
        for n, path in enumerate((folder / "index", tmp_path / "index"))
    ]
    pd.testing.assert_frame_equal(*answers)


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


def test_partition_keys_land_exactly_where_spark_hashes_them(spark):
    from pyspark.sql import functions as F

    from jobs.partitions import partition_key, spark_hash_int

    assert [spark_hash_int(i) for i in (-7, 0, 1, 2**31 - 1)] == [
        r[0] for r in spark.createDataFrame([(-7,), (0,), (1,), (2**31 - 1,)], "v int").select(F.hash("v")).collect()
    ]
    spread = (
        spark.range(60)
        .select((F.col("id") % 12).cast("int").alias("target"))
        .repartition(12, partition_key(F.col("target"), 12))
    )
    placed = spread.rdd.mapPartitionsWithIndex(lambda p, rows: [(p, r.target) for r in rows]).collect()
    assert all(p == target for p, target in placed) and len(placed) == 60


def test_the_default_nprobe_is_the_smallest_that_reaches_the_target_recall_measured_on_the_catalog(
    spark, catalog, tmp_path
):
    folder, vectors, _, ids = catalog
    index = ivf.load(spark, str(folder / "index"))
    measured = index.meta["calibration"]
    assert measured["target_recall"] == 0.95 and measured["k"] == 10 and 900 <= measured["sample"] <= 1000
    recall_at = {int(p): r for p, r in measured["recall_at"].items()}
    # the smallest nprobe whose recall, less twice its standard error, reaches the target
    assert recall_at[index.params.nprobe] - 2 * measured["standard_error"] >= 0.95 - 1e-3
    assert min(recall_at.values()) < 0.95
    assert all(a <= b for a, b in zip(recall_at.values(), list(recall_at.values())[1:]))  # more cells, more recall
    # the kNN graph at that nprobe reaches it on every row, as measured on the sample
    search(spark, folder / "index", tmp_path / "graph", "--all", "-k", "10", "--nprobe", str(index.params.nprobe))
    graph = read_neighbours(spark, tmp_path / "graph")
    truth = np.argsort(squared_distances(vectors, vectors), axis=1)[:, 1:11]
    found = graph.groupby("query_id")["neighbor_id"].apply(set)
    recall = np.mean([len(found[ids[q]] & {ids[i] for i in truth[q]}) / 10 for q in range(len(ids))])
    assert recall >= 0.94 and abs(recall - measured["recall"]) < 0.03


def test_recall_curve_counts_the_neighbours_whose_cells_a_row_probes():
    from jobs.index.calibrate import recall_curve

    centroids = np.eye(3, dtype=np.float32)  # unit centroids: ranked by dot product
    sample = np.array([[1.0, 0.5, 0.0], [0.0, 0.2, 1.0]], np.float32)  # cells by rank: (0, 1, 2) and (2, 1, 0)
    neighbour_cells = np.array([[0, 1, 2, 2], [0, 0, 2, -1]])  # -1: fewer neighbours than k
    recall, error = recall_curve(sample, centroids, neighbour_cells)  # each row's recall, then their mean
    np.testing.assert_allclose(recall, [(1 / 4 + 1 / 3) / 2, (2 / 4 + 1 / 3) / 2, 1.0])
    np.testing.assert_allclose(error, [np.std([1 / 4, 1 / 3]) / np.sqrt(2), np.std([2 / 4, 1 / 3]) / np.sqrt(2), 0.0])


def test_an_index_built_with_nprobe_given_reports_the_recall_measured_there(spark, catalog, tmp_path, capsys):
    folder, *_ = catalog
    capsys.readouterr()
    assert (
        run_job(
            spark,
            "index",
            "--embeddings",
            folder / "emb",
            "--output",
            tmp_path / "index",
            "--nprobe",
            "1",
            "--num-hash-tables",
            "0",
        )
        == 0
    )
    index = ivf.load(spark, str(tmp_path / "index"))
    assert index.params.nprobe == 1 and index.meta["calibration"]["recall_at"]["1"] < 0.95
    assert f"recall@10 {index.meta['calibration']['recall_at']['1']:.3f} at nprobe 1 (given)" in capsys.readouterr().out


def test_the_manifest_reads_index_json_as_typed_fields():
    from jobs.ivf.manifest import CatalogFile, Manifest

    entry = {"name": "a.parquet", "rows": 10, "bytes": 999, "first_cell": 0, "last_cell": 3, "first_group": 0}
    meta = {
        "version": 4,
        "model": "resnet18",
        "dim": 512,
        "count": 17,
        "files": [
            entry,
            {**entry, "name": "b.parquet", "deleted": "_deleted/b.v4.npy", "deleted_rows": 3, "added_in": 2},
        ],
        "calibration": {"recall": 0.97, "target_recall": 0.95},
        "embedded_with": {"precision": "bf16"},
        "default_method": None,  # an index that named none searches with ivf
        "unknown_later_field": 1,
    }
    manifest = Manifest.of(meta)
    assert (manifest.version, manifest.count, manifest.default_method, manifest.catalog_bytes) == (4, 17, "ivf", 1998)
    assert manifest.files[0] == CatalogFile("a.parquet", 10, 999, 0, 3) and manifest.files[1].deleted_rows == 3
    assert manifest.files[1].added_in == 2 and manifest.files[0].deleted is None
    assert (manifest.calibrated_recall, manifest.target_recall) == (0.97, 0.95)
    assert manifest.made_with("precision") == "bf16" and manifest.made_with("backend") is None

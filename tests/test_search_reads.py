"""What a search reads: only the probed cells' row groups, queries from their footers, no needless Spark jobs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import force_plan, read_neighbours, row_groups_holding, search, write_embeddings

from jobs import ivf
from jobs.ivf.files import read_probed
from jobs.search import catalog as catalog_files
from jobs.search import queries as query_tables
from jobs.vectors import binary_from_matrix, gather_matrix
from scripts.vectors import clustered_unit_vectors


def test_the_tasks_read_their_queries_themselves_skipping_failed_rows_like_spark(spark, catalog, tmp_path, monkeypatch):
    folder, _, _, _ = catalog
    asked, _ = clustered_unit_vectors(40, dim=64, cluster_size=30, noise=0.5, seed=5)
    failed = np.arange(40) % 7 == 3  # an error, or no embedding: left out by both routes
    # written by pyarrow in two files of several row groups; the second from an older embed, without the columns
    # error and weights_sha256 (its failed rows have no embedding)
    (tmp_path / "q").mkdir()
    for part, rows in enumerate((slice(0, 25), slice(25, 40))):
        table = pa.table(
            {
                "image_id": [f"q{i}" for i in range(40)][rows],
                "path": [f"/q/{i}.jpg" for i in range(40)][rows],
                "label": pa.nulls(40, pa.string())[rows],
                "model": ["resnet18"] * (rows.stop - rows.start),
                "embedding": [None if failed[i] and (i % 2 or part) else asked[i].tolist() for i in range(40)][rows],
                "error": ["bad jpeg" if failed[i] else None for i in range(40)][rows],
                "weights_sha256": pa.nulls(40, pa.string())[rows],
            }
        )
        pq.write_table(
            table if part == 0 else table.drop_columns(["error", "weights_sha256"]),
            tmp_path / "q" / f"part-{part}.parquet",
            row_group_size=10,
        )
    listed = query_tables.QueryFiles.listed(spark, str(tmp_path / "q"))
    assert listed.rows == 40 and len(listed.groups) == 5 and {"error", "weights_sha256"} <= set(listed.columns)
    for tasks in (1, 3, 7):  # every row in exactly one run, the runs within a row of each other
        runs = listed.runs(tasks)
        numbered = sorted(qidx + row for run in runs for _, _, first, end, qidx, _ in run for row in range(first, end))
        sizes = [sum(end - first for _, _, first, end, _, _ in run) for run in runs]
        assert numbered == list(range(40)) and max(sizes) - min(sizes) <= 1
    own = search(spark, folder / "index", tmp_path / "own", "--queries", tmp_path / "q", "-k", "5")
    monkeypatch.setattr(
        query_tables.QueryFiles, "listed", classmethod(lambda cls, *args, **kwargs: None)
    )  # Spark reads the table
    before = newest_job(spark)
    shuffled = search(spark, folder / "index", tmp_path / "shuffled", "--queries", tmp_path / "q", "-k", "5")
    assert own["counts"]["queries"] == shuffled["counts"]["queries"] == 40 - failed.sum()
    columns = ["query_id", "rank", "neighbor_id", "distance"]
    answers = [read_neighbours(spark, tmp_path / out)[columns].reset_index(drop=True) for out in ("own", "shuffled")]
    assert set(answers[0]["query_id"]) == {f"q{i}" for i in np.flatnonzero(~failed)}
    pd.testing.assert_frame_equal(*answers)
    assert newest_job(spark) > before


@pytest.mark.parametrize("reader,routed", [("direct", False), ("direct", True), ("spark", False)])
def test_one_query_reads_only_the_files_and_row_groups_of_its_cells(
    spark, catalog, tmp_path, monkeypatch, reader, routed
):
    folder, vectors, _, ids = catalog
    index = ivf.load(spark, str(folder / "index"))
    if routed:  # the query goes to the ranges of cells it probes, as a big query set would
        force_plan(monkeypatch, 1, 3)
    summary = search(
        spark, folder / "index", tmp_path / "nb", "--query-ids", ids[7], "-k", "5", "--nprobe", "2", "--reader", reader
    )
    touched = summary["touched"]
    cells, _ = index.probe(vectors[7:8], 2, 5)
    files = [folder / "index" / "catalog" / f["name"] for f in index.meta["files"]]
    catalog_bytes = sum(f.stat().st_size for f in files)
    assert touched["catalog_bytes"] == catalog_bytes and touched["catalog_files"] == len(files)
    assert (
        touched["cells_probed"] == len(cells) == 2
        and touched["catalog_rows"] == 3000
        and ("routed" in touched["plan"]) == routed
    )
    assert (
        touched["catalog_rows_scanned"] == index.plan.sizes[cells].sum() < 100
    )  # only the probed cells' rows are scored
    # counted by the executors as they read: the footers of the files that hold the two cells, and their row groups
    total = sum(pq.ParquetFile(f).metadata.num_row_groups for f in files)
    assert 1 <= touched["row_groups_read"] == row_groups_holding(files, cells) <= 4 < total
    assert 0 < touched["catalog_bytes_read"] < 0.2 * catalog_bytes
    got = read_neighbours(spark, tmp_path / "nb")
    assert got["neighbor_id"].iloc[0] == ids[7] and len(got) == 5


def newest_job(spark) -> int:
    """The newest Spark job's id (Spark keeps a bounded list of jobs, so their number stops growing; this does not)."""
    return max(spark.sparkContext.statusTracker().getJobIdsForGroup(), default=-1)


def test_a_queries_table_is_counted_from_its_footers_without_a_spark_job(spark, tmp_path):
    ids = write_embeddings(spark, tmp_path / "q", np.eye(8, dtype=np.float32)[np.arange(37) % 8])
    before = newest_job(spark)
    assert before >= 0  # the table's write was seen, so a job run by the count would be too
    assert query_tables.table_source(spark, str(tmp_path / "q"), 8).count == len(ids) == 37
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
    assert (
        footer_schema(spark, str(tmp_path / "parted")) is None and footer_schema(spark, str(tmp_path / "text")) is None
    )


def test_catalog_files_read_ahead_in_threads_come_back_in_order_and_counted(spark, catalog):
    folder, *_ = catalog
    index = ivf.load(spark, str(folder / "index"))
    files = catalog_files.locate(spark, index)
    reader = catalog_files.CatalogFiles(
        index, files, catalog_files.ReadCounters.start(spark), catalog_files.ROW_COLUMNS
    )
    probed = np.zeros(index.cells, bool)
    probed[::3] = True
    got = list(reader.shards(probed))
    assert [file for file, _ in got] == sorted(file for file, _ in got) and len(got) == len(index.files_holding(probed))
    expected_bytes = 0
    for file, shard in got:
        table, keep, nbytes, _, _ = read_probed(
            files.filesystem(),
            f"{files.root}/{index.meta['files'][file]['name']}",
            probed,
            catalog_files.ROW_COLUMNS,
            None,
            np.empty(0, np.int64),
        )
        assert sorted(shard.rows.column("image_id").to_pylist()) == sorted(
            table.column("image_id").filter(pa.array(keep)).to_pylist()
        )
        assert set(shard.cells.tolist()) <= set(np.flatnonzero(probed).tolist())
        expected_bytes += nbytes
    assert sum(len(shard.order) for _, shard in got) == index.plan.sizes[probed].sum() > 0
    assert reader.counters.totals()["catalog_bytes_read"] == expected_bytes
    assert len(reader.footers) == len(got)  # kept for the next pass over these files
    reader.close()


def test_python_workers_get_4_kib_pages_kept_for_reuse_from_pyarrows_allocator(spark):
    def environment(batches):
        import os

        for batch in batches:
            yield pa.RecordBatch.from_pydict(
                {key: [os.environ.get(f"MIMALLOC_{key.upper()}")] * len(batch) for key in ("allow_thp", "purge_delay")}
            )

    assert spark.range(1).mapInArrow(environment, "allow_thp string, purge_delay string").first().asDict() == {
        "allow_thp": "0",
        "purge_delay": "-1",
    }


def test_gathering_vectors_from_a_chunked_column_picks_the_same_rows_as_combining_it():
    matrix = np.arange(7 * 3, dtype=np.float32).reshape(7, 3)
    chunked = pa.chunked_array(
        [binary_from_matrix(matrix[:2]), binary_from_matrix(matrix[2:2]), binary_from_matrix(matrix[2:])]
    )
    for rows in (None, np.array([0, 3, 4, 6]), np.array([6, 0, 5, 1]), np.array([], np.int64)):
        assert np.array_equal(gather_matrix(chunked, 3, rows), matrix if rows is None else matrix[rows])

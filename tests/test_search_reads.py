"""What a search reads: only the probed cells' row groups, queries from their footers, no needless Spark jobs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import read_neighbours, search, write_embeddings

from jobs import ivf
from jobs.search import direct, itself
from jobs.search import queries as query_tables
from jobs.vectors import binary_from_matrix, gather_matrix
from scripts.vectors import clustered_unit_vectors


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


def test_gathering_vectors_from_a_chunked_column_picks_the_same_rows_as_combining_it():
    matrix = np.arange(7 * 3, dtype=np.float32).reshape(7, 3)
    chunked = pa.chunked_array([binary_from_matrix(matrix[:2]), binary_from_matrix(matrix[2:2]), binary_from_matrix(matrix[2:])])
    for rows in (None, np.array([0, 3, 4, 6]), np.array([6, 0, 5, 1]), np.array([], np.int64)):
        assert np.array_equal(gather_matrix(chunked, 3, rows), matrix if rows is None else matrix[rows])

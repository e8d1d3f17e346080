"""Executors read the catalog's probed row groups themselves (pyarrow: local, S3, GCS), so an IVF search
shuffles only its queries: each probed file gets one task, which holds the file's probed rows and answers
the queries that visit it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pyspark import Accumulator
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from jobs.errors import UsageError
from jobs.filesystems import Location, location, opens
from jobs.ivf import Index
from jobs.partitions import partition_key
from jobs.runlog import get_logger
from jobs.search.results import PARTIAL_SCHEMA
from jobs.search.scoring import ROW_COLUMNS, ShardRows, Wanted

log = get_logger("jobs.search")
READ_ROWS = 8192  # catalog rows per batch of a scan (bounds the queries x rows distance matrix)
SPLIT_QUERIES = 10_000  # from this many queries on, a small catalog's files are scored by several tasks each


def locate(spark: SparkSession, index: Index) -> Location | None:
    """Where the executors can open the catalog with pyarrow, checked on one file; None where they cannot (Spark reads it)."""
    if not index.meta["files"]:
        return None
    files = location(spark, index.catalog_uri)
    return files if files is not None and opens(files, f"{files.root}/{index.meta['files'][0]['name']}") else None


def chosen(spark: SparkSession, index: Index, reader: str) -> Location | None:
    """The files the executors read for --reader (auto, direct, spark); None: Spark reads the catalog."""
    files = None if reader == "spark" else locate(spark, index)
    if reader == "direct" and files is None:
        raise UsageError(f"--reader direct: pyarrow cannot open {index.catalog_uri} here; use --reader spark")
    return files


def file_of_group(index: Index) -> np.ndarray:
    """The manifest position of the file that stores each group (the files hold ascending runs of groups)."""
    firsts = np.array([f["first_group"] for f in index.meta["files"]], np.int64)
    return np.maximum(np.searchsorted(firsts, np.arange(index.plan.groups), side="right") - 1, 0).astype(np.int32)


@dataclass
class ReadCounters:
    """What the executors read (catalog bytes, row groups, rows), added up by Spark accumulators."""

    bytes: Accumulator
    row_groups: Accumulator
    rows: Accumulator

    @classmethod
    def start(cls, spark: SparkSession) -> ReadCounters:
        return cls(*(spark.sparkContext.accumulator(0) for _ in range(3)))

    def add(self, nbytes: int, row_groups: int, rows: int) -> None:
        self.bytes.add(nbytes)
        self.row_groups.add(row_groups)
        self.rows.add(rows)

    def totals(self) -> dict[str, int]:
        return {"catalog_bytes_read": self.bytes.value, "row_groups_read": self.row_groups.value, "catalog_rows_scanned": self.rows.value}


@dataclass(frozen=True)
class Footer:
    """A catalog file's Parquet footer, its columns' positions and each row group's range of cells (a task that
    reads a file again reuses it)."""

    metadata: pq.FileMetaData
    columns: dict[str, int]
    lowest: np.ndarray
    highest: np.ndarray

    @classmethod
    def read(cls, parquet: pq.ParquetFile, cells: int) -> Footer:
        meta = parquet.metadata
        columns = {meta.row_group(0).column(c).path_in_schema: c for c in range(meta.num_columns)} if meta.num_row_groups else {}
        ranges = np.array([(0, cells - 1) if stats is None or not stats.has_min_max else (stats.min, stats.max)
                           for stats in (meta.row_group(g).column(columns["cell"]).statistics for g in range(meta.num_row_groups))], np.int64)
        return cls(meta, columns, *ranges.reshape(-1, 2).T)

    def bytes_of(self, row_groups: np.ndarray, columns: list[str]) -> int:
        """Footer and column chunk bytes of these row groups."""
        chunks = (self.metadata.row_group(int(g)).column(self.columns[c]) for g in row_groups for c in columns)
        return self.metadata.serialized_size + sum(chunk.total_compressed_size for chunk in chunks)


def read_probed(fs: pafs.FileSystem, path: str, probed: np.ndarray, footer: Footer | None = None) -> tuple[pa.Table, np.ndarray, int, int, Footer]:
    """The row groups of one catalog file whose cell range holds a probed cell (the file is sorted by cell), which of
    their rows are in probed cells (not filtered here: ShardRows.of copies the kept vectors once), the bytes (footer +
    column chunks) and row groups read, and the file's footer (given, or read here)."""
    probed_before = np.concatenate([[0], np.cumsum(probed)])  # probed cells below each cell number
    with fs.open_input_file(path) as handle:
        parquet = pq.ParquetFile(handle, pre_buffer=True, metadata=footer.metadata if footer else None)
        footer = footer or Footer.read(parquet, len(probed))
        chosen = np.flatnonzero(probed_before[footer.highest + 1] > probed_before[footer.lowest])
        if not len(chosen):
            return parquet.schema_arrow.empty_table().select(ROW_COLUMNS), np.zeros(0, bool), footer.metadata.serialized_size, 0, footer
        table = parquet.read_row_groups(chosen.tolist(), columns=ROW_COLUMNS)
    return table, probed[table.column("cell").to_numpy()], footer.bytes_of(chosen, ROW_COLUMNS), len(chosen), footer


def tasks_per_file(spark: SparkSession, probed_files: int, queries: int) -> int:
    """Tasks that share one probed file's visitors: with fewer files than two per core and at least SPLIT_QUERIES
    queries, each file's visitors are split (by query) so every core scores; each such task reads the file's
    probed rows itself (below that the scoring costs less than the extra reads and tasks: GloVe, 1,000 queries)."""
    cores = spark.sparkContext.defaultParallelism
    return max(1, -(-2 * cores // max(probed_files, 1))) if queries >= SPLIT_QUERIES else 1


def score_files(spark: SparkSession, index: Index, files: Location, assigned: DataFrame, probed_files: list[int], cells: list[int],
                wanted: Wanted, counters: ReadCounters, split: int = 1) -> DataFrame:
    """Candidates of every query: its visits are shuffled to the task that reads their file, `split` tasks a file
    (partitions file position x split + qidx mod split)."""
    names = [f["name"] for f in index.meta["files"]]
    probed = np.zeros(index.cells, bool)
    probed[cells] = True
    tasks = max(1, len(probed_files) * split)
    task_of_file = np.zeros(len(names), np.int32)
    task_of_file[probed_files] = np.arange(len(probed_files)) * split
    visitors = assigned.select(F.explode("visits").alias("visit"), "*").select(
        F.col("visit.shard").alias("file"), "qidx", F.col("query_id").alias("id"), F.col("query_path").alias("path"),
        F.col("query_label").alias("label"), F.col("visit.probes").alias("probes"), "vector")
    task = F.array(*[F.lit(int(t)) for t in task_of_file])[F.col("file")] + F.pmod(F.col("qidx"), F.lit(split)).cast("int")
    spread = visitors.repartition(tasks, partition_key(task, tasks))
    dim = index.dim

    def score(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        fs, current, held = None, None, None
        for batch in batches:
            if not len(batch):
                continue
            file = batch.column("file")[0].as_py()  # one file per task: partition_key places each file's visits exactly
            if file != current:
                fs = fs or files.filesystem(memory_map=True)
                table, keep, nbytes, row_groups, _ = read_probed(fs, f"{files.root}/{names[file]}", probed)
                counters.add(nbytes, row_groups, int(keep.sum()))
                current, held = file, ShardRows.of(table, dim, keep) if keep.any() else None
            if held is not None:
                yield held.answer(batch, wanted)

    return spread.mapInArrow(score, PARTIAL_SCHEMA)


def file_table(spark: SparkSession, index: Index) -> DataFrame:
    """One row per catalog file (its manifest position), each in a partition of its own: the input of a whole-catalog scan."""
    count = len(index.meta["files"])
    return spark.createDataFrame([(i,) for i in range(count)], "file int").repartition(count, partition_key(F.col("file"), count))


def file_reader(files: Location, index: Index, columns: list[str]) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """Executor side of a scan: the rows of the files named by the file_table batches, in Arrow batches of READ_ROWS."""
    names = [f["name"] for f in index.meta["files"]]

    def read(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        fs = files.filesystem(memory_map=True)
        for batch in batches:
            for file in batch.column("file").to_pylist():
                with fs.open_input_file(f"{files.root}/{names[file]}") as handle:
                    yield from pq.ParquetFile(handle, pre_buffer=True).iter_batches(batch_size=READ_ROWS, columns=columns)

    return read

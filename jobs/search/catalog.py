"""The catalog as an executor reads it: the files that hold a set of cells and, of those, only the row groups whose
cells are probed (a file is sorted by cell and its row groups end at cell boundaries), read a file ahead."""

from __future__ import annotations

import io
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pyspark import Accumulator, SparkFiles
from pyspark.sql import DataFrame, SparkSession

from jobs.errors import UsageError
from jobs.filesystems import Location, location, opens
from jobs.ivf import Index
from jobs.runlog import Stopwatch, get_logger
from jobs.search.scoring import ShardRows

log = get_logger("jobs.search")
ROW_COLUMNS = ["cell", "image_id", "path", "label", "vector"]
READ_AHEAD = (
    2  # files read at once in threads beside the scoring (pyarrow lets go of the GIL while it reads and decodes)
)
SHIPPED = "shipped"  # Location kind: the catalog copied to every executor by Spark (SparkContext.addFile)


def locate(spark: SparkSession, index: Index, reader: str = "auto") -> Location:
    """Where the executors open the catalog's files: with pyarrow where it can (local, s3a/s3, gs; checked on one
    file), else copies that Spark ships to every executor (any Hadoop filesystem; --reader spark forces it)."""
    if reader != "spark" and index.meta["files"]:
        files = location(spark, index.catalog_uri)
        if files is not None and opens(files, f"{files.root}/{index.meta['files'][0]['name']}"):
            return files
    if reader == "direct":
        raise UsageError(f"--reader direct: pyarrow cannot open {index.catalog_uri} here; use --reader spark")
    size = sum(f["bytes"] for f in index.meta["files"]) / 2**20
    log.info(
        "the executors cannot open %s with pyarrow: Spark copies its %.0f MiB to every executor first",
        index.catalog_uri,
        size,
    )
    spark.sparkContext.addFile(index.catalog_uri, recursive=True)
    return Location(SHIPPED, index.catalog_uri.rstrip("/").rsplit("/", 1)[-1])


@dataclass
class ReadCounters:
    """What the executors read (catalog bytes, row groups, rows kept), added up by Spark accumulators."""

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
        return {
            "catalog_bytes_read": self.bytes.value,
            "row_groups_read": self.row_groups.value,
            "catalog_rows_scanned": self.rows.value,
        }


@dataclass(frozen=True)
class Footer:
    """A catalog file's Parquet footer, its columns' positions and each row group's range of cells."""

    metadata: pq.FileMetaData
    columns: dict[str, int]
    lowest: np.ndarray
    highest: np.ndarray

    @classmethod
    def read(cls, parquet: pq.ParquetFile, cells: int) -> Footer:
        meta = parquet.metadata
        columns = (
            {meta.row_group(0).column(c).path_in_schema: c for c in range(meta.num_columns)}
            if meta.num_row_groups
            else {}
        )
        stats = (meta.row_group(g).column(columns["cell"]).statistics for g in range(meta.num_row_groups))
        ranges = np.array(
            [(0, cells - 1) if s is None or not s.has_min_max else (s.min, s.max) for s in stats], np.int64
        )
        return cls(meta, columns, *ranges.reshape(-1, 2).T)

    def row_numbers(self, row_groups: np.ndarray) -> np.ndarray:
        """The file's row numbers of these row groups' rows, in order."""
        sizes = np.array([self.metadata.row_group(g).num_rows for g in range(self.metadata.num_row_groups)], np.int64)
        starts = np.concatenate([[0], np.cumsum(sizes)])
        return np.concatenate([np.arange(starts[g], starts[g + 1]) for g in row_groups])

    def bytes_of(self, row_groups: np.ndarray, columns: list[str]) -> int:
        """Footer and column chunk bytes of these row groups."""
        chunks = (
            self.metadata.row_group(int(g)).column(self.columns[c])
            for g in row_groups
            for c in columns
            if c in self.columns
        )
        return self.metadata.serialized_size + sum(chunk.total_compressed_size for chunk in chunks)


def read_probed(
    fs: pafs.FileSystem, path: str, probed: np.ndarray, columns: list[str], footer: Footer | None, deleted: np.ndarray
) -> tuple[pa.Table, np.ndarray, int, int, Footer]:
    """A file's row groups whose cell range holds a probed cell, which of their rows are in probed cells and not
    deleted (`deleted`: sorted row numbers in the file), the bytes (footer + column chunks) and row groups read, and
    the file's footer (given, or read here)."""
    probed_before = np.concatenate([[0], np.cumsum(probed)])  # probed cells below each cell number
    with fs.open_input_file(path) as handle:
        parquet = pq.ParquetFile(handle, pre_buffer=True, metadata=footer.metadata if footer else None)
        footer = footer or Footer.read(parquet, len(probed))
        chosen = np.flatnonzero(probed_before[footer.highest + 1] > probed_before[footer.lowest])
        empty = parquet.schema_arrow.empty_table().select(columns)
        if not len(chosen):
            return empty, np.zeros(0, bool), footer.metadata.serialized_size, 0, footer
        # one batch across the row groups: its vector column is one buffer, which the scoring views without a copy
        rows = sum(footer.metadata.row_group(int(g)).num_rows for g in chosen)
        batches = list(parquet.iter_batches(batch_size=max(rows, 1), row_groups=chosen.tolist(), columns=columns))
        table = pa.Table.from_batches(batches, empty.schema)
    keep = probed[table.column("cell").to_numpy()]
    if len(deleted):
        keep &= ~np.isin(footer.row_numbers(chosen), deleted, assume_unique=True)
    return table, keep, footer.bytes_of(chosen, columns), len(chosen), footer


def deletions(fs: pafs.FileSystem, root: str, entry: dict) -> np.ndarray:
    """The sorted row numbers deleted from a catalog file (its manifest entry names the file that lists them)."""
    if not entry.get("deleted"):
        return np.empty(0, np.int64)
    with fs.open_input_file(f"{root}/{entry['deleted']}") as handle:
        return np.load(io.BytesIO(handle.read()), allow_pickle=False)


class CatalogFiles:
    """The catalog's files as one task reads them: which hold a set of cells, and their probed rows as shards."""

    def __init__(
        self, index: Index, files: Location, counters: ReadCounters, columns: list[str], watch: Stopwatch | None = None
    ) -> None:
        self.index, self.counters, self.columns, self.watch = index, counters, columns, watch or Stopwatch()
        self.root = SparkFiles.get(files.root) if files.kind == SHIPPED else files.root
        self.fs = files.filesystem(memory_map=True)
        self.entries = index.meta["files"]
        self.footers: dict[int, Footer] = {}  # a file read again, for the next chunk of queries, skips its footer
        self.deleted: dict[int, np.ndarray] = {}
        self.reader = ThreadPoolExecutor(READ_AHEAD, thread_name_prefix="catalog-read")

    def shards(self, probed: np.ndarray) -> Iterator[tuple[int, ShardRows]]:
        """Each file holding a probed cell, in order, with its rows of probed cells; READ_AHEAD files are read ahead."""
        pending: deque[tuple[int, Future]] = deque()
        for file in self.index.files_holding(probed).tolist():
            if file not in self.deleted:
                self.deleted[file] = deletions(self.fs, self.root, self.entries[file])
            path = f"{self.root}/{self.entries[file]['name']}"
            read = self.reader.submit(
                read_probed, self.fs, path, probed, self.columns, self.footers.get(file), self.deleted[file]
            )
            pending.append((file, read))
            if len(pending) > READ_AHEAD:
                yield self.taken(*pending.popleft())
        while pending:
            yield self.taken(*pending.popleft())

    def taken(self, file: int, read: Future) -> tuple[int, ShardRows]:
        """A finished read as a shard, its footer kept and its bytes counted (here, in the task's own thread)."""
        with self.watch("waiting for the catalog"):
            table, keep, nbytes, row_groups, footer = read.result()
        self.footers[file] = footer
        self.counters.add(nbytes, row_groups, int(keep.sum()))
        with self.watch("gathering"):
            return file, ShardRows.of(table, self.index.dim, keep)

    def close(self) -> None:
        self.reader.shutdown(wait=False, cancel_futures=True)


SPARK_TYPES = {
    "group": "int",
    "cell": "int",
    "image_id": "string",
    "path": "string",
    "label": "string",
    "vector": "binary",
    "fingerprint": "bigint",
    "buckets": "array<bigint>",
}


def live_rows(
    spark: SparkSession,
    index: Index,
    files: Location,
    columns: list[str],
    which: list[int] | None = None,
    positions: bool = False,
) -> DataFrame:
    """The rows of the catalog files the manifest holds (`which` of them), less those it deleted, these columns, one
    task a file; with positions, each row's file (its manifest position) and row number in it."""
    entries = index.meta["files"]
    which = list(range(len(entries))) if which is None else which

    def read(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        fs = files.filesystem(memory_map=True)
        root = SparkFiles.get(files.root) if files.kind == SHIPPED else files.root
        for number in (which[n] for batch in batches for n in batch.column("id").to_pylist()):
            deleted = deletions(fs, root, entries[number])
            with fs.open_input_file(f"{root}/{entries[number]['name']}") as handle:
                table = pq.read_table(handle, columns=columns)
            if positions:
                table = table.append_column("file", pa.array(np.full(table.num_rows, number, np.int32)))
                table = table.append_column("row", pa.array(np.arange(table.num_rows, dtype=np.int64)))
            if len(deleted):
                table = table.filter(pa.array(~np.isin(np.arange(table.num_rows), deleted)))
            yield from table.to_batches(max_chunksize=1 << 15)

    schema = ", ".join(
        [f"{column} {SPARK_TYPES[column]}" for column in columns] + (["file int", "row bigint"] if positions else [])
    )
    return spark.range(len(which), numPartitions=max(1, len(which))).mapInArrow(read, schema)

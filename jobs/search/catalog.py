"""The catalog as an executor reads it: the files that hold a set of cells and, of those, only the row groups whose
cells are probed (a file is sorted by cell and its row groups end at cell boundaries), read a file ahead."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pyspark import Accumulator, SparkFiles
from pyspark.sql import SparkSession

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
    fs: pafs.FileSystem, path: str, probed: np.ndarray, columns: list[str], footer: Footer | None
) -> tuple[pa.Table, np.ndarray, int, int, Footer]:
    """A file's row groups whose cell range holds a probed cell, which of their rows are in probed cells, the bytes
    (footer + column chunks) and row groups read, and the file's footer (given, or read here)."""
    probed_before = np.concatenate([[0], np.cumsum(probed)])  # probed cells below each cell number
    with fs.open_input_file(path) as handle:
        parquet = pq.ParquetFile(handle, pre_buffer=True, metadata=footer.metadata if footer else None)
        footer = footer or Footer.read(parquet, len(probed))
        chosen = np.flatnonzero(probed_before[footer.highest + 1] > probed_before[footer.lowest])
        if not len(chosen):
            return (
                parquet.schema_arrow.empty_table().select(columns),
                np.zeros(0, bool),
                footer.metadata.serialized_size,
                0,
                footer,
            )
        table = parquet.read_row_groups(chosen.tolist(), columns=columns)
    return table, probed[table.column("cell").to_numpy()], footer.bytes_of(chosen, columns), len(chosen), footer


class CatalogFiles:
    """The catalog's files as one task reads them: which hold a set of cells, and their probed rows as shards."""

    def __init__(
        self, index: Index, files: Location, counters: ReadCounters, columns: list[str], watch: Stopwatch | None = None
    ) -> None:
        self.index, self.counters, self.columns, self.watch = index, counters, columns, watch or Stopwatch()
        self.root = SparkFiles.get(files.root) if files.kind == SHIPPED else files.root
        self.fs = files.filesystem(memory_map=True)
        self.file_of_group = index.file_of_group()
        self.names = [f["name"] for f in index.meta["files"]]
        self.footers: dict[int, Footer] = {}  # a file read again, for the next chunk of queries, skips its footer
        self.reader = ThreadPoolExecutor(READ_AHEAD, thread_name_prefix="catalog-read")

    def holding(self, cells: np.ndarray) -> np.ndarray:
        return (
            np.unique(self.file_of_group[self.index.plan.groups_of(cells.tolist())])
            if len(cells)
            else np.empty(0, np.int64)
        )

    def shards(self, probed: np.ndarray) -> Iterator[tuple[int, ShardRows]]:
        """Each file holding a probed cell, in order, with its rows of probed cells; READ_AHEAD files are read ahead."""
        pending: deque[tuple[int, Future]] = deque()
        for file in self.holding(np.flatnonzero(probed)).tolist():
            path = f"{self.root}/{self.names[file]}"
            pending.append(
                (file, self.reader.submit(read_probed, self.fs, path, probed, self.columns, self.footers.get(file)))
            )
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

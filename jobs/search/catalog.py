"""The catalog as an executor reads it: the files that hold a set of cells and, of those, only the row groups whose
cells are probed (a file is sorted by cell and its row groups end at cell boundaries), read a file ahead."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from pyspark import Accumulator
from pyspark.sql import SparkSession

from jobs.errors import UsageError
from jobs.filesystems import SHIPPED, Location, location, opens
from jobs.ivf import Index
from jobs.ivf.files import Footer, deletions, read_probed
from jobs.runlog import Stopwatch, get_logger
from jobs.search.scoring import ShardRows

log = get_logger("jobs.search")
ROW_COLUMNS = ["cell", "image_id", "path", "label", "vector"]
READ_AHEAD = (
    2  # files read at once in threads beside the scoring (pyarrow lets go of the GIL while it reads and decodes)
)


def locate(spark: SparkSession, index: Index, reader: str = "auto") -> Location:
    """Where the executors open the catalog's files: with pyarrow where it can (local, s3a/s3, gs; checked on one
    file), else copies that Spark ships to every executor (any Hadoop filesystem; --reader spark forces it)."""
    if reader != "spark" and index.manifest.files:
        files = location(spark, index.catalog_uri)
        if files is not None and opens(files, f"{files.root}/{index.manifest.files[0].name}"):
            return files
    if reader == "direct":
        raise UsageError(f"--reader direct: pyarrow cannot open {index.catalog_uri} here; use --reader spark")
    size = index.catalog_bytes / 2**20
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


class CatalogFiles:
    """The catalog's files as one task reads them: which hold a set of cells, and their probed rows as shards."""

    def __init__(
        self, index: Index, files: Location, counters: ReadCounters, columns: list[str], watch: Stopwatch | None = None
    ) -> None:
        self.index, self.counters, self.columns, self.watch = index, counters, columns, watch or Stopwatch()
        self.root = files.opened_root()
        self.fs = files.filesystem(memory_map=True)
        self.entries = index.manifest.files
        self.footers: dict[int, Footer] = {}  # a file read again, for the next chunk of queries, skips its footer
        self.deleted: dict[int, np.ndarray] = {}
        self.reader = ThreadPoolExecutor(READ_AHEAD, thread_name_prefix="catalog-read")

    def shards(self, probed: np.ndarray) -> Iterator[tuple[int, ShardRows]]:
        """Each file holding a probed cell, in order, with its rows of probed cells; READ_AHEAD files are read ahead."""
        pending: deque[tuple[int, Future]] = deque()
        for file in self.index.files_holding(probed).tolist():
            if file not in self.deleted:
                self.deleted[file] = deletions(self.fs, self.root, self.entries[file])
            path = f"{self.root}/{self.entries[file].name}"
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

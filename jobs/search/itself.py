"""The catalog searched against itself (--all, --duplicates) without moving it: one task per catalog file takes
that file's rows as its queries (in chunks that fit in memory), probes them all, then streams the catalog
once, file by file, reading only the row groups of the cells the chunk probes, and scores each file's cells
against the queries that probe them. Each catalog row is read once per chunk, no query is shuffled and no
top-k is merged: a running top-k per query keeps the neighbours' strings as they enter.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pyspark import Accumulator, TaskContext
from pyspark.sql import DataFrame, SparkSession

from jobs.filesystems import Location
from jobs.ivf import Index
from jobs.knn import ranks_in_runs, squared_norms
from jobs.runlog import get_logger
from jobs.search import direct
from jobs.search.cells import Probed, ProbedParam
from jobs.search.direct import ReadCounters
from jobs.search.results import NEIGHBOUR_COLUMNS, PARTIAL_SCHEMA, nearest_per_query, partial_batch
from jobs.search.scoring import ROW_COLUMNS, ShardRows, TopK, Wanted, asked
from jobs.tables import NEIGHBOURS_SCHEMA
from jobs.vectors import binary_from_values, matrix_from_binary

CHUNK_BYTES = 128 * 2**20  # a task's queries answered in one pass over the catalog (vectors + ~100 bytes of strings a row)
PROGRESS_SECONDS = 30  # a task logs how far it is at most this often
FILE_ROW = 1 << 32  # running top-k rows: (catalog file + 1) * FILE_ROW + position while that file is held, else a kept-row number
READ_THREADS = 2  # catalog files a task reads at once, beside its scoring
FOOTERS_HELD = 256  # catalog files whose footers a task keeps (a file read again, for another run of queries, skips its footer)


@dataclass
class CatalogFiles:
    """The catalog's files as an executor reads them: which hold a set of cells, and their rows of those cells."""

    index: Index
    files: Location
    counters: ReadCounters
    fs: pafs.FileSystem

    def __post_init__(self) -> None:
        self.file_of_group = direct.file_of_group(self.index)
        self.names = [f["name"] for f in self.index.meta["files"]]
        self.footers: dict[int, direct.Footer] = {}
        self.reader = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="catalog-read")

    def holding(self, cells: np.ndarray) -> np.ndarray:
        return np.unique(self.file_of_group[self.index.plan.groups_of(cells.tolist())])

    def rows(self, files: np.ndarray, probed: np.ndarray, at_once: int = 1) -> Iterator[tuple[int, pa.Table, np.ndarray]]:
        """Each file's probed row groups, and which of their rows are in probed cells, in the files' order; `at_once`
        files are read at a time in threads beside the caller (pyarrow lets go of the GIL while it reads and decodes)."""
        pending: deque[tuple[int, Future]] = deque()
        for file in files.tolist():
            path = f"{self.files.root}/{self.names[file]}"
            pending.append((file, self.reader.submit(direct.read_probed, self.fs, path, probed, self.footers.pop(file, None))))
            if len(pending) > at_once:
                yield self.taken(*pending.popleft())
        while pending:
            yield self.taken(*pending.popleft())

    def taken(self, file: int, read: Future) -> tuple[int, pa.Table, np.ndarray]:
        """A finished read, its footer kept and its bytes counted (here, in the task's own thread)."""
        table, keep, nbytes, row_groups, footer = read.result()
        self.footers[file] = footer  # most recently used last
        if len(self.footers) > FOOTERS_HELD:
            del self.footers[next(iter(self.footers))]
        self.counters.add(nbytes, row_groups, int(keep.sum()))
        return file, table, keep

    def read(self, files: np.ndarray, probed: np.ndarray) -> Iterator[tuple[int, ShardRows]]:
        """Each file's probed rows as a shard, the next file read while the caller scores one."""
        for file, table, keep in self.rows(files, probed):
            yield file, ShardRows.of(table, self.index.dim, keep)


@dataclass
class Kept:
    """The id, path, label and squared norm of the rows a running top-k holds, gathered as they enter it."""

    rows: pa.Table = field(default_factory=lambda: pa.table({c: pa.array([], pa.string()) for c in ("image_id", "path", "label")}))
    squares: np.ndarray = field(default_factory=lambda: np.empty(0, np.float32))

    def take_in(self, keep: TopK, held: ShardRows) -> None:
        """Copy the held file's rows that entered keep, renumber them as kept rows, and drop kept rows pushed out since."""
        entered = keep.rows >= FILE_ROW
        positions = (keep.rows[entered] % FILE_ROW).astype(np.int64)
        new = held.rows.select(["image_id", "path", "label"]).take(pa.array(held.order[positions]))
        keep.rows[entered] = self.rows.num_rows + np.arange(len(positions))
        self.rows = pa.concat_tables([self.rows, pa.Table.from_batches([new])])
        self.squares = np.concatenate([self.squares, held.squares[positions]])
        used = np.unique(keep.rows[keep.rows >= 0])
        if len(used) * 2 < self.rows.num_rows:
            self.rows, self.squares = self.rows.take(pa.array(used)), self.squares[used]
            placed = keep.rows >= 0
            keep.rows[placed] = np.searchsorted(used, keep.rows[placed])

    def batch(self) -> pa.RecordBatch:
        return pa.RecordBatch.from_arrays([c.combine_chunks() for c in self.rows.columns], names=self.rows.column_names)


def ranked(partials: pa.RecordBatch, k: int) -> pa.RecordBatch:
    """Complete candidates as neighbours rows: the k nearest of each query, ranked 1..k (ties by id)."""
    best = nearest_per_query(pa.Table.from_batches([partials]), k)
    rank = pa.array(ranks_in_runs(best.column("qidx").to_numpy()).astype(np.int32) + 1)
    best = best.append_column("rank", rank)
    return pa.RecordBatch.from_arrays([best.column(c).combine_chunks() for c in NEIGHBOUR_COLUMNS], names=NEIGHBOUR_COLUMNS)


@dataclass
class CatalogSearch:
    """A planned search of the catalog against itself: the found table, and what it read once that is written."""

    found: DataFrame
    seen: Accumulator
    counters: ReadCounters
    planned: dict

    def touched(self) -> dict:
        cells = self.seen.value.probed_cells()
        return {**self.planned, "cells_probed": len(cells), **self.counters.totals()}


def search(spark: SparkSession, index: Index, files: Location, nprobe: int, wanted: Wanted, chunk_rows: int | None = None) -> CatalogSearch:
    """Every catalog row's k nearest (neighbours rows) or, with wanted.min_similarity, its similar rows (partials)."""
    shipped = spark.sparkContext.broadcast(index)
    counters = ReadCounters.start(spark)
    seen = spark.sparkContext.accumulator(Probed(), ProbedParam())
    enough = 0 if wanted.min_similarity is not None else wanted.k + (1 if wanted.exclude_self else 0)
    names = [f["name"] for f in index.meta["files"]]
    chunk_rows = chunk_rows or max(1024, CHUNK_BYTES // (4 * index.dim + 100))
    task_log = get_logger("jobs.search.task")

    def answer(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        idx = shipped.value
        catalog = CatalogFiles(idx, files, counters, files.filesystem(memory_map=True))
        probed, rows = Probed(np.zeros(idx.cells, bool)), 0
        for file in (f for batch in batches for f in batch.column("file").to_pylist()):
            started, logged = time.perf_counter(), time.perf_counter()
            with catalog.fs.open_input_file(f"{files.root}/{names[file]}") as handle:
                own = pq.read_table(handle, columns=ROW_COLUMNS)
            counters.add(idx.meta["files"][file]["bytes"], 0, 0)
            for first in range(0, own.num_rows, chunk_rows):
                chunk = own.slice(first, chunk_rows).combine_chunks().to_batches()[0]
                vectors = matrix_from_binary(chunk.column("vector"), idx.dim)
                cells, offsets = idx.probe(vectors, nprobe, enough)
                probed.cells[cells] = True
                queries = pa.RecordBatch.from_arrays(
                    [pa.array(np.arange(first, first + len(chunk), dtype=np.int64) + (file << 32)), chunk.column("image_id"), chunk.column("path"),
                     chunk.column("label"), chunk.column("vector"), binary_from_values(cells, offsets), chunk.column("cell")],
                    names=["qidx", "id", "path", "label", "vector", "probes", "own_cell"])
                for done, found in enumerate(answer_chunk(catalog, queries, vectors, np.unique(cells), wanted)):
                    if found is not None:
                        yield found
                    if time.perf_counter() - logged > PROGRESS_SECONDS:
                        logged = time.perf_counter()
                        task_log.info("catalog file %d of %d: rows %d-%d of %d, %d catalog files scored against them", file + 1, len(names), first + 1,
                                      first + len(chunk), own.num_rows, done + 1)
            rows += own.num_rows
            task_log.info("catalog file %d of %d done: %d rows in %.1f s", file + 1, len(names), own.num_rows, time.perf_counter() - started)
        probed.rows[TaskContext.get().partitionId()] = rows
        seen.add(probed)

    schema = PARTIAL_SCHEMA if wanted.min_similarity is not None else NEIGHBOURS_SCHEMA
    found = direct.file_table(spark, index).mapInArrow(answer, schema)
    planned = {"cells": index.cells, "catalog_rows": int(index.plan.sizes.sum()), "catalog_files": len(names),
               "catalog_files_read": len(names), "catalog_bytes": sum(f["bytes"] for f in index.meta["files"]), "reader": "executors, file by file"}
    return CatalogSearch(found, seen, counters, planned)


def answer_chunk(catalog: CatalogFiles, queries: pa.RecordBatch, vectors: np.ndarray, cells: np.ndarray, wanted: Wanted) -> Iterator[pa.RecordBatch | None]:
    """One pass over the catalog files holding the probed cells: after each file, its similar pairs (or None);
    with a top-k wanted, the chunk's ranked neighbours after the last."""
    probed = np.zeros(catalog.index.cells, bool)
    probed[cells] = True
    keep, kept = TopK(len(queries), wanted.k), Kept()
    for file, held in catalog.read(catalog.holding(cells), probed):
        if wanted.min_similarity is not None:
            yield held.answer(queries, wanted)
            continue
        held.score(keep, vectors, queries, wanted, base=(file + 1) * FILE_ROW)
        kept.take_in(keep, held)
        yield None
    if wanted.min_similarity is None:
        q, rows, d2 = keep.found()
        yield ranked(partial_batch(asked(queries), q, squared_norms(vectors), kept.batch(), rows, kept.squares, d2), wanted.k)

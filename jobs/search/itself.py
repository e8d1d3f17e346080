"""The catalog searched against itself (--all, --duplicates) without moving it: one task per catalog file takes
that file's rows as its queries, block by block, reads the row groups of the cells a block probes from every
file with pyarrow, and answers the block completely, so no query is shuffled and no top-k is merged.

The file is sorted by cell and cells are numbered in locality order, so neighbouring blocks probe mostly the
same cells: the rows held for one block are kept for the next and only the new cells are read.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pyspark import Accumulator, TaskContext
from pyspark.sql import DataFrame, SparkSession

from jobs.filesystems import Location
from jobs.ivf import Index
from jobs.knn import ranks_in_runs
from jobs.runlog import get_logger
from jobs.search import direct
from jobs.search.cells import Probed, ProbedParam
from jobs.search.direct import ReadCounters
from jobs.search.results import NEIGHBOUR_COLUMNS, PARTIAL_SCHEMA, nearest_per_query
from jobs.search.scoring import ROW_COLUMNS, ShardRows, Wanted
from jobs.tables import NEIGHBOURS_SCHEMA
from jobs.vectors import binary_from_values, matrix_from_binary

BLOCK_ROWS = 4096  # a file's rows answered together (they probe mostly the same cells)
PROGRESS_SECONDS = 30  # a task logs how far into its file it is at most this often
HELD_BYTES = 256 * 2**20  # most catalog bytes held for one block (vectors + ~100 bytes of id, path and label a row): more splits the block


@dataclass
class HeldCells:
    """The catalog rows of the cells the last block probed, read from whichever files hold them."""

    fs: pafs.FileSystem
    files: Location
    index: Index
    file_of_group: np.ndarray
    counters: ReadCounters
    cells: np.ndarray
    table: pa.Table | None = None

    def rows(self, cells: np.ndarray) -> ShardRows:
        """The rows of these cells (ascending, unique), reading only the cells not held already."""
        kept = self.table.filter(pa.array(np.isin(self.table.column("cell").to_numpy(), cells))) if self.table is not None else None
        new = np.setdiff1d(cells, self.cells, assume_unique=True)
        wanted = np.zeros(self.index.cells, bool)
        wanted[new] = True
        parts = [kept] if kept is not None else []
        names = [f["name"] for f in self.index.meta["files"]]
        for file in np.unique(self.file_of_group[self.index.plan.groups_of(new.tolist())]) if len(new) else []:
            table, nbytes, row_groups = direct.read_probed(self.fs, f"{self.files.root}/{names[file]}", wanted)
            self.counters.add(nbytes, row_groups, table.num_rows)
            parts.append(table)
        self.cells = cells
        self.table = pa.concat_tables(parts) if parts else None
        return ShardRows.of(self.table, self.index.dim)


def ranked(partials: pa.RecordBatch, k: int) -> pa.RecordBatch:
    """A block's complete candidates as neighbours rows: the k nearest of each query, ranked 1..k (ties by id)."""
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


def search(spark: SparkSession, index: Index, files: Location, nprobe: int, wanted: Wanted, block_rows: int = BLOCK_ROWS,
           held_rows: int | None = None) -> CatalogSearch:
    """Every catalog row's k nearest (neighbours rows) or, with wanted.min_similarity, its similar rows (partials)."""
    held_rows = held_rows or HELD_BYTES // (4 * index.dim + 100)
    shipped = spark.sparkContext.broadcast(index)
    file_of_group = direct.file_of_group(index)
    counters = ReadCounters.start(spark)
    seen = spark.sparkContext.accumulator(Probed(), ProbedParam())
    enough = 0 if wanted.min_similarity is not None else wanted.k + (1 if wanted.exclude_self else 0)
    names = [f["name"] for f in index.meta["files"]]
    sizes = [f["rows"] for f in index.meta["files"]]
    task_log = get_logger("jobs.search.task")

    def answer(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        idx, fs = shipped.value, files.filesystem()
        held = HeldCells(fs, files, idx, file_of_group, counters, np.empty(0, np.int32))
        probed, rows = Probed(np.zeros(idx.cells, bool)), 0
        for file in (f for batch in batches for f in batch.column("file").to_pylist()):
            counters.add(idx.meta["files"][file]["bytes"], 0, 0)
            started, logged, first = time.perf_counter(), time.perf_counter(), rows
            with fs.open_input_file(f"{files.root}/{names[file]}") as handle:
                for block in pq.ParquetFile(handle).iter_batches(batch_size=block_rows, columns=ROW_COLUMNS):
                    vectors = matrix_from_binary(block.column("vector"), idx.dim)
                    cells, offsets = idx.probe(vectors, nprobe, enough)
                    probed.cells[cells] = True
                    first_qidx = (file << 32) + rows - first
                    rows += len(block)
                    for found in answer_block(held, block, first_qidx, cells, offsets, wanted, held_rows):
                        yield ranked(found, wanted.k) if wanted.min_similarity is None else found
                    if time.perf_counter() - logged > PROGRESS_SECONDS:
                        logged = time.perf_counter()
                        task_log.info("catalog file %d of %d: %d of %d rows answered, %.0f rows/s", file + 1, len(names), rows - first,
                                      sizes[file], (rows - first) / (logged - started))
            task_log.info("catalog file %d of %d done: %d rows in %.1f s", file + 1, len(names), rows - first, time.perf_counter() - started)
        probed.rows[TaskContext.get().partitionId()] = rows
        seen.add(probed)

    schema = PARTIAL_SCHEMA if wanted.min_similarity is not None else NEIGHBOURS_SCHEMA
    found = direct.file_table(spark, index).mapInArrow(answer, schema)
    planned = {"cells": index.cells, "catalog_rows": int(index.plan.sizes.sum()), "catalog_files": len(names),
               "catalog_files_read": len(names), "catalog_bytes": sum(f["bytes"] for f in index.meta["files"]), "reader": "executors, file by file"}
    return CatalogSearch(found, seen, counters, planned)


def answer_block(held: HeldCells, block: pa.RecordBatch, first_qidx: int, cells: np.ndarray, offsets: np.ndarray,
                 wanted: Wanted, held_rows: int) -> Iterator[pa.RecordBatch]:
    """Candidates of a block of catalog rows (its probes as CSR cells/offsets), halving it while its cells hold too many rows."""
    needed = np.unique(cells)
    if len(block) > 1 and held.index.plan.sizes[needed].sum() > held_rows:
        half = len(block) // 2
        yield from answer_block(held, block.slice(0, half), first_qidx, cells[: offsets[half]], offsets[: half + 1], wanted, held_rows)
        yield from answer_block(held, block.slice(half), first_qidx + half, cells[offsets[half] :], offsets[half:] - offsets[half], wanted, held_rows)
        return
    queries = pa.RecordBatch.from_arrays(
        [pa.array(np.arange(first_qidx, first_qidx + len(block), dtype=np.int64)), block.column("image_id"), block.column("path"),
         block.column("label"), block.column("vector"), binary_from_values(cells, offsets), block.column("cell")],
        names=["qidx", "id", "path", "label", "vector", "probes", "own_cell"])
    yield held.rows(needed).answer(queries, wanted)

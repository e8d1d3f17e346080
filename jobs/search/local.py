"""Small searches answered where their queries are: each task probes its own queries, reads the probed row
groups of the catalog files that hold their cells, holds them as one shard and writes their ranked neighbours.

Nothing is shuffled and there is no probe pass or top-k merge of its own, which is most of what one photo or a
few thousand queries cost (cells.py's plan). The price is that every task reads its queries' cells itself, so
the plan is taken only while all the tasks together are expected to read at most LOCAL_READ_BYTES.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from pyspark import TaskContext
from pyspark.sql import DataFrame, SparkSession

from jobs.filesystems import Location
from jobs.ivf import Index
from jobs.runlog import get_logger
from jobs.search import direct
from jobs.search.cells import Probed, ProbedParam
from jobs.search.direct import ReadCounters
from jobs.search.itself import CHUNK_BYTES, READ_THREADS, CatalogFiles, CatalogSearch, ranked
from jobs.search.queries import QueryFiles
from jobs.search.scoring import ShardRows, Wanted
from jobs.tables import NEIGHBOURS_SCHEMA
from jobs.vectors import binary_from_values, gather_matrix, pooled_matrix

HOLD_BYTES = 128 << 20  # catalog rows a task holds at once (estimated from the cells' sizes)
# above this (all tasks together, expected) shuffling queries to files and merging costs less (1M x 512-d, 1,000
# queries: an expected 0.85 GiB took 12.5 s in their own task, 14.4 s shuffled; 1.4 GiB 16.2 s against 15.1 s)
LOCAL_READ_BYTES = 1 << 30
# from this many queries on, they are spread over twice the cores, each task reading its own queries' cells
SPREAD_QUERIES = 4096
# below it, over the cores where one task would read more than this: the tasks read in parallel, and a second worker
# starts on a core that would wait (1,000 queries, 2 cores: 1M x 512-d 4.0 -> 3.7 s of search, GloVe 300k 4.3 -> 3.9 s)
SPREAD_READ_BYTES = 32 << 20


def expected_read(index: Index, queries: int, tasks: int, nprobe: int) -> float:
    """Catalog bytes `tasks` tasks of queries / tasks queries each are expected to read (each probes nprobe of the cells)."""
    catalog = sum(f["bytes"] for f in index.meta["files"])
    return tasks * catalog * -math.expm1(-queries / max(tasks, 1) * nprobe / max(index.cells, 1))


def tasks_for(spark: SparkSession, index: Index, queries: int, nprobe: int) -> int:
    """Twice the cores from SPREAD_QUERIES queries on; below, one task a core where a single task would read over
    SPREAD_READ_BYTES (each task's queries read by the task: no shuffle), else one task."""
    cores = spark.sparkContext.defaultParallelism
    if queries >= SPREAD_QUERIES:
        return 2 * cores
    return max(1, min(cores, queries)) if expected_read(index, queries, 1, nprobe) > SPREAD_READ_BYTES else 1


def fits(spark: SparkSession, index: Index, queries: int, nprobe: int) -> bool:
    """Whether an estimated `queries` queries are answered where they are (this module) rather than shuffled to the files."""
    return expected_read(index, queries, tasks_for(spark, index, queries, nprobe), nprobe) <= LOCAL_READ_BYTES


def chunks(batches: Iterator[pa.RecordBatch], rows: int) -> Iterator[pa.RecordBatch]:
    """The batches regrouped into batches of about `rows` rows (each task's queries in as few catalog passes as fit)."""
    held: list[pa.RecordBatch] = []
    count = 0
    for batch in batches:
        held.append(batch)
        count += len(batch)
        if count >= rows:
            yield pa.Table.from_batches(held).combine_chunks().to_batches()[0]
            held, count = [], 0
    if count:
        yield pa.Table.from_batches(held).combine_chunks().to_batches()[0]


def held_parts(index: Index, cells: np.ndarray, offsets: np.ndarray) -> list[tuple[int, int]]:
    """Runs of queries whose probed cells' rows together stay within HOLD_BYTES (one query at least): each run's
    rows are held at once, so ties between files are broken by id as everywhere else."""
    row_bytes = sum(f["bytes"] for f in index.meta["files"]) / max(int(index.plan.sizes.sum()), 1)
    parts, first, queries = [], 0, len(offsets) - 1
    while first < queries:
        size = queries - first
        while size > 1 and index.plan.sizes[np.unique(cells[offsets[first] : offsets[first + size]])].sum() * row_bytes > HOLD_BYTES:
            size //= 2
        parts.append((first, first + size))
        first += size
    return parts


def by_nearest_cell(cells: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The queries in the order of their nearest cell, and their probes (CSR) in that order: the cells are numbered
    along the index's tree, so a run of these queries probes fewer distinct cells, and fewer row groups are read
    by two runs (1M x 512-d, 1,000 queries at nprobe 1: 36% of the catalog read in arrival order)."""
    lengths = np.diff(offsets)
    first = cells[np.minimum(offsets[:-1], len(cells) - 1)] if len(cells) else np.zeros(len(lengths), np.int64)
    order = np.argsort(np.where(lengths > 0, first, -1), kind="stable")
    ordered = np.concatenate([[0], np.cumsum(lengths[order])]).astype(offsets.dtype)
    picks = np.repeat(offsets[:-1][order] - ordered[:-1], lengths[order]) + np.arange(ordered[-1])
    return order, cells[picks], ordered


def hold(catalog: CatalogFiles, cells: np.ndarray) -> ShardRows:
    """All the rows of these cells, read from the files that hold them, as one shard: each file's vectors go into
    the shard's matrix as it is read, so a task holds its rows' vectors once, not twice (and faults in half as much)."""
    index, cells = catalog.index, np.unique(cells)
    probed = np.zeros(index.cells, bool)
    probed[cells] = True
    vectors, rows, filled = pooled_matrix(int(index.plan.sizes[cells].sum()), index.dim), [], 0
    for _, table, keep in catalog.rows(catalog.holding(cells), probed, at_once=READ_THREADS):
        picked = np.flatnonzero(keep)
        gather_matrix(table.column("vector"), index.dim, picked, vectors[filled : filled + len(picked)])
        strings = table.drop_columns(["vector"])
        rows.append(strings if len(picked) == len(keep) else strings.take(pa.array(picked)))
        filled += len(picked)
    return ShardRows.of(pa.concat_tables(rows), index.dim, vectors=vectors[:filled])


@dataclass
class LocalSearch(CatalogSearch):
    """CatalogSearch's found table and counts, and the catalog files that hold the cells probed."""

    index: Index | None = None

    def touched(self) -> dict:
        cells = self.seen.value.probed_cells()
        holding = direct.file_of_group(self.index)[self.index.plan.groups_of(cells)] if cells else []
        return {**super().touched(), "catalog_files_read": len(np.unique(holding))}


def search(spark: SparkSession, index: Index, files: Location, queries: DataFrame | QueryFiles, estimate: int, nprobe: int,
           wanted: Wanted) -> LocalSearch:
    """The ranked neighbours (neighbours rows) of every query, answered in the queries' own tasks (which read the
    queries themselves, given QueryFiles)."""
    tasks = tasks_for(spark, index, estimate, nprobe)
    listed = queries if isinstance(queries, QueryFiles) else None  # the closure below must not hold a DataFrame
    runs = listed.runs(tasks) if listed else None
    shipped = spark.sparkContext.broadcast(index)
    counters = ReadCounters.start(spark)
    seen = spark.sparkContext.accumulator(Probed(), ProbedParam())
    enough = wanted.k + (1 if wanted.exclude_self else 0)
    chunk_rows = max(1024, CHUNK_BYTES // (4 * index.dim + 100))
    task_log = get_logger("jobs.search.task")

    def answer(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        if runs is not None:  # the input is which runs of the table to read
            batches = (batch for task in [t for b in batches for t in b.column("id").to_pylist()] for batch in listed.read(runs[task]))
        idx = shipped.value
        catalog = CatalogFiles(idx, files, counters, files.filesystem(memory_map=True))
        probed, rows, spent = Probed(np.zeros(idx.cells, bool)), 0, dict.fromkeys(("probing", "reading", "scoring"), 0.0)
        for chunk in chunks(batches, chunk_rows):
            started = time.perf_counter()
            vectors, cells, offsets = probed.probe(chunk, idx, nprobe, enough)
            spent["probing"] += time.perf_counter() - started
            rows += len(chunk)
            if not len(cells):  # empty, or a vector of the wrong length: the driver says which after the job
                continue
            order, cells, offsets = by_nearest_cell(cells, offsets)
            taken = pa.array(order)
            asked = pa.RecordBatch.from_arrays([chunk.column(c).take(taken) for c in ("qidx", "query_id", "query_path", "query_label")]
                                               + [vectors.take(taken), binary_from_values(cells, offsets)], names=["qidx", "id", "path", "label", "vector", "probes"])
            for first, end in held_parts(idx, cells, offsets):
                started = time.perf_counter()
                held = hold(catalog, cells[offsets[first] : offsets[end]])
                read = time.perf_counter()
                found = ranked(held.answer(asked.slice(first, end - first), wanted), wanted.k)
                spent["reading"], spent["scoring"] = spent["reading"] + read - started, spent["scoring"] + time.perf_counter() - read
                yield found
        task_log.info("%d queries answered in their own task: %s", rows, ", ".join(f"{v:.1f} s {k}" for k, v in spent.items()))
        probed.rows[TaskContext.get().partitionId()] = rows
        seen.add(probed)

    if runs is not None:
        spread = spark.range(tasks, numPartitions=tasks)
    else:
        spread = queries.repartition(tasks) if tasks > 1 else queries.coalesce(1)
    planned = {"cells": index.cells, "catalog_rows": int(index.plan.sizes.sum()), "catalog_files": len(index.meta["files"]),
               "catalog_bytes": sum(f["bytes"] for f in index.meta["files"]), "reader": "executors", "plan": f"in the queries' own {tasks} task(s)",
               "queries_read_by": "the tasks (pyarrow)" if runs is not None else "Spark"}
    return LocalSearch(spread.mapInArrow(answer, NEIGHBOURS_SCHEMA), seen, counters, planned, index)

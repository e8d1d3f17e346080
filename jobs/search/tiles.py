"""A planned search as Spark stages (plan.py): the tasks that read the queries probe them and, with one range,
stream the catalog themselves; with several, send each query to the ranges it probes, where each tile streams its
range, and the per-range candidates are merged. Every task runs the one kernel (stream.py)."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyspark import Accumulator, AccumulatorParam, TaskContext
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from jobs.filesystems import Location
from jobs.ivf import Index
from jobs.partitions import partition_key
from jobs.runlog import Stopwatch, get_logger
from jobs.search import results
from jobs.search.catalog import ROW_COLUMNS, CatalogFiles, ReadCounters
from jobs.search.plan import Plan
from jobs.search.queries import Source
from jobs.search.scoring import Wanted
from jobs.search.stream import QUERY_COLUMNS, Asked, answer
from jobs.tables import NEIGHBOURS_SCHEMA
from jobs.vectors import binary_from_values, matrix_from_binary, packed_vectors

task_log = get_logger("jobs.search.task")
SEEN_VALUES = 4  # distinct models or digests remembered: enough to name a mix, bounded whatever the table
ROUTED_SCHEMA = (
    "tile int, qidx bigint, query_id string, query_path string, query_label string, "
    "vector binary, probes binary, own_cell int"
)


@dataclass
class Seen:
    """What the tasks saw of the queries, gathered by a Spark accumulator: the cells probed, query rows per task, the
    vectors' lengths, models and weights digests, and LSH fallbacks. Every merge is idempotent (or, union, rows per
    task), so a task that runs twice cannot count twice."""

    cells: np.ndarray | None = None  # bool per cell
    rows: dict[int, int] = field(default_factory=dict)
    dims: set[int] = field(default_factory=set)
    models: set[str] = field(default_factory=set)
    digests: set[str] = field(default_factory=set)
    fallbacks: dict[int, int] = field(default_factory=dict)

    def merge(self, other: Seen) -> Seen:
        cells = other.cells if self.cells is None else self.cells if other.cells is None else self.cells | other.cells
        return Seen(
            cells,
            {**self.rows, **other.rows},
            self.dims | other.dims,
            bounded(self.models | other.models),
            bounded(self.digests | other.digests),
            {**self.fallbacks, **other.fallbacks},
        )

    @property
    def queries(self) -> int:
        return sum(self.rows.values())

    def vectors(self, batch: pa.RecordBatch, dim: int) -> np.ndarray | None:
        """The batch's vectors as a matrix, noting their lengths, models and digests; None where one is not dim long."""
        vectors, lengths = packed_vectors(batch.column("vector"))
        self.dims.update(np.unique(lengths).tolist())
        for name, values in (("model", self.models), ("weights_sha256", self.digests)):
            if name in batch.schema.names:
                values.update(v for v in pc.unique(batch.column(name)).to_pylist()[:SEEN_VALUES] if v is not None)
        return matrix_from_binary(vectors, dim) if len(batch) and (lengths == dim).all() else None


def bounded(values: set[str]) -> set[str]:
    return set(sorted(values)[:SEEN_VALUES])


class SeenParam(AccumulatorParam):
    def zero(self, value: Seen) -> Seen:
        return Seen()

    def addInPlace(self, value1: Seen, value2: Seen) -> Seen:
        return value1.merge(value2)


@dataclass
class Found:
    """A planned search: its answers (neighbours rows, or candidate pairs of a range search) and, once they are
    written, what the tasks saw and read."""

    answers: results.Answers
    seen: Accumulator
    counters: ReadCounters
    plan: Plan

    def touched(self, index: Index) -> dict:
        seen = self.seen.value
        return {
            "plan": self.plan.describe(),
            "tasks": self.plan.tiling.tiles,
            "cells": index.cells,
            "catalog_rows": index.count,
            "cells_probed": int(seen.cells.sum()) if seen.cells is not None else 0,
            "catalog_files": len(index.manifest.files),
            "catalog_bytes": index.catalog_bytes,
            "expected_bytes_read": round(self.plan.tiling.expected_read),
            **self.counters.totals(),
            "lsh_fallback_queries": sum(seen.fallbacks.values()),
        }


def chunks(batches: Iterator[pa.RecordBatch], rows: int) -> Iterator[pa.RecordBatch]:
    """The batches regrouped into batches of at most `rows` rows (a task's queries in as few passes as fit)."""
    held: list[pa.RecordBatch] = []
    count = 0
    for batch in batches:
        while len(batch):
            taken = batch.slice(0, rows - count)
            held.append(taken)
            count, batch = count + len(taken), batch.slice(len(taken))
            if count == rows:
                yield pa.Table.from_batches(held).combine_chunks().to_batches()[0]
                held, count = [], 0
    if count:
        yield pa.Table.from_batches(held).combine_chunks().to_batches()[0]


def answered(
    catalog: CatalogFiles, asked: Asked, wanted: Wanted, cells: np.ndarray, lsh: tuple | None
) -> Iterator[pa.RecordBatch]:
    """The kernel's candidates for one chunk; with lsh, queries with fewer candidates than they want are answered
    exactly instead (a second pass for them alone), and counted in asked.fallbacks."""
    found = list(answer(catalog, asked, wanted, cells, lsh))
    if lsh is not None:
        expected = min(wanted.k, catalog.index.count - (1 if wanted.exclude_self else 0))
        short = asked.candidates < expected
        if short.any():
            exact = list(answer(catalog, asked.subset(short), wanted, cells, None))
            kept = pc.invert(pc.is_in(found[0].column("qidx"), pa.array(asked.rows.column("qidx").to_numpy()[short])))
            found = [found[0].filter(kept), *exact]
            asked.fallbacks = int(short.sum())
    yield from found


class Tasks:
    """The tasks of a planned search, shipped to the executors with it: `local` answers its own queries (one range),
    `route` sends each query to the ranges it probes, `tile` answers the queries of its range. They decide nothing:
    the plan says what each reads and how much at once."""

    def __init__(self, spark: SparkSession, index: Index, plan: Plan, files: Location, wanted: Wanted, read) -> None:
        self.shipped = spark.sparkContext.broadcast(index)  # with its LSH vectors, where it has them
        self.seen, self.counters = spark.sparkContext.accumulator(Seen(), SeenParam()), ReadCounters.start(spark)
        self.plan, self.files, self.wanted, self.read = plan, files, wanted, read
        self.columns = ROW_COLUMNS + (["buckets"] if plan.lsh else [])

    def setup(self) -> tuple[Index, tuple | None, Seen, Stopwatch]:
        index = self.shipped.value
        lsh = (index.lsh_vectors, index.lsh) if self.plan.lsh else None
        return index, lsh, Seen(np.zeros(index.cells, bool)), Stopwatch()

    def done(self, saw: Seen, rows: int, fallbacks: int = 0) -> None:
        saw.rows[TaskContext.get().partitionId()] = rows
        saw.fallbacks[TaskContext.get().partitionId()] = fallbacks
        self.seen.add(saw)

    def probed(self, index: Index, saw: Seen, chunk: pa.RecordBatch) -> Asked | None:
        vectors = saw.vectors(chunk, index.dim)
        if vectors is None:  # empty, or a vector of the wrong length: the driver says which after the job
            return None
        asked = Asked.probed(chunk, vectors, index, self.plan.probes, self.wanted)
        saw.cells[asked.probes[0] if asked.probes is not None else slice(None)] = True
        return asked

    def local(self, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        index, lsh, saw, watch = self.setup()
        catalog, rows, fallbacks = CatalogFiles(index, self.files, self.counters, self.columns, watch), 0, 0
        for chunk in watch.timed("reading queries", chunks(self.read(batches), self.plan.chunk_rows)):
            rows += len(chunk)
            with watch("probing"):
                asked = self.probed(index, saw, chunk)
            every = np.ones(index.cells, bool)
            for found in watch.timed(
                "scoring", answered(catalog, asked, self.wanted, every, lsh) if asked is not None else iter([])
            ):
                with watch("ranking"):
                    found = results.ranked(pa.Table.from_batches([found]), self.wanted.k) if self.plan.topk else found
                with watch("writing"):
                    yield from results.sliced(found)
            fallbacks += asked.fallbacks if asked is not None else 0
        catalog.close()
        task_log.info("search task %d: %d queries: %s", TaskContext.get().partitionId(), rows, watch.line())
        self.done(saw, rows, fallbacks)

    def route(self, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        index, _, saw, watch = self.setup()
        bounds, ranges = self.plan.tiling.bounds, self.plan.tiling.ranges
        block, rows = TaskContext.get().partitionId() % self.plan.tiling.blocks, 0
        for chunk in watch.timed("reading queries", chunks(self.read(batches), self.plan.chunk_rows)):
            rows += len(chunk)
            with watch("probing"):
                asked = self.probed(index, saw, chunk)
            for part in range(ranges) if asked is not None else []:
                with watch("routing"):
                    routed = routed_rows(asked, chunk, block * ranges + part, bounds[part], bounds[part + 1])
                with watch("writing"):
                    yield from results.sliced(routed)
        task_log.info("search task %d: %d queries routed: %s", TaskContext.get().partitionId(), rows, watch.line())
        self.done(saw, rows)

    def tile(self, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        index, _, _, watch = self.setup()
        bounds, ranges = self.plan.tiling.bounds, self.plan.tiling.ranges
        catalog, rows = CatalogFiles(index, self.files, self.counters, self.columns, watch), 0
        for chunk in watch.timed("reading queries", chunks(batches, self.plan.chunk_rows)):
            part, rows = chunk.column("tile")[0].as_py() % ranges, rows + len(chunk)
            cells = np.zeros(index.cells, bool)
            cells[bounds[part] : bounds[part + 1]] = True
            asked = Asked.routed(chunk, index.dim)
            for found in watch.timed("scoring", answered(catalog, asked, self.wanted, cells, None)):
                with watch("packing"):
                    found = results.packed(found) if self.plan.topk else found
                with watch("writing"):
                    yield from results.sliced(found)
        catalog.close()
        if rows:
            first, last = bounds[part], bounds[part + 1] - 1
            task_log.info(
                "search task %d: %d queries of cells %d-%d: %s", TaskContext.get().partitionId(), rows, first, last,
                watch.line(),
            )  # fmt: skip


def search(spark: SparkSession, index: Index, source: Source, plan: Plan, files: Location, wanted: Wanted) -> Found:
    """The search of every query of source as planned."""
    frame, read = source.tasks(spark, plan.map_tasks)
    tasks = Tasks(spark, index, plan, files, wanted, read)
    found = functools.partial(Found, seen=tasks.seen, counters=tasks.counters, plan=plan)
    if not plan.tiling.routed:
        schema = NEIGHBOURS_SCHEMA if plan.topk else results.PARTIAL_SCHEMA
        return found(results.Answers(frame, tasks.local, schema, plan.map_tasks if source.files is not None else None))
    tiling = plan.tiling
    routed = frame.mapInArrow(tasks.route, ROUTED_SCHEMA)
    routed = routed.repartition(tiling.tiles, partition_key(F.col("tile"), tiling.tiles))
    candidates = routed.mapInArrow(tasks.tile, results.PACKED_SCHEMA if plan.topk else results.PARTIAL_SCHEMA)
    if not plan.topk:
        return found(results.Answers(candidates))
    return found(results.merged(candidates, wanted.k, plan.merge_tasks))


def routed_rows(asked: Asked, chunk: pa.RecordBatch, tile: int, first: int, end: int) -> pa.RecordBatch:
    """The asked queries that probe a cell in first..end, with those cells: their rows for the tile."""
    if asked.probes is None:  # every cell: every query visits every range
        keep, probes = np.arange(len(asked.vectors)), pa.nulls(len(asked.vectors), pa.binary())
    else:
        cells, offsets = asked.probes
        owner = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
        inside = (cells >= first) & (cells < end)
        counts = np.bincount(owner[inside], minlength=len(offsets) - 1)
        keep = np.flatnonzero(counts)
        probes = binary_from_values(cells[inside], np.concatenate([[0], np.cumsum(counts[keep])]))
    taken = pa.array(keep)
    own = chunk.column("own_cell").take(taken) if "own_cell" in chunk.schema.names else pa.nulls(len(keep), pa.int32())
    return pa.RecordBatch.from_arrays(
        [
            pa.array(np.full(len(keep), tile, np.int32)),
            *(asked.rows.column(c).take(taken) for c in QUERY_COLUMNS),
            packed_vectors(chunk.column("vector"))[0].take(taken),
            probes,
            own.cast(pa.int32()),
        ],
        names=["tile", *QUERY_COLUMNS, "vector", "probes", "own_cell"],
    )

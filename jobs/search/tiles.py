"""A planned search as Spark stages (plan.py): the tasks that read the queries probe them and, with one range,
stream the catalog themselves; with several, send each query to the ranges it probes, where each tile streams its
range, and the per-range candidates are merged. Every task runs the one kernel (stream.py)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyspark import Accumulator, AccumulatorParam, TaskContext
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from jobs.filesystems import Location
from jobs.ivf import Index, lsh_vectors
from jobs.partitions import partition_key
from jobs.runlog import Stopwatch, get_logger
from jobs.search import results
from jobs.search.catalog import ROW_COLUMNS, CatalogFiles, ReadCounters
from jobs.search.plan import QUERY_STRING_BYTES, TASK_BYTES, Plan
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
            "tasks": self.plan.tiles,
            "cells": index.cells,
            "catalog_rows": index.count,
            "cells_probed": int(seen.cells.sum()) if seen.cells is not None else 0,
            "catalog_files": len(index.meta["files"]),
            "catalog_bytes": index.catalog_bytes,
            "expected_bytes_read": round(self.plan.expected_read),
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


def search(
    spark: SparkSession,
    index: Index,
    source: Source,
    plan: Plan,
    files: Location,
    nprobe: int | None,
    wanted: Wanted,
    lsh: bool = False,
) -> Found:
    """The search of every query of source as planned: nprobe cells each (None: every cell), LSH candidates only with
    lsh."""
    shipped = spark.sparkContext.broadcast((index, lsh_vectors(spark, index) if lsh else None))
    seen, counters = spark.sparkContext.accumulator(Seen(), SeenParam()), ReadCounters.start(spark)
    chunk_rows = max(1, TASK_BYTES // (4 * index.dim + QUERY_STRING_BYTES))
    columns = ROW_COLUMNS + (["buckets"] if lsh else [])
    bounds, ranges, topk = plan.bounds, plan.ranges, wanted.min_similarity is None
    tasks = plan.blocks if not plan.routed else max(plan.blocks, spark.sparkContext.defaultParallelism)
    frame, read = source.tasks(spark, tasks)

    def task_setup() -> tuple[Index, tuple | None, Seen]:
        idx, projections = shipped.value
        return idx, (projections, idx.lsh) if projections is not None else None, Seen(np.zeros(idx.cells, bool))

    def done(saw: Seen, rows: int, fallbacks: int = 0) -> None:
        saw.rows[TaskContext.get().partitionId()] = rows
        saw.fallbacks[TaskContext.get().partitionId()] = fallbacks
        seen.add(saw)

    def probed(idx: Index, saw: Seen, chunk: pa.RecordBatch) -> Asked | None:
        vectors = saw.vectors(chunk, idx.dim)
        if vectors is None:  # empty, or a vector of the wrong length: the driver says which after the job
            return None
        asked = Asked.probed(chunk, vectors, idx, nprobe, wanted)
        saw.cells[asked.probes[0] if asked.probes is not None else slice(None)] = True
        return asked

    def local(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        idx, model, saw = task_setup()
        watch = Stopwatch()
        catalog, rows, fallbacks = CatalogFiles(idx, files, counters, columns, watch), 0, 0
        for chunk in watch.timed("reading queries", chunks(read(batches), chunk_rows)):
            rows += len(chunk)
            with watch("probing"):
                asked = probed(idx, saw, chunk)
            for found in watch.timed(
                "scoring",
                answered(catalog, asked, wanted, np.ones(idx.cells, bool), model) if asked is not None else iter([]),
            ):
                with watch("ranking"):
                    found = results.ranked(pa.Table.from_batches([found]), wanted.k) if topk else found
                with watch("writing"):
                    yield from results.sliced(found)
            fallbacks += asked.fallbacks if asked is not None else 0
        catalog.close()
        task_log.info("search task %d: %d queries: %s", TaskContext.get().partitionId(), rows, watch.line())
        done(saw, rows, fallbacks)

    if not plan.routed:
        return Found(
            results.Answers(
                frame,
                local,
                NEIGHBOURS_SCHEMA if topk else results.PARTIAL_SCHEMA,
                tasks if source.files is not None else None,
            ),
            seen,
            counters,
            plan,
        )

    def route(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        idx, _, saw = task_setup()
        block, rows, watch = TaskContext.get().partitionId() % plan.blocks, 0, Stopwatch()
        for chunk in watch.timed("reading queries", chunks(read(batches), chunk_rows)):
            rows += len(chunk)
            with watch("probing"):
                asked = probed(idx, saw, chunk)
            for part in range(ranges) if asked is not None else []:
                with watch("routing"):
                    routed = routed_rows(asked, chunk, block * ranges + part, bounds[part], bounds[part + 1])
                with watch("writing"):
                    yield from results.sliced(routed)
        task_log.info("search task %d: %d queries routed: %s", TaskContext.get().partitionId(), rows, watch.line())
        done(saw, rows)

    def tile(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        idx, _, _ = task_setup()
        watch = Stopwatch()
        catalog, rows = CatalogFiles(idx, files, counters, columns, watch), 0
        for chunk in watch.timed("reading queries", chunks(batches, chunk_rows)):
            part, rows = chunk.column("tile")[0].as_py() % ranges, rows + len(chunk)
            cells = np.zeros(idx.cells, bool)
            cells[bounds[part] : bounds[part + 1]] = True
            for found in watch.timed("scoring", answered(catalog, Asked.routed(chunk, idx.dim), wanted, cells, None)):
                with watch("packing"):
                    found = results.packed(found) if topk else found
                with watch("writing"):
                    yield from results.sliced(found)
        catalog.close()
        if rows:
            task_log.info(
                "search task %d: %d queries of cells %d-%d: %s",
                TaskContext.get().partitionId(),
                rows,
                bounds[part],
                bounds[part + 1] - 1,
                watch.line(),
            )

    routed = frame.mapInArrow(route, ROUTED_SCHEMA).repartition(plan.tiles, partition_key(F.col("tile"), plan.tiles))
    candidates = routed.mapInArrow(tile, results.PACKED_SCHEMA if topk else results.PARTIAL_SCHEMA)
    if not topk:
        return Found(results.Answers(candidates), seen, counters, plan)
    merge = results.merge_tasks(source.count, wanted.k, ranges, 4 * spark.sparkContext.defaultParallelism)
    return Found(results.merged(candidates, wanted.k, merge), seen, counters, plan)


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

"""IVF search on Spark: each query picks its cells and visits the catalog shards that hold them; a shard's task
scores its visitors against each probed cell with one matrix product (scoring.py).

A shard is a catalog file the executors read themselves (direct.py: only the queries are shuffled) or, where
pyarrow cannot open the catalog, a group of cells that Spark reads and shuffles to meet its visitors here.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyspark import Accumulator, AccumulatorParam, StorageLevel, TaskContext
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from jobs import storage
from jobs.ivf import Index
from jobs.partitions import partition_key
from jobs.runlog import get_logger
from jobs.search import direct
from jobs.search.direct import ReadCounters
from jobs.search.results import PARTIAL_SCHEMA, merge_tasks, top_k
from jobs.search.scoring import ROW_COLUMNS, ShardRows, Wanted
from jobs.vectors import binary_from_values, matrix_from_binary, packed_vectors

log = get_logger("jobs.search")
CATALOG, QUERY = 0, 1
ASSIGNED_COLUMNS = ["qidx", "query_id", "query_path", "query_label"]
# at most this many values are pushed down as a list: Spark makes a list into a chain of ORs, and Java
# serialisation of a 2,000-deep chain overflows a task's stack (longer lists still filter, as a range)
PUSHDOWN_LIMIT = 256
SEEN_VALUES = 4  # distinct models or digests a probe pass remembers: enough to name a mix, bounded whatever the table


@dataclass
class Probed:
    """What the probe pass saw, gathered by a Spark accumulator: the cells probed, query rows per partition, and the
    queries' vector lengths, models and weights digests. Every merge is idempotent (or, union, rows per partition),
    so a task that runs twice cannot count twice."""

    cells: np.ndarray | None = None  # bool per cell
    rows: dict[int, int] = field(default_factory=dict)
    dims: set[int] = field(default_factory=set)
    models: set[str] = field(default_factory=set)
    digests: set[str] = field(default_factory=set)

    def merge(self, other: Probed) -> Probed:
        cells = other.cells if self.cells is None else self.cells if other.cells is None else self.cells | other.cells
        return Probed(cells, {**self.rows, **other.rows}, self.dims | other.dims, bounded(self.models | other.models), bounded(self.digests | other.digests))

    @property
    def queries(self) -> int:
        return sum(self.rows.values())

    def probed_cells(self) -> list[int]:
        return np.flatnonzero(self.cells).tolist() if self.cells is not None else []

    def probe(self, batch: pa.RecordBatch, index: Index, nprobe: int, min_rows: int) -> tuple[pa.Array, np.ndarray, np.ndarray]:
        """The batch's vectors (float32 bytes) and each query's cells (CSR, nearest first), noting what it saw of
        the queries; no cells at all for a batch holding a vector of another length than the index's."""
        vectors, lengths = packed_vectors(batch.column("vector"))
        self.dims.update(np.unique(lengths).tolist())
        for name, values in (("model", self.models), ("weights_sha256", self.digests)):
            if name in batch.schema.names:
                values.update(v for v in pc.unique(batch.column(name)).to_pylist()[:SEEN_VALUES] if v is not None)
        if not len(batch) or (lengths != index.dim).any():
            return vectors, np.empty(0, np.int32), np.zeros(len(batch) + 1, np.int32)
        cells, offsets = index.probe(matrix_from_binary(vectors, index.dim), nprobe, min_rows)
        self.cells[cells] = True
        return vectors, cells, offsets


def bounded(values: set[str]) -> set[str]:
    return set(sorted(values)[:SEEN_VALUES])


class ProbedParam(AccumulatorParam):
    """Merges Probed values (the executors' and the driver's)."""

    def zero(self, value: Probed) -> Probed:
        return Probed()

    def addInPlace(self, value1: Probed, value2: Probed) -> Probed:
        return value1.merge(value2)


def assign_probes(spark: SparkSession, queries: DataFrame, index: Index, nprobe: int, min_rows: int, shard_of_group: np.ndarray,
                  probed: Accumulator) -> DataFrame:
    """queries + visits: each shard holding cells the query probes (nearest first, enough for min_rows), with those cells (packed int32).

    What the pass sees goes to `probed` (a Probed accumulator); a query whose vector is not the index's length
    gets no visits (check the lengths seen before using the visits).
    """
    shipped = spark.sparkContext.broadcast(index)

    def assign(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        shipped_index = shipped.value
        seen, rows = Probed(np.zeros(shipped_index.cells, bool)), 0
        for batch in batches:
            vectors, cells, offsets = seen.probe(batch, shipped_index, nprobe, min_rows)
            visit_offsets, shards, cell_offsets, visit_cells = shipped_index.plan.visits(cells, offsets, shard_of_group)
            visits = pa.StructArray.from_arrays([pa.array(shards), binary_from_values(visit_cells, cell_offsets)], names=["shard", "probes"])
            rows += len(batch)
            yield pa.RecordBatch.from_arrays([*(batch.column(c) for c in ASSIGNED_COLUMNS), vectors, pa.ListArray.from_arrays(pa.array(visit_offsets), visits)],
                                             names=[*ASSIGNED_COLUMNS, "vector", "visits"])
        seen.rows[TaskContext.get().partitionId()] = rows
        probed.add(seen)  # once per partition, after its last batch

    return queries.mapInArrow(assign, "qidx bigint, query_id string, query_path string, query_label string, vector binary, "
                                      "visits array<struct<shard: int, probes: binary>>")


def catalog_rows(spark: SparkSession, index: Index, groups: list[int], cells: list[int]) -> tuple[DataFrame, list[dict]]:
    """The catalog rows of the probed cells, reading only the files that hold their groups and, where the
    list is short enough to push down, only the row groups that hold the cells (the catalog is sorted by cell)."""
    files = index.files_for(set(groups)) if len(groups) < index.plan.groups else index.meta["files"]
    rows = spark.read.parquet(*[f"{index.catalog_uri}/{f['name']}" for f in files])
    if len(cells) < index.cells:
        if len(cells) <= PUSHDOWN_LIMIT:  # listed values are pushed to Parquet as row-group filters
            spark.conf.set("spark.sql.parquet.pushdown.inFilterThreshold", str(max(10, len(cells))))
        rows = rows.where(F.col("cell").isin(cells))  # rows of cells nobody probes are neither read nor shuffled
    return rows, files


@dataclass
class Search:
    """A planned IVF search: its candidates (results.PARTIAL_SCHEMA) for the top-k merge, and what it touches."""

    partials: DataFrame
    tasks: int  # the partials' partitions: the merge uses at most this many, not spark.sql.shuffle.partitions
    assigned: DataFrame
    seen: Probed
    planned: dict
    counters: ReadCounters | None = None
    spill: str | None = None  # where the assigned queries were written, if not cached

    def top_k(self, k: int) -> DataFrame:
        """The k nearest candidates per query (results.top_k), merged in as many tasks as its rows need."""
        return top_k(self.partials, k, merge_tasks(self.seen.queries, k, self.tasks))

    def touched(self) -> dict:
        """What the search read; after the partials' action, the executors' own counts where they read the catalog."""
        return {**self.planned, **(self.counters.totals() if self.counters else {})}

    def release(self) -> None:
        if self.spill:
            storage.delete(self.assigned.sparkSession, self.spill)
        else:
            self.assigned.unpersist()


def search(spark: SparkSession, index: Index, queries: DataFrame, nprobe: int, wanted: Wanted, reader: str = "auto",
           spill: str | None = None) -> Search:
    """Plan the search of every query: executors read the probed row groups themselves where pyarrow can open
    the catalog (reader auto or direct), otherwise Spark reads the probed cells and shuffles them to the queries.

    spill: a folder the probe pass writes the assigned queries to instead of Spark's cache, for query sets the
    size of a catalog (Spark builds a cache in memory batch by batch: 1M 512-d queries overflowed a 1g driver).
    """
    files = direct.chosen(spark, index, reader)
    enough = 0 if wanted.min_similarity is not None else wanted.k + (1 if wanted.exclude_self else 0)
    shard_of_group = direct.file_of_group(index) if files else np.arange(index.plan.groups, dtype=np.int32)
    probed = spark.sparkContext.accumulator(Probed(), ProbedParam())
    assigned = assign_probes(spark, queries, index, nprobe, enough, shard_of_group, probed)
    if spill:  # the probe pass, once: every query assigned (and kept for scoring), what it saw gathered
        assigned.write.parquet(spill)
        assigned = spark.read.parquet(spill)
    else:
        assigned = assigned.persist(StorageLevel.MEMORY_AND_DISK)
        assigned.count()
    seen = probed.value
    cells = seen.probed_cells()
    planned = {"cells_probed": len(cells), "cells": index.cells, "catalog_rows": int(index.plan.sizes.sum()),
               "catalog_files": len(index.meta["files"]), "catalog_bytes": sum(f["bytes"] for f in index.meta["files"])}
    if files:
        probed_files = sorted({int(shard_of_group[g]) for g in index.plan.groups_of(cells)})
        counters = direct.ReadCounters.start(spark)
        split = direct.tasks_per_file(spark, len(probed_files), seen.queries)
        partials = direct.score_files(spark, index, files, assigned, probed_files, cells, wanted, counters, split)
        return Search(partials, len(probed_files) * split, assigned, seen, {**planned, "reader": "executors", "catalog_files_read": len(probed_files)},
                      counters, spill)
    groups = index.plan.groups_of(cells)  # the visits' groups, from the plan: no second pass over the queries
    tasks = max(1, min(len(groups), 4 * spark.sparkContext.defaultParallelism))
    partials, read = shuffled(spark, index, assigned, groups, cells, wanted, tasks)
    return Search(partials, tasks, assigned, seen, {**planned, **read, "reader": "spark", "groups_probed": len(groups), "groups": index.plan.groups},
                  spill=spill)


def shuffled(spark: SparkSession, index: Index, assigned: DataFrame, groups: list[int], cells: list[int], wanted: Wanted, tasks: int) -> tuple[DataFrame, dict]:
    """Spark reads the probed cells' rows and shuffles them to the group tasks with the queries that visit them."""
    rows, files = catalog_rows(spark, index, groups, cells)
    null = F.lit(None)
    both = rows.select(F.col("group"), F.lit(CATALOG).alias("kind"), "cell", null.cast("bigint").alias("qidx"), F.col("image_id").alias("id"),
                       "path", "label", F.lit(b"").alias("probes"), "vector").unionByName(
        assigned.select(F.explode("visits").alias("visit"), "*").select(
            F.col("visit.shard").alias("group"), F.lit(QUERY).alias("kind"), null.cast("int").alias("cell"), "qidx", F.col("query_id").alias("id"),
            F.col("query_path").alias("path"), F.col("query_label").alias("label"), F.col("visit.probes").alias("probes"), "vector"))
    spread = both.repartition(tasks, partition_key(F.col("group") % tasks, tasks)).sortWithinPartitions("group", "kind")
    dim = index.dim

    def score(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        return score_groups(batches, dim, wanted)

    read = {"catalog_rows_scanned": int(index.plan.sizes[cells].sum()), "catalog_files_read": len(files),
            "catalog_bytes_read": sum(f["bytes"] for f in files)}
    return spread.mapInArrow(score, PARTIAL_SCHEMA), read


def segments(batches: Iterator[pa.RecordBatch]) -> Iterator[tuple[int, int, pa.RecordBatch]]:
    """(group, kind, rows) runs of a stream sorted by group and kind."""
    for batch in batches:
        group, kind = batch.column("group").to_numpy(), batch.column("kind").to_numpy()
        cuts = np.flatnonzero((group[1:] != group[:-1]) | (kind[1:] != kind[:-1])) + 1
        for start, end in zip(np.concatenate([[0], cuts]), np.concatenate([cuts, [len(batch)]])):
            yield int(group[start]), int(kind[start]), batch.slice(start, end - start)


def score_groups(batches: Iterator[pa.RecordBatch], dim: int, wanted: Wanted) -> Iterator[pa.RecordBatch]:
    """Executor side: for each group, hold its catalog rows, then answer its queries as they stream past."""
    current, parts, held = None, [], None
    for group, kind, rows in segments(batches):
        if group != current:
            current, parts, held = group, [], None
        if kind == CATALOG:
            parts.append(rows)
            continue
        if held is None and parts:
            held = ShardRows.of(pa.Table.from_batches(parts).select(["cell", "id", "path", "label", "vector"]).rename_columns(ROW_COLUMNS), dim)
        if held is not None:
            yield held.answer(rows, wanted)

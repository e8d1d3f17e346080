"""IVF search on Spark: each query picks its cells and visits the catalog shards that hold them; a shard's task
scores its visitors against each probed cell with one matrix product (scoring.py).

A shard is a catalog file the executors read themselves (direct.py: only the queries are shuffled) or, where
pyarrow cannot open the catalog, a group of cells that Spark reads and shuffles to meet its visitors here.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from jobs.ivf import Index
from jobs.partitions import partition_key
from jobs.runlog import get_logger
from jobs.search import direct
from jobs.search.direct import ReadCounters
from jobs.search.results import PARTIAL_SCHEMA
from jobs.search.scoring import ROW_COLUMNS, ShardRows, Wanted
from jobs.vectors import binary_from_values, matrix_from_binary, values_from_binary

log = get_logger("jobs.search")
CATALOG, QUERY = 0, 1
# at most this many values are pushed down as a list: Spark makes a list into a chain of ORs, and Java
# serialisation of a 2,000-deep chain overflows a task's stack (longer lists still filter, as a range)
PUSHDOWN_LIMIT = 256


def assign_probes(spark: SparkSession, queries: DataFrame, index: Index, nprobe: int, min_rows: int, shard_of_group: np.ndarray) -> DataFrame:
    """queries + visits: each shard holding cells the query probes (nearest first, enough for min_rows), with those cells (packed int32)."""
    shipped = spark.sparkContext.broadcast(index)

    def assign(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        shipped_index = shipped.value
        for batch in batches:
            cells, offsets = shipped_index.probe(matrix_from_binary(batch.column("vector"), shipped_index.dim), nprobe, min_rows)
            visit_offsets, shards, cell_offsets, visit_cells = shipped_index.plan.visits(cells, offsets, shard_of_group)
            visits = pa.StructArray.from_arrays([pa.array(shards), binary_from_values(visit_cells, cell_offsets)], names=["shard", "probes"])
            yield pa.RecordBatch.from_arrays([*batch.columns, pa.ListArray.from_arrays(pa.array(visit_offsets), visits)], names=[*batch.schema.names, "visits"])

    return queries.mapInArrow(assign, "qidx bigint, query_id string, query_path string, query_label string, vector binary, "
                                      "visits array<struct<shard: int, probes: binary>>")


def probed_cells(assigned: DataFrame) -> list[int]:
    """Every cell some query probes (at most the index's cells reach the driver)."""

    def unpack(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            cells, _ = values_from_binary(batch.column("visits").flatten().field("probes"), np.int32)
            yield pa.RecordBatch.from_arrays([pa.array(np.unique(cells))], names=["cell"])

    return sorted(r[0] for r in assigned.select("visits").mapInArrow(unpack, "cell int").distinct().collect())


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
    tasks: int  # the partials' partitions: the merge keeps this many, not spark.sql.shuffle.partitions
    assigned: DataFrame
    planned: dict
    counters: ReadCounters | None = None

    def touched(self) -> dict:
        """What the search read; after the partials' action, the executors' own counts where they read the catalog."""
        return {**self.planned, **(self.counters.totals() if self.counters else {})}

    def release(self) -> None:
        self.assigned.unpersist()


def search(spark: SparkSession, index: Index, queries: DataFrame, nprobe: int, wanted: Wanted, reader: str = "auto") -> Search:
    """Plan the search of every query: executors read the probed row groups themselves where pyarrow can open
    the catalog (reader auto or direct), otherwise Spark reads the probed cells and shuffles them to the queries."""
    files = direct.chosen(spark, index, reader)
    enough = 0 if wanted.min_similarity is not None else wanted.k + (1 if wanted.exclude_self else 0)
    shard_of_group = direct.file_of_group(index) if files else np.arange(index.plan.groups, dtype=np.int32)
    assigned = assign_probes(spark, queries, index, nprobe, enough, shard_of_group).persist(StorageLevel.MEMORY_AND_DISK)
    cells = probed_cells(assigned)
    planned = {"cells_probed": len(cells), "cells": index.cells, "catalog_rows": int(index.plan.sizes.sum()),
               "catalog_files": len(index.meta["files"]), "catalog_bytes": sum(f["bytes"] for f in index.meta["files"])}
    if files:
        probed_files = sorted({int(shard_of_group[g]) for g in index.plan.groups_of(cells)})
        counters = direct.ReadCounters.start(spark)
        partials = direct.score_files(spark, index, files, assigned, probed_files, cells, wanted, counters)
        return Search(partials, len(probed_files), assigned, {**planned, "reader": "executors", "catalog_files_read": len(probed_files)}, counters)
    groups = index.plan.groups_of(cells)  # the visits' groups, from the plan: no second pass over the queries
    tasks = max(1, min(len(groups), 4 * spark.sparkContext.defaultParallelism))
    partials, read = shuffled(spark, index, assigned, groups, cells, wanted, tasks)
    return Search(partials, tasks, assigned, {**planned, **read, "reader": "spark", "groups_probed": len(groups), "groups": index.plan.groups})


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

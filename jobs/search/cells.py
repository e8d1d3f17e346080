"""IVF search on Spark: queries pick their cells, meet the rows of those cells in one shuffle keyed by group,
and each group's task scores every query against each probed cell with one matrix product."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from jobs.ivf import Index
from jobs.knn import id_ranks, merge_nearest, nearest, squared_distances, squared_norms
from jobs.partitions import partition_key
from jobs.runlog import get_logger
from jobs.search.results import PARTIAL_SCHEMA, cosine, partial_batch
from jobs.vectors import binary_from_values, matrix_from_binary, values_from_binary

log = get_logger("jobs.search")
UNION_COLUMNS = ["group", "kind", "cell", "qidx", "id", "path", "label", "probes", "vector"]
CATALOG, QUERY = 0, 1
# at most this many values are pushed down as a list: Spark makes a list into a chain of ORs, and Java
# serialisation of a 2,000-deep chain overflows a task's stack (longer lists still filter, as a range)
PUSHDOWN_LIMIT = 256


def assign_probes(spark: SparkSession, queries: DataFrame, index: Index, nprobe: int, min_rows: int) -> DataFrame:
    """queries + visits: each group holding cells the query probes (nearest first, enough for min_rows), with those cells (packed int32)."""
    shipped = spark.sparkContext.broadcast(index)

    def assign(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        shipped_index = shipped.value
        for batch in batches:
            cells, offsets = shipped_index.probe(matrix_from_binary(batch.column("vector"), shipped_index.dim), nprobe, min_rows)
            visit_offsets, groups, cell_offsets, visit_cells = shipped_index.plan.visits(cells, offsets)
            visits = pa.StructArray.from_arrays([pa.array(groups), binary_from_values(visit_cells, cell_offsets)], names=["group", "probes"])
            yield pa.RecordBatch.from_arrays([*batch.columns, pa.ListArray.from_arrays(pa.array(visit_offsets), visits)], names=[*batch.schema.names, "visits"])

    return queries.mapInArrow(assign, "qidx bigint, query_id string, query_path string, query_label string, vector binary, "
                                      "visits array<struct<group: int, probes: binary>>")


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


@dataclass(frozen=True)
class Wanted:
    """What a query wants from the cells it probes: its k nearest, or (min_similarity set) every row at least that similar."""

    k: int
    exclude_self: bool = False
    min_similarity: float | None = None


def search(spark: SparkSession, index: Index, queries: DataFrame, nprobe: int, wanted: Wanted) -> tuple[DataFrame, dict]:
    """Candidate neighbours (results.PARTIAL_SCHEMA) of every query, and what the search touched."""
    enough = 0 if wanted.min_similarity is not None else wanted.k + (1 if wanted.exclude_self else 0)
    assigned = assign_probes(spark, queries, index, nprobe, enough).persist(StorageLevel.MEMORY_AND_DISK)
    cells = probed_cells(assigned)
    groups = index.plan.groups_of(cells)  # the visits' groups, from the plan: no second pass over the queries
    rows, files = catalog_rows(spark, index, groups, cells)
    null = F.lit(None)
    both = rows.select(F.col("group"), F.lit(CATALOG).alias("kind"), "cell", null.cast("bigint").alias("qidx"), F.col("image_id").alias("id"),
                       "path", "label", F.lit(b"").alias("probes"), "vector").unionByName(
        assigned.select(F.explode("visits").alias("visit"), "*").select(
            F.col("visit.group").alias("group"), F.lit(QUERY).alias("kind"), null.cast("int").alias("cell"), "qidx", F.col("query_id").alias("id"),
            F.col("query_path").alias("path"), F.col("query_label").alias("label"), F.col("visit.probes").alias("probes"), "vector"))
    tasks = max(1, min(len(groups), 4 * spark.sparkContext.defaultParallelism))
    spread = both.repartition(tasks, partition_key(F.col("group") % tasks, tasks)).sortWithinPartitions("group", "kind")
    dim = index.dim

    def score(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        return score_groups(batches, dim, wanted)

    touched = {"groups_probed": len(groups), "groups": index.plan.groups, "cells_probed": len(cells), "cells": index.cells,
               "catalog_rows_scanned": int(index.plan.sizes[cells].sum()), "catalog_rows": int(index.plan.sizes.sum()), "catalog_files_read": len(files), "catalog_files": len(index.meta["files"]),
               "catalog_bytes_read": sum(f["bytes"] for f in files), "catalog_bytes": sum(f["bytes"] for f in index.meta["files"])}
    return spread.mapInArrow(score, PARTIAL_SCHEMA), {"assigned": assigned, **touched}


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
            held = GroupRows.of(parts, dim)
        if held is not None:
            yield held.answer(rows, wanted)


@dataclass
class GroupRows:
    """One group's catalog rows (sorted here by cell), their vectors, and the bounds of each cell."""

    rows: pa.RecordBatch
    vectors: np.ndarray
    squares: np.ndarray
    cells: np.ndarray
    bounds: np.ndarray
    keys: np.ndarray  # rank of each row's id: ties go to the smaller id

    @classmethod
    def of(cls, parts: list[pa.RecordBatch], dim: int) -> GroupRows:
        table = pa.Table.from_batches(parts)
        table = table.take(pa.array(np.argsort(table.column("cell").to_numpy(), kind="stable"))).combine_chunks()
        rows = pa.RecordBatch.from_arrays([c.chunk(0) if c.num_chunks else pa.array([], c.type) for c in table.columns],
                                          names=[c if c != "id" else "image_id" for c in table.column_names])
        vectors = matrix_from_binary(rows.column("vector"), dim)
        cells, starts = np.unique(rows.column("cell").to_numpy(), return_index=True)
        keys = id_ranks(rows.column("image_id").to_numpy(zero_copy_only=False))
        return cls(rows, vectors, squared_norms(vectors), cells, np.append(starts, len(keys)), keys)

    def answer(self, queries: pa.RecordBatch, wanted: Wanted) -> pa.RecordBatch:
        """What each query wants among the rows of the cells it probes in this group, cell by cell."""
        vectors = matrix_from_binary(queries.column("vector"), self.vectors.shape[1])
        query_sq = squared_norms(vectors)
        cells, offsets = values_from_binary(queries.column("probes"), np.int32)
        owner = np.repeat(np.arange(len(queries)), np.diff(offsets))
        rank = np.arange(len(cells)) - np.repeat(offsets[:-1], np.diff(offsets))  # 0: the query's nearest cell in this group
        slot = np.minimum(np.searchsorted(self.cells, cells), len(self.cells) - 1)
        here = self.cells[slot] == cells
        owner, slot, rank = owner[here], slot[here], rank[here]
        own_row = self.own_rows(queries) if wanted.exclude_self else None
        keep = TopK(len(queries), wanted.k) if wanted.min_similarity is None else Similar(wanted.min_similarity, query_sq, self.squares)
        # nearest cells first: they set each query's k-th distance, which then rules out most rows of the other cells
        for later, phase in enumerate((rank == 0, rank > 0)):
            by_cell = np.argsort(slot[phase], kind="stable")
            phase_owner, phase_slot = owner[phase][by_cell], slot[phase][by_cell]
            for start, end in np.column_stack(run_bounds(phase_slot)) if len(phase_slot) else []:
                asking, lo, hi = phase_owner[start:end], self.bounds[phase_slot[start]], self.bounds[phase_slot[start] + 1]
                d2 = squared_distances(vectors[asking], self.vectors[lo:hi], self.squares[lo:hi])
                if own_row is not None:
                    mine = np.flatnonzero((own_row[asking] >= lo) & (own_row[asking] < hi))
                    d2[mine, own_row[asking[mine]] - lo] = np.inf
                keep.add(asking, d2, lo, self.keys[lo:hi], bool(later))
        q, rows, d2 = keep.found()
        asked = pa.RecordBatch.from_arrays([queries.column("qidx"), queries.column("id"), queries.column("path"), queries.column("label")],
                                           names=["qidx", "query_id", "query_path", "query_label"])
        return partial_batch(asked, q, query_sq, self.rows, rows, self.squares, d2)

    def own_rows(self, queries: pa.RecordBatch) -> np.ndarray:
        """The row of each query's own id in this group, or -1."""
        position = {image_id: row for row, image_id in enumerate(self.rows.column("image_id").to_pylist())}
        return np.array([position.get(q, -1) for q in queries.column("id").to_pylist()], np.int64)


class TopK:
    """Each query's k nearest rows so far (row, squared distance, key), ties to the smaller key."""

    def __init__(self, queries: int, k: int) -> None:
        self.k = k
        self.rows = np.full((queries, k), -1, np.int64)
        self.d2 = np.full((queries, k), np.inf, np.float32)
        self.keys = np.full((queries, k), np.iinfo(np.int64).max, np.int64)

    def add(self, asking: np.ndarray, d2: np.ndarray, first_row: int, keys: np.ndarray, bounded: bool) -> None:
        """Fold in d2 (len(asking) x cell rows) of the rows first_row.. . bounded: most rows cannot beat the
        queries' current k-th distance, so only those that can are gathered and merged."""
        if bounded:
            q, col = np.nonzero(d2 <= self.d2[asking, self.k - 1][:, None])
            if len(q):
                self.merge(asking[q], d2[q, col], col, first_row, keys)
            return
        cols, values = nearest(d2, keys, self.k)
        found = np.where(cols >= 0, cols + first_row, -1)
        merged = merge_nearest((self.rows[asking], self.d2[asking], self.keys[asking]),
                               (found, values, np.where(cols >= 0, keys[cols], np.iinfo(np.int64).max)), self.k)
        self.rows[asking], self.d2[asking], self.keys[asking] = merged

    def merge(self, query: np.ndarray, d2: np.ndarray, col: np.ndarray, first_row: int, keys: np.ndarray) -> None:
        """Merge loose candidates (one per entry) into the k best of their queries."""
        touched = np.unique(query)
        queries = np.concatenate([np.repeat(touched, self.k), query])
        d = np.concatenate([self.d2[touched].ravel(), d2])
        key = np.concatenate([self.keys[touched].ravel(), keys[col]])
        row = np.concatenate([self.rows[touched].ravel(), col + first_row])
        order = np.lexsort((key, d, queries))
        queries, d, key, row = queries[order], d[order], key[order], row[order]
        starts = np.flatnonzero(np.r_[True, queries[1:] != queries[:-1]])
        rank = np.arange(len(queries)) - np.repeat(starts, np.diff(np.r_[starts, len(queries)]))
        top = rank < self.k
        target = (queries[top], rank[top])
        self.rows[target], self.d2[target], self.keys[target] = row[top], d[top], key[top]

    def found(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        q, r = np.nonzero(self.rows >= 0)
        return q, self.rows[q, r], self.d2[q, r]


class Similar:
    """Every (query, row) pair with cosine similarity at or above a threshold."""

    def __init__(self, threshold: float, query_sq: np.ndarray, row_sq: np.ndarray) -> None:
        self.threshold, self.query_sq, self.row_sq = np.float32(threshold), query_sq, row_sq
        self.pairs: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def add(self, asking: np.ndarray, d2: np.ndarray, first_row: int, keys: np.ndarray, bounded: bool) -> None:
        similarity = cosine(self.query_sq[asking][:, None], self.row_sq[first_row : first_row + d2.shape[1]][None, :], d2)
        q, col = np.nonzero(similarity >= self.threshold)
        self.pairs.append((asking[q], col + first_row, d2[q, col]))

    def found(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not self.pairs:
            return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32)
        return tuple(np.concatenate(parts) for parts in zip(*self.pairs))  # type: ignore[return-value]


def run_bounds(sorted_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and end of each run of equal values in a sorted array."""
    cuts = np.flatnonzero(sorted_values[1:] != sorted_values[:-1]) + 1
    return np.concatenate([[0], cuts]).astype(np.int64), np.concatenate([cuts, [len(sorted_values)]]).astype(np.int64)

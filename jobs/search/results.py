"""Candidates to answers: per-query top-k merge in Spark, similarity, and the neighbours table written by the executors."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
from pyspark.sql import Column, DataFrame, Observation, SparkSession, Window
from pyspark.sql import functions as F

from jobs import storage
from jobs.knn import ranks_in_runs
from jobs.tables import NEIGHBOURS_SCHEMA

if TYPE_CHECKING:  # the executors import this module: pandas would cost each Python worker ~0.7 s
    import pandas as pd

PARTIAL_SCHEMA = ("qidx bigint, query_id string, query_path string, query_label string, neighbor_id string, neighbor_path string, "
                  "neighbor_label string, distance float, similarity float")
PARTIAL_ARROW = pa.schema([("qidx", pa.int64()), ("query_id", pa.string()), ("query_path", pa.string()), ("query_label", pa.string()), ("neighbor_id", pa.string()),
                           ("neighbor_path", pa.string()), ("neighbor_label", pa.string()), ("distance", pa.float32()), ("similarity", pa.float32())])
NEIGHBOUR_COLUMNS = [f.name for f in NEIGHBOURS_SCHEMA.fields]
MERGED_ROWS_PER_TASK = 1 << 18  # neighbour rows per merge task (and output file): 1,000 queries x 10 are one task, one file


def cosine(query_sq: np.ndarray, row_sq: np.ndarray, d2: np.ndarray) -> np.ndarray:
    """Cosine similarity from squared norms and squared distance (shapes broadcast); the one formula everywhere."""
    similarity = (query_sq + row_sq - d2) / np.maximum(2 * np.sqrt(query_sq * row_sq), 1e-12)
    return np.clip(similarity, -1, 1).astype(np.float32, copy=False)


def partial_batch(queries: pa.RecordBatch, query_rows: np.ndarray, query_sq: np.ndarray, catalog: pa.Table | pa.RecordBatch,
                  catalog_rows: np.ndarray, catalog_sq: np.ndarray, d2: np.ndarray) -> pa.RecordBatch:
    """Candidate rows: query row i matched catalog row j at squared distance d2 (all arrays aligned)."""
    similarity = cosine(query_sq[query_rows], catalog_sq[catalog_rows], d2)
    q, c = pa.array(query_rows), pa.array(catalog_rows)
    return pa.RecordBatch.from_arrays(
        [queries.column("qidx").take(q), queries.column("query_id").take(q), queries.column("query_path").take(q), queries.column("query_label").take(q),
         catalog.column("image_id").take(c), catalog.column("path").take(c), catalog.column("label").take(c),
         pa.array(np.sqrt(d2).astype(np.float32)), pa.array(similarity)],
        schema=PARTIAL_ARROW,
    )


def nearest_per_query(partials: pa.Table, k: int) -> pa.Table:
    """The k nearest candidates of each query in a table of candidates, in top_k's order (distance, then neighbour id)."""
    ordered = partials.sort_by([("qidx", "ascending"), ("distance", "ascending"), ("neighbor_id", "ascending")])
    return ordered.filter(pa.array(ranks_in_runs(ordered.column("qidx").to_numpy()) < k))


def merge_tasks(queries: int, k: int, most: int) -> int:
    """Tasks for the top-k merge: enough for queries x k rows at MERGED_ROWS_PER_TASK each, at most `most`."""
    return max(1, min(most, -(-queries * k // MERGED_ROWS_PER_TASK)))


def top_k(partials: DataFrame, k: int, partitions: int | None = None) -> DataFrame:
    """The k nearest candidates per query, ranked 1..k, ties broken by neighbour id: the neighbours table + query_label.

    partitions: how many the merge uses (default spark.sql.shuffle.partitions, 200 unless set).
    """
    if partitions:
        partials = partials.repartition(partitions, "qidx")  # the window needs no other exchange
    order = Window.partitionBy("qidx").orderBy("distance", "neighbor_id")
    ranked = partials.withColumn("rank", F.row_number().over(order)).where(F.col("rank") <= k)
    return ranked.select(*NEIGHBOUR_COLUMNS, "query_label")


def duplicate_pairs(partials: DataFrame) -> DataFrame:
    """The similar pairs a catalog-against-itself range search found (each may be found from both ends), once each as (a, b), a < b."""
    close = partials
    query_first = F.col("query_id") < F.col("neighbor_id")

    def side(first: str, second: str) -> Column:
        return F.when(query_first, F.col(first)).otherwise(F.col(second))

    return close.select(
        side("query_id", "neighbor_id").alias("image_a"), side("query_path", "neighbor_path").alias("path_a"),
        side("query_label", "neighbor_label").alias("label_a"), side("neighbor_id", "query_id").alias("image_b"),
        side("neighbor_path", "query_path").alias("path_b"), side("neighbor_label", "query_label").alias("label_b"),
        "distance", "similarity",
    ).dropDuplicates(["image_a", "image_b"])


def write(spark: SparkSession, table: DataFrame, output: str, check: Callable[[], None] | None = None) -> int:
    """Write a result table from the executors, staged beside output and swapped in; its row count (observed as
    it is written: no second read). check: run once the table is written; if it raises, nothing is swapped in."""
    staged = storage.sibling(output, "staging")
    written = Observation("written")
    table.observe(written, F.count(F.lit(1)).alias("rows")).write.parquet(staged)
    if check:
        try:
            check()
        except Exception:
            storage.delete(spark, staged)
            raise
    storage.swap_in(spark, staged, output)
    return int(written.get["rows"])


def first_queries(neighbours: DataFrame, limit: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The first `limit` queries by path (query_id, query_path) and their rows sorted by query and rank.

    Spark picks the queries (distinct, then a top-N sort); only the chosen queries' rows reach the driver.
    """
    chosen = neighbours.select("query_id", "query_path").distinct().orderBy("query_path", "query_id").limit(limit).toPandas()
    if chosen.empty:
        return chosen, neighbours.limit(0).toPandas()
    wanted = neighbours.sparkSession.createDataFrame(chosen[["query_id"]], "query_id string")
    return chosen, neighbours.join(F.broadcast(wanted), "query_id").toPandas().sort_values(["query_id", "rank"])


def console_table(neighbours: DataFrame, queries: int) -> str:
    """The top-k of the first few queries (by path) as aligned text."""
    chosen, rows = first_queries(neighbours, queries)
    lines = []
    for query_id, query_path in chosen.itertuples(index=False):
        lines += [f"query {query_path}", f"  {'rank':>4}  {'similarity':>10}  label / path"]
        for row in rows[rows["query_id"] == query_id].itertuples():
            lines.append(f"  {row.rank:>4}  {row.similarity:>10.4f}  {row.neighbor_label or '-'}  {row.neighbor_path}")
    return "\n".join(lines)

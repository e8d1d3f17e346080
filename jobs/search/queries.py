"""Where queries come from, as one distributed table: qidx, query_id, query_path, query_label, vector (float32 bytes)."""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from jobs.errors import UsageError
from jobs.ivf import Index
from jobs.tables import read_embeddings
from jobs.vectors import binary_from_matrix, matrix_from_list

QUERY_SCHEMA = "query_id string, query_path string, query_label string, vector binary"


def numbered(queries: DataFrame) -> DataFrame:
    """A row number (qidx) for the merge; unique within this job, never collected."""
    return queries.select(F.monotonically_increasing_id().alias("qidx"), "query_id", "query_path", "query_label", "vector")


def from_embeddings(table: DataFrame) -> DataFrame:
    """Queries from rows of an embeddings table (image_id, path, label, embedding)."""

    def to_binary(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            vectors = binary_from_matrix(matrix_from_list(batch.column("embedding"))) if len(batch) else pa.array([], pa.binary())
            yield pa.RecordBatch.from_arrays([batch.column("image_id"), batch.column("path"), batch.column("label"), vectors],
                                             names=["query_id", "query_path", "query_label", "vector"])

    return numbered(table.select("image_id", "path", "label", "embedding").mapInArrow(to_binary, QUERY_SCHEMA))


def from_table(spark: SparkSession, uri: str, index: Index) -> DataFrame:
    table, model, dim = read_embeddings(spark, uri, "queries table")
    if (model, dim) != (index.model, index.dim):
        raise UsageError(f"queries {uri} are {model} {dim}-d vectors but index {index.uri} holds {index.model} {index.dim}-d; embed the queries with --model {index.model}")
    return from_embeddings(table)


def catalog(spark: SparkSession, index: Index) -> DataFrame:
    return spark.read.parquet(index.catalog_uri)


def from_catalog(spark: SparkSession, index: Index) -> DataFrame:
    """Every catalog row as a query (kNN graph, duplicates)."""
    return numbered(catalog(spark, index).select(F.col("image_id").alias("query_id"), F.col("path").alias("query_path"), F.col("label").alias("query_label"), "vector"))


def from_ids(spark: SparkSession, index: Index, ids: list[str]) -> DataFrame:
    """Catalog rows with these ids; UsageError naming the ids that are not there."""
    found = catalog(spark, index).where(F.col("image_id").isin(ids)).dropDuplicates(["image_id"])
    present = {r[0] for r in found.select("image_id").collect()}  # at most len(ids) rows
    unknown = [i for i in ids if i not in present]
    if unknown:
        raise UsageError(f"{len(unknown)} query id(s) not in the catalog of {index.uri}: {', '.join(unknown[:5])}")
    return numbered(found.select(F.col("image_id").alias("query_id"), F.col("path").alias("query_path"), F.col("label").alias("query_label"), "vector"))

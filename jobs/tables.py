"""The tables between jobs: reading and checking embeddings tables, and the neighbours table's schema."""

from __future__ import annotations

from typing import NamedTuple

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from jobs import storage
from jobs.errors import UsageError, is_storage_failure

NEIGHBOURS_SCHEMA = T.StructType([
    T.StructField("query_id", T.StringType(), False),
    T.StructField("query_path", T.StringType(), True),
    T.StructField("rank", T.IntegerType(), False),
    T.StructField("neighbor_id", T.StringType(), False),
    T.StructField("neighbor_path", T.StringType(), True),
    T.StructField("neighbor_label", T.StringType(), True),
    T.StructField("distance", T.FloatType(), False),
    T.StructField("similarity", T.FloatType(), False),
])
VECTOR_COLUMNS = ("image_id", "path", "label", "model", "embedding")


def read_parquet_or_explain(spark: SparkSession, uri: str, complaint: str) -> DataFrame:
    """The Parquet table at uri; UsageError(complaint) if uri holds none, storage failures as they are."""
    try:
        return spark.read.parquet(uri)
    except Exception as e:  # Spark raises several types for "no Parquet here", by version
        if is_storage_failure(e):
            raise
        raise UsageError(complaint) from e


class Embeddings(NamedTuple):
    """The rows of an embeddings table that have a vector, and what made them."""

    rows: DataFrame
    model: str
    dim: int
    weights_sha256: str | None  # None for tables written before embed recorded it
    count: int
    distinct_ids: int


def read_embeddings(spark: SparkSession, uri: str, what: str) -> Embeddings:
    """Rows of an embeddings table that have an embedding, with the table's model, dimension and weights.

    Raises UsageError for a missing table, missing columns, mixed models, weights or dimensions, or no vectors.
    """
    if not storage.exists(spark, uri):
        raise UsageError(f"{what} {uri} does not exist")
    table = read_parquet_or_explain(spark, uri, f"{what} {uri} is not a Parquet table")
    missing = [c for c in VECTOR_COLUMNS if c not in table.columns]
    if missing:
        raise UsageError(f"{what} {uri} is not an embeddings table: missing column(s) {', '.join(missing)}")
    valid = table.where(F.col("embedding").isNotNull())
    if "error" in table.columns:
        valid = valid.where(F.col("error").isNull())
    stats = valid.agg(
        F.count("*").alias("rows"), F.countDistinct("image_id").alias("ids"), F.min(F.size("embedding")).alias("min_dim"), F.max(F.size("embedding")).alias("max_dim"),
        F.collect_set("model").alias("models"),
        F.collect_set(F.col("weights_sha256") if "weights_sha256" in table.columns else F.lit(None).cast("string")).alias("weights"),
    ).first()
    if not stats or stats["rows"] == 0:
        raise UsageError(f"{what} {uri} has no embedded images (every row failed or it is empty)")
    if stats["min_dim"] != stats["max_dim"]:
        raise UsageError(f"{what} {uri} mixes vector dimensions {stats['min_dim']} and {stats['max_dim']}; re-embed with one model")
    if len(stats["models"]) > 1:
        raise UsageError(f"{what} {uri} mixes models {', '.join(sorted(stats['models']))}; re-embed with one model")
    if len(stats["weights"]) > 1:
        digests = ", ".join(d[:12] for d in sorted(stats["weights"]))
        raise UsageError(f"{what} {uri} mixes vectors from different weights (sha256 {digests}); re-embed with --mode overwrite")
    return Embeddings(valid.select(*VECTOR_COLUMNS), stats["models"][0], int(stats["min_dim"]), (stats["weights"] or [None])[0],
                      int(stats["rows"]), int(stats["ids"]))

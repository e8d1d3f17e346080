"""The tables between jobs: reading and checking embeddings tables, and the neighbours table's schema."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pyspark.sql import Column, DataFrame, Row, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from jobs import storage
from jobs.errors import UsageError, is_storage_failure
from jobs.filesystems import Location, location

NEIGHBOURS_SCHEMA = T.StructType(
    [
        T.StructField("query_id", T.StringType(), False),
        T.StructField("query_path", T.StringType(), True),
        T.StructField("rank", T.IntegerType(), False),
        T.StructField("neighbor_id", T.StringType(), False),
        T.StructField("neighbor_path", T.StringType(), True),
        T.StructField("neighbor_label", T.StringType(), True),
        T.StructField("distance", T.FloatType(), False),
        T.StructField("similarity", T.FloatType(), False),
    ]
)
VECTOR_COLUMNS = ("image_id", "path", "label", "model", "embedding")
PLACE = ("source_file", "source_row")  # where a row of an embeddings table lies: its file (as the table's filesystem
# opens it) and its row number there
PLACES = pa.schema([("image_id", pa.string()), (PLACE[0], pa.string()), (PLACE[1], pa.int64())])
EMBEDDING = pa.field("embedding", pa.list_(pa.float32()))
FINGERPRINT = "xxhash64(embedding)"  # what a table's and an index's fingerprint column hold (fingerprint())
SPARK_SCHEMA_KEY = (
    b"org.apache.spark.sql.parquet.row.metadata"  # where Spark keeps a table's schema in each file's footer
)


def fingerprint(embedding: str = "embedding") -> Column:
    """An int64 per row that changes when any value of its vector does, made in the JVM (FINGERPRINT), null without
    a vector. The embed job writes it beside each vector and the index keeps it: an update compares fingerprints, not
    vectors."""
    return F.when(F.col(embedding).isNotNull(), F.xxhash64(embedding))


def nullable(field: dict) -> dict:
    """A field of a Spark schema's JSON with its nulls allowed."""
    return {k: True if k in ("nullable", "containsNull", "valueContainsNull") else v for k, v in field.items()}


def footer_schema(spark: SparkSession, uri: str) -> T.StructType | None:
    """A Parquet table's schema from one file's footer, read here with pyarrow (Spark's own inference is a job of
    its own: 0.7-1.7 s of a small search); None where pyarrow cannot open the table or tell its Spark types."""
    import pyarrow.dataset as ds  # here, not at the top: it imports pandas, 0.3 s of every Python worker's start

    place = location(spark, uri)
    if place is None:
        return None
    try:
        dataset = ds.dataset(place.root, format="parquet", filesystem=place.filesystem())
        if not dataset.files or any("/" in f[len(place.root) + 1 :] for f in dataset.files):
            return None  # nothing there, or partition folders (Spark adds their columns)
        schema = dataset.schema
    except (OSError, ValueError, pa.ArrowException):
        return None
    written = (schema.metadata or {}).get(SPARK_SCHEMA_KEY)
    from pyspark.sql.pandas.types import from_arrow_schema

    try:  # as Spark reads a file: every field, element and value may be null
        return (
            T.StructType.fromJson(json.loads(written, object_hook=nullable)) if written else from_arrow_schema(schema)
        )
    except (
        TypeError,
        ValueError,
        KeyError,
    ):  # a type Spark has no name for, or a schema it did not write: Spark infers it
        return None


def read_parquet_or_explain(spark: SparkSession, uri: str, complaint: str) -> DataFrame:
    """The Parquet table at uri; UsageError(complaint) if uri holds none, storage failures as they are."""
    schema = footer_schema(spark, uri)
    try:
        return (spark.read.schema(schema) if schema else spark.read).parquet(uri)
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
    files: list[Row] | None = None  # the files read (source_file()), where asked


def source_file() -> Column:
    """The file a row of a Parquet scan came from: its URI, size and modification time (ms), from Spark's _metadata."""
    return F.struct(
        F.col("_metadata.file_path").alias("path"),
        F.col("_metadata.file_size").alias("size"),
        F.unix_millis(F.col("_metadata.file_modification_time")).alias("mtime_ms"),
    ).alias("source")


def opened(spark: SparkSession, uri: str, what: str) -> tuple[DataFrame, Column]:
    """An embeddings table's rows without an error (its columns checked, its values not: no Spark job) and its
    weights_sha256 column (null for tables from before it). UsageError for a missing table or missing columns."""
    if not storage.exists(spark, uri):
        raise UsageError(f"{what} {uri} does not exist")
    table = read_parquet_or_explain(spark, uri, f"{what} {uri} is not a Parquet table")
    missing = [c for c in VECTOR_COLUMNS if c not in table.columns]
    if missing:
        raise UsageError(f"{what} {uri} is not an embeddings table: missing column(s) {', '.join(missing)}")
    if "error" in table.columns:
        table = table.where(F.col("error").isNull())
    weights = (
        F.col("weights_sha256")
        if "weights_sha256" in table.columns
        else F.lit(None).cast("string").alias("weights_sha256")
    )
    return table, weights


def open_embeddings(spark: SparkSession, uri: str, what: str, sourced: bool = False) -> DataFrame:
    """The rows of an embeddings table that have an embedding: VECTOR_COLUMNS and weights_sha256 (opened()); sourced:
    with each row's file (source_file())."""
    table, weights = opened(spark, uri, what)
    return table.where(F.col("embedding").isNotNull()).select(
        *VECTOR_COLUMNS, weights, *([source_file()] if sourced else [])
    )


def rows_at(places: DataFrame, rows: int, files: Location, partitions: int, dim: int) -> DataFrame:
    """image_id, path, label, embedding of the embeddings table's rows at these places (image_id and PLACE; `rows` of
    them), read with pyarrow by `partitions` tasks, each runs of places (only the row groups that hold them).
    UsageError where a place holds another id (the table changed since its places were taken) or a vector has other
    than `dim` values."""
    schema = "image_id string, path string, label string, embedding array<float>"
    wanted = pa.schema([("image_id", pa.string()), ("path", pa.string()), ("label", pa.string()), EMBEDDING])

    def read(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        fs, asked = files.filesystem(), pa.Table.from_batches(list(batches), PLACES)
        for path in pc.unique(asked.column(PLACE[0])).to_pylist():
            here = asked.filter(pc.equal(asked.column(PLACE[0]), path)).sort_by(PLACE[1])
            with fs.open_input_file(path) as handle:
                found = read_rows(pq.ParquetFile(handle), here.column(PLACE[1]).to_numpy(), wanted.names)
            if not found.column("image_id").equals(here.column("image_id")):
                raise UsageError(f"the embeddings table changed while it was read ({path}); run the job again")
            lengths = pc.list_value_length(found.column("embedding"))
            if pc.any(pc.not_equal(lengths, dim)).as_py():
                raise UsageError(
                    f"{path} has vectors of other than {dim} values, the index's dimension; rebuild with "
                    "--mode overwrite"
                )
            yield from found.cast(wanted).to_batches()

    # runs of about rows / partitions rows of a file go to one task (no sampling job, as a range partitioning runs)
    run = F.floor(F.col(PLACE[1]) / F.lit(max(1, rows // partitions)))
    return places.select(*PLACES.names).repartition(partitions, PLACE[0], run).mapInArrow(read, schema)


def read_rows(parquet: pq.ParquetFile, rows: np.ndarray, columns: list[str]) -> pa.Table:
    """These rows (sorted row numbers) of a Parquet file, reading only the row groups that hold them."""
    sizes = [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)]
    starts = np.concatenate([[0], np.cumsum(sizes)])
    group_of = np.searchsorted(starts, rows, side="right") - 1
    groups = np.unique(group_of)
    read_from = np.concatenate([[0], np.cumsum(np.diff(starts)[groups])])  # where each read group begins
    at = rows - starts[group_of] + read_from[np.searchsorted(groups, group_of)]
    return parquet.read_row_groups(groups.tolist(), columns=columns).take(pa.array(at))


def check_vectors(what: str, uri: str, rows: int, dims: set[int], models: set[str], digests: set[str]) -> None:
    """UsageError unless the table has vectors, all of one length, one model and one weights digest (rows without one
    mix with any)."""
    if rows == 0:
        raise UsageError(f"{what} {uri} has no embedded images (every row failed or it is empty)")
    if len(dims) > 1:
        raise UsageError(
            f"{what} {uri} mixes vector dimensions {', '.join(map(str, sorted(dims)))}; re-embed with one model"
        )
    if len(models) > 1:
        raise UsageError(f"{what} {uri} mixes models {', '.join(sorted(models))}; re-embed with one model")
    if len(digests) > 1:
        raise UsageError(
            f"{what} {uri} mixes vectors from different weights (sha256 {', '.join(d[:12] for d in sorted(digests))}); "
            "re-embed with --mode overwrite"
        )


def table_stats(rows: Column, dims: Column, ids: Column | None = None) -> list[Column]:
    """Aggregates an embeddings table is checked by (check_stats): its rows (non-null values of `rows`), the least and
    greatest vector length, model and weights (min and max tell "one value" from "mixed" in one pass, without
    collecting sets) and, given `ids`, its distinct image ids (a shuffle of the ids: the index needs it)."""
    return [
        F.count(rows).alias("rows"),
        F.min(dims).alias("min_dim"),
        F.max(dims).alias("max_dim"),
        F.min("model").alias("model"),
        F.max("model").alias("other_model"),
        F.min("weights_sha256").alias("weights"),
        F.max("weights_sha256").alias("other_weights"),
        *([F.countDistinct(ids).alias("ids")] if ids is not None else []),
    ]


def check_stats(what: str, uri: str, stats: Row) -> None:
    """UsageError unless table_stats found vectors of one length, model and weights (and each image id once, where
    counted)."""

    def seen(*names: str) -> set:
        return {stats[n] for n in names if stats[n] is not None}

    check_vectors(
        what,
        uri,
        stats["rows"],
        seen("min_dim", "max_dim"),
        seen("model", "other_model"),
        seen("weights", "other_weights"),
    )
    found = stats.asDict()  # distinct ids (table_stats), or the most rows of one id (an index update's diff)
    if found.get("ids", found["rows"]) != found["rows"] or (found.get("copies") or 1) > 1:
        raise UsageError(f"{what} {uri} has repeated image_id values; re-embed with --mode overwrite")


def read_embeddings(
    spark: SparkSession, uri: str, what: str, distinct_ids: bool = False, files: bool = False
) -> Embeddings:
    """Rows of an embeddings table that have an embedding, with the table's model, dimension and weights, checked in one
    pass.

    distinct_ids: also check that each image id comes once (a second shuffle; the index needs it, a search does not).
    files: also say which files were read (one row a file reaches the driver).
    Raises UsageError for a missing table, missing columns, mixed models, weights or dimensions, repeated ids (where
    checked), or no vectors.
    """
    valid = open_embeddings(spark, uri, what, sourced=files)
    stats = valid.agg(
        *table_stats(F.lit(1), F.size("embedding"), F.col("image_id") if distinct_ids else None),
        *([F.collect_set("source").alias("files")] if files else []),
    ).first()
    check_stats(what, uri, stats)
    return Embeddings(
        valid.select(*VECTOR_COLUMNS),
        stats["model"],
        int(stats["min_dim"]),
        stats["weights"],
        int(stats["rows"]),
        stats["files"] if files else None,
    )

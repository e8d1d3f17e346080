"""index: embeddings table -> Spark ML BucketedRandomProjectionLSH model + hashed catalog + index.json.

The model's hash functions are grouped into tables of `--hashes-per-table` hashes each (AND), so that a
bucket holds a small share of the catalog; search probes a query's buckets in every table (OR).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
from pyspark.ml.feature import BucketedRandomProjectionLSH, BucketedRandomProjectionLSHModel
from pyspark.ml.functions import array_to_vector
from pyspark.sql import DataFrame, SparkSession

from jobs import storage
from jobs.errors import UsageError
from jobs.knn import LshParams, bucket_keys
from jobs.runlog import RunSummary, print_summary
from jobs.tables import read_embeddings

CATALOG_SCHEMA = "image_id string, path string, label string, embedding array<float>, buckets array<bigint>"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = LshParams()
    parser.add_argument("--embeddings", required=True, help="embeddings table written by embed")
    parser.add_argument("--output", required=True, help="index folder (replaced atomically on re-runs)")
    parser.add_argument("--bucket-length", type=float, default=defaults.bucket_length, help="BRP bucketLength; with unit vectors 1.0 gives two buckets per hash (a sign bit)")
    parser.add_argument("--num-hash-tables", type=int, default=defaults.tables, help="LSH tables a query probes (OR)")
    parser.add_argument("--hashes-per-table", type=int, default=defaults.hashes_per_table, help="Spark hash functions ANDed into one table's bucket key")
    parser.add_argument("--probes", type=int, default=defaults.probes, help="neighbouring buckets probed per table at search time")
    parser.add_argument("--seed", type=int, default=42, help="random seed of the hash functions")


@dataclass(frozen=True)
class Index:
    """A loaded index: where it is, its parameters, the hash functions and what it was built from."""

    uri: str
    model: str
    dim: int
    count: int
    params: LshParams
    rand_unit_vectors: np.ndarray
    source: str

    @property
    def catalog_uri(self) -> str:
        return f"{self.uri}/catalog"


def rand_unit_vectors(spark: SparkSession, model_uri: str) -> np.ndarray:
    """The fitted model's random unit vectors (numHashTables x dim), read from its saved data."""
    return np.asarray(spark.read.parquet(f"{model_uri}/data").first()[0].toArray(), dtype=np.float32)


def hash_catalog(vectors: DataFrame, projections: np.ndarray, params: LshParams) -> DataFrame:
    """Add each row's bucket keys (one per table) to image_id, path, label, embedding."""

    def hash_batches(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            column = batch.column("embedding")
            matrix = column.flatten().to_numpy(zero_copy_only=False).reshape(len(batch), -1)
            keys = bucket_keys(matrix, projections, params)
            buckets = pa.array(list(keys), type=pa.list_(pa.int64()))
            yield pa.RecordBatch.from_arrays(
                [batch.column("image_id"), batch.column("path"), batch.column("label"), column, buckets],
                names=["image_id", "path", "label", "embedding", "buckets"],
            )

    return vectors.select("image_id", "path", "label", "embedding").mapInArrow(hash_batches, CATALOG_SCHEMA)


def load_index(spark: SparkSession, uri: str) -> Index:
    """Read index.json and the model's hash functions; UsageError if uri is not an index."""
    if not storage.exists(spark, f"{uri}/index.json"):
        raise UsageError(f"{uri} is not an index (no index.json); build one with the index job")
    meta = json.loads(storage.read_text(spark, f"{uri}/index.json"))
    params = LshParams(**meta["params"])
    return Index(uri, meta["model"], meta["dim"], meta["count"], params, rand_unit_vectors(spark, f"{uri}/model"), meta["source"])


def run(spark: SparkSession, args: argparse.Namespace) -> int:
    params = LshParams(args.bucket_length, args.num_hash_tables, args.hashes_per_table, args.probes)
    if min(params.tables, params.hashes_per_table) < 1 or params.probes < 0 or params.bucket_length <= 0:
        raise UsageError("--num-hash-tables and --hashes-per-table must be >= 1, --probes >= 0, --bucket-length > 0")
    if params.hashes_per_table > 64:
        raise UsageError("--hashes-per-table is at most 64")
    summary = RunSummary("index", vars(args))
    with summary.stage("read"):
        vectors, model_name, dim = read_embeddings(spark, args.embeddings, "embeddings table")
        duplicated = vectors.groupBy("image_id").count().where("count > 1").limit(1).count()
        if duplicated:
            raise UsageError(f"embeddings table {args.embeddings} has repeated image_id values; re-embed with --mode overwrite")
    staged = storage.sibling(args.output, "staging")
    with summary.stage("fit"):
        lsh = BucketedRandomProjectionLSH(
            inputCol="features", outputCol="hashes", bucketLength=params.bucket_length,
            numHashTables=params.num_hash_tables, seed=args.seed,
        )
        model: BucketedRandomProjectionLSHModel = lsh.fit(vectors.limit(1).select(array_to_vector("embedding").alias("features")))
        model.write().overwrite().save(f"{staged}/model")
        projections = rand_unit_vectors(spark, f"{staged}/model")
    with summary.stage("hash"):
        hash_catalog(vectors, projections, params).write.parquet(f"{staged}/catalog")
        count = spark.read.parquet(f"{staged}/catalog").count()
    meta = {
        "model": model_name, "dim": dim, "count": count, "params": asdict(params), "source": args.embeddings,
        "spark_num_hash_tables": params.num_hash_tables, "seed": args.seed,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    storage.write_text(spark, f"{staged}/index.json", json.dumps(meta, indent=2))
    with summary.stage("commit"):
        storage.swap_in(spark, staged, args.output)
    summary.count(indexed=count)
    summary.set(index=meta)
    summary.finish()
    storage.write_text(spark, f"{args.output}/_summary.json", summary.to_json())
    print_summary("index summary", [
        ("embeddings", args.embeddings), ("index", args.output), ("model", f"{model_name}, {dim}-d"),
        ("vectors indexed", count),
        ("LSH", f"{params.tables} tables x {params.hashes_per_table} hashes (Spark numHashTables={params.num_hash_tables}), bucketLength {params.bucket_length:g}, {params.probes} probes"),
        ("seconds", f"{summary.data['seconds']['total']:.1f}"),
    ])
    return 0

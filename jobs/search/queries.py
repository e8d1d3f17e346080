"""Where queries come from, as one distributed table: qidx, query_id, query_path, query_label, vector.

vector is float32 bytes (catalog rows) or list<float> (embeddings tables): the probe pass and the scans take
either, so no Python pass converts them first.
"""

from __future__ import annotations

import pyarrow as pa
from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from jobs import storage
from jobs.errors import UsageError
from jobs.filesystems import location
from jobs.ivf import Index
from jobs.runlog import get_logger
from jobs.tables import check_vectors, open_embeddings, read_embeddings

QUERY_COLUMNS = ["query_id", "query_path", "query_label", "vector"]
SPREAD_BYTES = 8 << 20  # queries with more vector bytes than this are spread over the cores before they are probed
log = get_logger("jobs.search")


def numbered(queries: DataFrame, *extra: str) -> DataFrame:
    """A row number (qidx) for the merge; unique within this job, never collected."""
    return queries.select(F.monotonically_increasing_id().alias("qidx"), *QUERY_COLUMNS, *extra)


def renamed(vector: str) -> list[Column]:
    """Catalog or embeddings columns under the queries' names."""
    return [F.col("image_id").alias("query_id"), F.col("path").alias("query_path"), F.col("label").alias("query_label"), F.col(vector).alias("vector")]


def from_embeddings(table: DataFrame) -> DataFrame:
    """Queries from rows of an embeddings table (image_id, path, label, embedding)."""
    return numbered(table.select(*renamed("embedding")))


def check_against_index(uri: str, index: Index, model: str, dim: int, digest: str | None) -> None:
    """UsageError unless a queries table's vectors come from the index's model, dimension and weights."""
    if (model, dim) != (index.model, index.dim):
        raise UsageError(f"queries {uri} are {model} {dim}-d vectors but index {index.uri} holds {index.model} {index.dim}-d; "
                         f"embed the queries with --model {index.model}")
    expected = index.meta.get("weights_sha256")
    if expected and digest and digest != expected:
        source = index.meta.get("weights_source")
        raise UsageError(f"queries {uri} were embedded with weights sha256 {digest[:12]} but index {index.uri} with {expected[:12]}; "
                         f"embed the queries with the index's weights" + (f" (--weights {source})" if source else ""))


def from_table(spark: SparkSession, uri: str, index: Index) -> DataFrame:
    """Queries from an embeddings table, checked against the index first (one Spark pass over the table)."""
    table = read_embeddings(spark, uri, "queries table")
    check_against_index(uri, index, table.model, table.dim, table.weights_sha256)
    return from_embeddings(table.rows)


def unchecked_from_table(spark: SparkSession, uri: str) -> DataFrame:
    """Queries from an embeddings table, carrying model and weights_sha256 for check_seen: the IVF search looks
    at every query anyway, so it checks them there instead of in a pass of its own."""
    return numbered(open_embeddings(spark, uri, "queries table").select(*renamed("embedding"), "model", "weights_sha256"), "model", "weights_sha256")


def estimated_count(spark: SparkSession, uri: str, dim: int) -> int:
    """About how many rows a queries table holds, without a Spark job: its Parquet footers' row counts where pyarrow
    opens it, else its bytes over a vector's (an upper bound: ids and paths made 1,000 queries of 512-d look like 1,314)."""
    import pyarrow.dataset as ds  # here, not at the top: it imports pandas, 0.3 s of every Python worker's start

    place = location(spark, uri)
    if place is not None:
        try:
            return max(1, ds.dataset(place.root, format="parquet", filesystem=place.filesystem()).count_rows())
        except (OSError, ValueError, pa.ArrowException) as error:
            log.info("counting %s from its footers failed (%s): estimated from its bytes", uri, error)
    return max(1, storage.total_size(spark, uri) // (4 * dim))


def spread(spark: SparkSession, table: DataFrame, estimate: int, dim: int) -> DataFrame:
    """Queries of more than SPREAD_BYTES of vectors (estimate: about how many) spread over twice the cores: a file of
    one row group is read by one task, and 100k queries in one file were probed on one core (6.5 s of a 31.6 s search)."""
    if estimate * 4 * dim <= SPREAD_BYTES:
        return table
    return table.repartition(2 * spark.sparkContext.defaultParallelism)


def check_seen(uri: str, index: Index, rows: int, dims: set[int], models: set[str], digests: set[str]) -> None:
    """from_table's checks, on what the probe pass saw of unchecked_from_table's queries."""
    check_vectors("queries table", uri, rows, dims, models, digests)
    check_against_index(uri, index, next(iter(models), "unnamed-model"), next(iter(dims)), next(iter(digests), None))


def catalog(spark: SparkSession, index: Index) -> DataFrame:
    return spark.read.parquet(index.catalog_uri)


def from_catalog(spark: SparkSession, index: Index) -> DataFrame:
    """Every catalog row as a query (kNN graph, duplicates)."""
    return numbered(catalog(spark, index).select(*renamed("vector")))


def resolve_ids(spark: SparkSession, index: Index, names: list[str], shown: int = 5) -> list[str]:
    """The catalog image_id each name stands for: an image_id, a whole path or a unique path suffix.

    UsageError naming the names that match nothing, or a suffix that matches several images (with them).
    """
    rows = catalog(spark, index).select("image_id", "path")
    hits = [F.when((F.col("image_id") == name) | (F.col("path") == name) | F.col("path").endswith("/" + name.lstrip("/")), F.lit(i))
            for i, name in enumerate(names)]
    matched = rows.select("image_id", "path", F.explode(F.array_compact(F.array(*hits))).alias("name")).dropDuplicates(["name", "image_id"])
    # a few matches per name are enough to tell unique from ambiguous: bounded by the command line, not the catalog
    first = matched.withColumn("n", F.row_number().over(Window.partitionBy("name").orderBy("path"))).where(F.col("n") <= shown + 1)
    found: dict[int, list[tuple[str, str]]] = {}
    for row in first.collect():
        found.setdefault(row["name"], []).append((row["image_id"], row["path"]))
    unknown = [name for i, name in enumerate(names) if i not in found]
    if unknown:
        raise UsageError(f"{len(unknown)} query id(s) not in the catalog of {index.uri} (give an image_id, a path or a unique end of one): {', '.join(unknown[:5])}")
    for i, name in enumerate(names):
        if len(found[i]) > 1:
            paths = ", ".join(p for _, p in found[i][:shown]) + (", ..." if len(found[i]) > shown else "")
            raise UsageError(f"query {name!r} matches several catalog images: {paths}; give more of the path")
    return [found[i][0][0] for i in range(len(names))]


def from_ids(spark: SparkSession, index: Index, names: list[str]) -> DataFrame:
    """Catalog rows named by image_id, path or unique path suffix (resolve_ids) as queries."""
    ids = resolve_ids(spark, index, names)
    found = catalog(spark, index).where(F.col("image_id").isin(ids)).dropDuplicates(["image_id"])
    return numbered(found.select(*renamed("vector")))

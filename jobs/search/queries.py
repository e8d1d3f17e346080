"""Where queries come from, as one distributed table: qidx, query_id, query_path, query_label, vector.

vector is float32 bytes (catalog rows) or list<float> (embeddings tables): the probe pass and the scans take
either, so no Python pass converts them first.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from jobs import storage
from jobs.errors import UsageError
from jobs.filesystems import Location, location
from jobs.ivf import Index
from jobs.runlog import get_logger
from jobs.tables import VECTOR_COLUMNS, check_vectors, open_embeddings, read_embeddings

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


@dataclass(frozen=True)
class QueryFiles:
    """A queries table its tasks read themselves with pyarrow: no Spark read of it, whose first use in a job costs
    the driver 1-2 s before the job starts (the JVM's Parquet source and plans). qidx is a row's place in the table."""

    place: Location
    groups: list[tuple[str, int, int]]  # (file, row group, rows) in the table's order
    columns: list[str]  # the vector columns and, where the first file has them (as Spark reads a table), error and weights_sha256

    @property
    def rows(self) -> int:
        return sum(rows for _, _, rows in self.groups)

    @classmethod
    def listed(cls, spark: SparkSession, uri: str) -> QueryFiles | None:
        """The table's row groups from its footers, or None where pyarrow does not open it as one folder of embeddings
        files (then Spark reads it, and says what is wrong with it)."""
        import pyarrow.dataset as ds  # imports pandas: only the driver pays for it

        place = location(spark, uri)
        if place is None:
            return None
        try:
            table = ds.dataset(place.root, format="parquet", filesystem=place.filesystem())
            groups = [(f.path, g.id, g.num_rows) for f in table.get_fragments() for g in f.row_groups]
        except (OSError, ValueError, pa.ArrowException) as error:
            log.info("the tasks cannot read %s themselves (%s): Spark reads it", uri, error)
            return None
        names = table.schema.names
        if any(c not in names for c in VECTOR_COLUMNS) or any(path.rpartition("/")[0] != place.root for path, _, _ in groups):
            return None  # not an embeddings table, or partitioned into folders
        return cls(place, groups, [*VECTOR_COLUMNS, *(c for c in ("error", "weights_sha256") if c in names)])

    def runs(self, tasks: int) -> list[list[tuple[str, int, int, int, int]]]:
        """The rows split into `tasks` runs of about as many rows each: (file, row group, first row, end row, qidx of row 0)."""
        bounds = np.linspace(0, self.rows, tasks + 1).round().astype(np.int64)
        runs: list[list[tuple[str, int, int, int, int]]] = [[] for _ in range(tasks)]
        start = 0
        for path, group, rows in self.groups:
            for task in range(tasks):
                first, end = max(bounds[task], start), min(bounds[task + 1], start + rows)
                if first < end:
                    runs[task].append((path, group, int(first - start), int(end - start), start))
            start += rows
        return runs

    def read(self, run: list[tuple[str, int, int, int, int]]) -> Iterator[pa.RecordBatch]:
        """One run's queries, as the Spark route gives them: qidx, query_id, query_path, query_label, vector, model,
        weights_sha256; rows without an embedding or with an error left out (open_embeddings)."""
        fs = self.place.filesystem()
        for path, group, first, end, qidx in run:
            with fs.open_input_file(path) as handle:
                parquet = pq.ParquetFile(handle)
                present = [c for c in self.columns if c in parquet.schema_arrow.names]  # older files of a table may lack some
                rows = parquet.read_row_group(group, columns=present).slice(first, end - first)
            valid = pc.is_valid(rows.column("embedding"))
            if "error" in present:
                valid = pc.and_(valid, pc.is_null(rows.column("error")))
            numbers = pa.array(np.arange(qidx + first, qidx + end, dtype=np.int64))
            rows = rows.append_column("qidx", numbers).filter(valid).combine_chunks()
            digests = rows.column("weights_sha256").combine_chunks() if "weights_sha256" in present else pa.nulls(len(rows), pa.string())
            yield pa.RecordBatch.from_arrays([rows.column(c).combine_chunks() for c in ("qidx", "image_id", "path", "label", "embedding", "model")] + [digests],
                                             names=["qidx", *QUERY_COLUMNS, "model", "weights_sha256"])


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

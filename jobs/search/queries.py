"""Where queries come from: a queries table (read by the search tasks themselves where pyarrow opens it), catalog
ids, photos, or the catalog itself; each as batches of qidx, query_id, query_path, query_label, vector.

vector is float32 bytes (catalog rows) or list<float> (embeddings tables): the tasks take either.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from jobs import storage
from jobs.errors import UsageError
from jobs.filesystems import SHIPPED, Location, location
from jobs.ivf import Index
from jobs.ivf.files import deletions, live_rows
from jobs.ivf.manifest import CatalogFile
from jobs.runlog import get_logger
from jobs.tables import VECTOR_COLUMNS, check_vectors, open_embeddings, read_embeddings

QUERY_COLUMNS = ["query_id", "query_path", "query_label", "vector"]
log = get_logger("jobs.search")


@dataclass(frozen=True)
class QueryFiles:
    """A table the search tasks read themselves with pyarrow, row group by row group: an embeddings table, or the
    catalog (whose rows carry their own cell, less the rows the index deleted). No Spark read of it: its first use
    in a job costs the driver 1-2 s (the JVM's Parquet source and plans). qidx is a row's place in the table."""

    place: Location
    groups: list[tuple[str, int, int, int]]  # (file, row group, rows, its first row in the file) in the table's order
    columns: list[str]
    deleted: dict[str, CatalogFile] = field(default_factory=dict)  # catalog file -> its entry, which lists deletions
    catalog: bool = False

    @property
    def rows(self) -> int:
        return sum(group[2] for group in self.groups)

    @classmethod
    def listed(cls, spark: SparkSession, uri: str) -> QueryFiles | None:
        """An embeddings table's row groups from its footers, or None where pyarrow does not open it as one folder of
        Parquet files with the columns wanted (then Spark reads it, and says what is wrong with it)."""
        import pyarrow.dataset as ds  # imports pandas: only the driver pays for it

        place = location(spark, uri)
        if place is None:
            return None
        try:
            table = ds.dataset(place.root, format="parquet", filesystem=place.filesystem())
            groups = [(f.path, g.id, g.num_rows, 0) for f in table.get_fragments() for g in f.row_groups]
        except (OSError, ValueError, pa.ArrowException) as error:
            log.info("the tasks cannot read %s themselves (%s): Spark reads it", uri, error)
            return None
        names = table.schema.names
        if any(c not in names for c in VECTOR_COLUMNS) or any(g[0].rpartition("/")[0] != place.root for g in groups):
            return None  # not an embeddings table, or partitioned into folders
        return cls(place, groups, [*VECTOR_COLUMNS, *(c for c in ("error", "weights_sha256") if c in names)])

    @classmethod
    def of_catalog(cls, index: Index, files: Location) -> QueryFiles:
        """The catalog's live rows, file by file in the manifest's order (row groups of neighbouring cells together)."""
        fs, groups = files.filesystem(), []
        for entry in index.manifest.files:
            with fs.open_input_file(f"{files.root}/{entry.name}") as handle:
                meta = pq.ParquetFile(handle).metadata
            sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
            offsets = np.concatenate([[0], np.cumsum(sizes)])
            groups += [(f"{files.root}/{entry.name}", g, sizes[g], int(offsets[g])) for g in range(len(sizes))]
        deleted = {f"{files.root}/{e.name}": e for e in index.manifest.files if e.deleted}
        return cls(files, groups, ["image_id", "path", "label", "vector", "cell"], deleted, catalog=True)

    def runs(self, tasks: int) -> list[list[tuple[str, int, int, int, int, int]]]:
        """The rows split into `tasks` runs of about as many rows each: (file, row group, first row, end row, qidx of
        row 0, the row group's first row in the file)."""
        bounds = np.linspace(0, self.rows, tasks + 1).round().astype(np.int64)
        runs: list[list[tuple[str, int, int, int, int, int]]] = [[] for _ in range(tasks)]
        start = 0
        for path, group, rows, offset in self.groups:
            for task in range(tasks):
                first, end = max(bounds[task], start), min(bounds[task + 1], start + rows)
                if first < end:
                    runs[task].append((path, group, int(first - start), int(end - start), start, offset))
            start += rows
        return runs

    def read(
        self, run: list[tuple[str, int, int, int, int, int]], batch_rows: int | None = None
    ) -> Iterator[pa.RecordBatch]:
        """One run's queries: qidx, query_id, query_path, query_label, vector and, for an embeddings table, model and
        weights_sha256 (rows without an embedding or with an error left out), for the catalog own_cell; batch_rows:
        at most that many rows at a time (a row group is otherwise read whole)."""
        fs, deleted = self.place.filesystem(memory_map=True), {}
        for path, group, first, end, qidx, offset in run:
            with fs.open_input_file(path) as handle:
                parquet = pq.ParquetFile(handle)
                # older files of a table may lack some columns
                present = [c for c in self.columns if c in parquet.schema_arrow.names]
                for at, rows in row_group_rows(parquet, group, present, first, end, batch_rows):
                    numbers = np.arange(qidx + at, qidx + at + len(rows), dtype=np.int64)
                    rows = rows.append_column("qidx", pa.array(numbers))
                    yield self.batch(fs, deleted, path, rows, np.arange(offset + at, offset + at + len(rows)))

    def batch(
        self, fs: pafs.FileSystem, deleted: dict, path: str, rows: pa.Table, numbers: np.ndarray
    ) -> pa.RecordBatch:
        """read()'s batch of these rows of a file (their row numbers in it)."""
        if self.catalog:
            if path in self.deleted and path not in deleted:
                deleted[path] = deletions(fs, self.place.root, self.deleted[path])
            if len(deleted.get(path, ())):
                rows = rows.filter(pa.array(~np.isin(numbers, deleted[path])))
            return batch_of(rows, "vector", own_cell=rows.column("cell").combine_chunks())
        valid = pc.is_valid(rows.column("embedding"))
        if "error" in rows.column_names:
            valid = pc.and_(valid, pc.is_null(rows.column("error")))
        rows = rows.filter(valid)
        names = rows.column_names
        digests = rows.column("weights_sha256") if "weights_sha256" in names else pa.nulls(len(rows), pa.string())
        return batch_of(
            rows,
            "embedding",
            model=rows.column("model").combine_chunks(),
            weights_sha256=pa.array(digests, pa.string()),
        )


def batch_of(rows: pa.Table, vector: str, **extra: pa.Array) -> pa.RecordBatch:
    columns = [rows.column(c).combine_chunks() for c in ("qidx", "image_id", "path", "label", vector)]
    return pa.RecordBatch.from_arrays([*columns, *extra.values()], names=["qidx", *QUERY_COLUMNS, *extra])


@dataclass
class Source:
    """The queries of one search: a DataFrame Spark reads, or files the tasks read themselves, about how many there
    are (counted from footers, never by a Spark job), and the queries table to check against the index, if any."""

    count: int
    frame: DataFrame | None = None
    files: QueryFiles | None = None
    checked: str | None = None  # a queries table whose model, dimension and weights are checked as the tasks see them
    from_catalog: bool = False

    def tasks(
        self, spark: SparkSession, tasks: int
    ) -> tuple[DataFrame, Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]]:
        """What `tasks` tasks map over, and how each turns its input into its share of the query batches."""
        if self.files is None:
            frame = self.frame.repartition(tasks) if tasks > 1 else self.frame.coalesce(1)
            return frame, lambda batches: batches
        files, runs = self.files, self.files.runs(tasks)

        def read(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
            for task in (t for batch in batches for t in batch.column("id").to_pylist()):
                yield from files.read(runs[task])

        return spark.range(tasks, numPartitions=tasks), read


def row_group_rows(
    parquet: pq.ParquetFile, group: int, columns: list[str], first: int, end: int, batch_rows: int | None
) -> Iterator[tuple[int, pa.Table]]:
    """(number of the first, rows) of rows first..end of a row group: at once, or batch_rows at a time."""
    if batch_rows is None:
        yield first, parquet.read_row_group(group, columns=columns).slice(first, end - first)
        return
    at = 0
    for piece in parquet.iter_batches(batch_size=batch_rows, row_groups=[group], columns=columns):
        low, high = max(first, at), min(end, at + len(piece))
        if low < high:
            yield low, pa.Table.from_batches([piece.slice(low - at, high - low)])
        at += len(piece)
        if at >= end:
            return


def numbered(queries: DataFrame, *extra: str) -> DataFrame:
    """A row number (qidx) for the merge; unique within this job, never collected."""
    return queries.select(F.monotonically_increasing_id().alias("qidx"), *QUERY_COLUMNS, *extra)


def renamed(vector: str) -> list[Column]:
    """Catalog or embeddings columns under the queries' names."""
    return [
        F.col("image_id").alias("query_id"),
        F.col("path").alias("query_path"),
        F.col("label").alias("query_label"),
        F.col(vector).alias("vector"),
    ]


def from_embeddings(table: DataFrame) -> DataFrame:
    """Queries from rows of an embeddings table (image_id, path, label, embedding)."""
    return numbered(table.select(*renamed("embedding")))


def check_against_index(uri: str, index: Index, model: str, dim: int, digest: str | None) -> None:
    """UsageError unless a queries table's vectors come from the index's model, dimension and weights."""
    if (model, dim) != (index.model, index.dim):
        raise UsageError(
            f"queries {uri} are {model} {dim}-d vectors but index {index.uri} holds {index.model} {index.dim}-d; "
            f"embed the queries with --model {index.model}"
        )
    expected = index.manifest.weights_sha256
    if expected and digest and digest != expected:
        source = index.manifest.weights_source
        raise UsageError(
            f"queries {uri} were embedded with weights sha256 {digest[:12]} but index {index.uri} with "
            f"{expected[:12]}; "
            f"embed the queries with the index's weights" + (f" (--weights {source})" if source else "")
        )


def check_seen(uri: str, index: Index, rows: int, dims: set[int], models: set[str], digests: set[str]) -> None:
    """A queries table's checks (one model, one dimension, the index's weights) on what the search tasks saw of it."""
    check_vectors("queries table", uri, rows, dims, models, digests)
    check_against_index(uri, index, next(iter(models), "unnamed-model"), next(iter(dims)), next(iter(digests), None))


def from_table(spark: SparkSession, uri: str, index: Index) -> DataFrame:
    """Queries from an embeddings table, checked against the index first (one Spark pass over the table)."""
    table = read_embeddings(spark, uri, "queries table")
    check_against_index(uri, index, table.model, table.dim, table.weights_sha256)
    return from_embeddings(table.rows)


def table_source(spark: SparkSession, uri: str, dim: int) -> Source:
    """A queries table as its search reads it: by the tasks themselves where pyarrow opens it, else by Spark (carrying
    model and weights_sha256, checked as the tasks see them)."""
    files = QueryFiles.listed(spark, uri)
    if files is not None:
        return Source(files.rows, files=files, checked=uri)
    frame = numbered(
        open_embeddings(spark, uri, "queries table").select(*renamed("embedding"), "model", "weights_sha256"),
        "model",
        "weights_sha256",
    )
    return Source(max(1, storage.total_size(spark, uri) // (4 * dim)), frame=frame, checked=uri)


def catalog_queries(spark: SparkSession, index: Index, files: Location) -> DataFrame:
    """Every live catalog row as a query, each carrying its own cell, as a DataFrame."""
    rows = live_rows(spark, index, files, ["image_id", "path", "label", "vector", "cell"])
    return numbered(rows.select(*renamed("vector"), F.col("cell").alias("own_cell")), "own_cell")


def catalog_source(spark: SparkSession, index: Index, files: Location) -> Source:
    """Every live catalog row as a query (kNN graph, duplicates): read by the search tasks with pyarrow where they
    can, else from the copies Spark shipped."""
    if files.kind != SHIPPED:
        return Source(index.count, files=QueryFiles.of_catalog(index, files), from_catalog=True)
    return Source(index.count, frame=catalog_queries(spark, index, files), from_catalog=True)


def resolve_ids(spark: SparkSession, index: Index, files: Location, names: list[str], shown: int = 5) -> list[str]:
    """The catalog image_id each name stands for: an image_id, a whole path or a unique path suffix.

    UsageError naming the names that match nothing, or a suffix that matches several images (with them).
    """
    rows = live_rows(spark, index, files, ["image_id", "path"])
    hits = [
        F.when(
            (F.col("image_id") == name) | (F.col("path") == name) | F.col("path").endswith("/" + name.lstrip("/")),
            F.lit(i),
        )
        for i, name in enumerate(names)
    ]
    matched = rows.select("image_id", "path", F.explode(F.array_compact(F.array(*hits))).alias("name")).dropDuplicates(
        ["name", "image_id"]
    )
    # a few matches per name are enough to tell unique from ambiguous: bounded by the command line, not the catalog
    first = matched.withColumn("n", F.row_number().over(Window.partitionBy("name").orderBy("path"))).where(
        F.col("n") <= shown + 1
    )
    found: dict[int, list[tuple[str, str]]] = {}
    for row in first.collect():
        found.setdefault(row["name"], []).append((row["image_id"], row["path"]))
    unknown = [name for i, name in enumerate(names) if i not in found]
    if unknown:
        raise UsageError(
            f"{len(unknown)} query id(s) not in the catalog of {index.uri} (give an image_id, a path or a unique end "
            f"of one): {', '.join(unknown[:5])}"
        )
    for i, name in enumerate(names):
        if len(found[i]) > 1:
            paths = ", ".join(p for _, p in found[i][:shown]) + (", ..." if len(found[i]) > shown else "")
            raise UsageError(f"query {name!r} matches several catalog images: {paths}; give more of the path")
    return [found[i][0][0] for i in range(len(names))]


def ids_source(spark: SparkSession, index: Index, files: Location, names: list[str]) -> Source:
    """Catalog rows named by image_id, path or unique path suffix (resolve_ids) as queries, with their own cells."""
    ids = resolve_ids(spark, index, files, names)
    found = (
        live_rows(spark, index, files, ["image_id", "path", "label", "vector", "cell"])
        .where(F.col("image_id").isin(ids))
        .dropDuplicates(["image_id"])
    )
    return Source(
        len(ids), frame=numbered(found.select(*renamed("vector"), F.col("cell").alias("own_cell")), "own_cell")
    )

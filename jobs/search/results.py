"""Candidates to answers: each query's k nearest ranked (ties by id), per-range candidates packed and merged, the
table written by the executors (by the tasks that answer, where pyarrow opens the output), and the first answers
shown on the console."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pyspark.sql import Column, DataFrame, Observation, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T
from pyspark.sql.pandas.types import from_arrow_schema, to_arrow_schema

from jobs import storage
from jobs.filesystems import Location, file_per_task, mark_written, writable
from jobs.knn import ranked_within
from jobs.search.scoring import id_keys
from jobs.tables import NEIGHBOURS_SCHEMA

if TYPE_CHECKING:  # the executors import this module: pandas would cost each Python worker ~0.7 s
    import pandas as pd

QUERY_FIELDS = [
    ("qidx", pa.int64()),
    ("query_id", pa.string()),
    ("query_path", pa.string()),
    ("query_label", pa.string()),
]
NEIGHBOUR_FIELDS = [
    ("neighbor_id", pa.string()),
    ("neighbor_path", pa.string()),
    ("neighbor_label", pa.string()),
    ("distance", pa.float32()),
    ("similarity", pa.float32()),
]
PARTIAL_ARROW = pa.schema(QUERY_FIELDS + NEIGHBOUR_FIELDS)  # one candidate a row
PACKED_ARROW = pa.schema(
    QUERY_FIELDS + [(name, pa.list_(kind)) for name, kind in NEIGHBOUR_FIELDS]
)  # a query's candidates in one row
PARTIAL_SCHEMA, PACKED_SCHEMA = from_arrow_schema(PARTIAL_ARROW), from_arrow_schema(PACKED_ARROW)
NEIGHBOUR_COLUMNS = [f.name for f in NEIGHBOURS_SCHEMA.fields]
Batches = Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]


@dataclass(frozen=True)
class Answers:
    """A result table: frame, or (last set) frame's batches through last, a function over Arrow batches whose tasks
    also write the table where pyarrow opens the output: its rows then never pass through the JVM."""

    frame: DataFrame
    last: Batches | None = None
    schema: T.StructType | None = None  # last's rows
    # frame is spark.range(tasks, numPartitions=tasks), task numbers whose tasks read their own input: where they
    # also write the table, the job is one of plain Python tasks, with no SQL plan (a fresh session's first such
    # plan, with its Arrow exchange, cost ~1 s more than the same tasks as an RDD job on 2 cores)
    tasks: int | None = None

    @property
    def table(self) -> DataFrame:
        return self.frame if self.last is None else self.frame.mapInArrow(self.last, self.schema)


BATCH_ROWS = 1 << 15  # rows a task hands Spark at a time: the JVM holds each batch whole (a 1g driver runs local tasks)


def ranked(candidates: pa.Table, k: int) -> pa.RecordBatch:
    """The k nearest candidates of each query, ranked 1..k (ties to the smaller neighbour id): neighbours rows."""
    keys = id_keys(candidates.column("neighbor_id").combine_chunks())
    order, rank = ranked_within(candidates.column("qidx").to_numpy(), candidates.column("distance").to_numpy(), keys, k)
    best = candidates.take(pa.array(order))
    columns = {name: best.column(name).combine_chunks() for name in NEIGHBOUR_COLUMNS if name != "rank"}
    columns["rank"] = pa.array(rank.astype(np.int32) + 1)
    return pa.RecordBatch.from_arrays([columns[name] for name in NEIGHBOUR_COLUMNS], names=NEIGHBOUR_COLUMNS)


def sliced(batch: pa.RecordBatch, rows: int = BATCH_ROWS) -> Iterator[pa.RecordBatch]:
    """The batch in slices of at most `rows` rows."""
    for first in range(0, len(batch), rows):
        yield batch.slice(first, rows)


def packed(candidates: pa.RecordBatch) -> pa.RecordBatch:
    """Candidates (one a row) packed into one row per query: what a range's tile sends to the merge."""
    order = pc.sort_indices(candidates, [("qidx", "ascending")])
    rows = candidates.take(order)
    qidx = rows.column("qidx").to_numpy()
    starts = np.flatnonzero(np.r_[True, qidx[1:] != qidx[:-1]]) if len(qidx) else np.empty(0, np.int64)
    offsets = pa.array(np.append(starts, len(qidx)).astype(np.int32))
    heads = pa.array(starts, pa.int64())
    columns = [rows.column(name).take(heads) for name, _ in QUERY_FIELDS]
    columns += [pa.ListArray.from_arrays(offsets, rows.column(name)) for name, _ in NEIGHBOUR_FIELDS]
    return pa.RecordBatch.from_arrays(columns, schema=PACKED_ARROW)


def unpacked(rows: pa.Table) -> pa.Table:
    """Packed rows back to one candidate a row."""
    rows = rows.combine_chunks()
    lengths = pc.list_value_length(rows.column("distance")).to_numpy(zero_copy_only=False)
    owner = pa.array(np.repeat(np.arange(len(lengths)), lengths))
    columns = [rows.column(name).take(owner) for name, _ in QUERY_FIELDS]
    columns += [pc.list_flatten(rows.column(name)) for name, _ in NEIGHBOUR_FIELDS]
    return pa.Table.from_arrays(columns, schema=PARTIAL_ARROW)


def merged(partials: DataFrame, k: int, tasks: int) -> Answers:
    """Each query's k nearest over the packed candidates of every range it probes, ranked: the neighbours table."""

    def merge(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        rows = pa.Table.from_batches(list(batches), PACKED_ARROW)
        if rows.num_rows:
            yield from sliced(ranked(unpacked(rows), k))

    return Answers(partials.repartition(tasks, "qidx"), merge, NEIGHBOURS_SCHEMA)


def duplicate_pairs(partials: DataFrame) -> DataFrame:
    """The similar pairs a catalog-against-itself range search found (each may be found from both ends), once each as
    (a, b), a < b."""
    query_first = F.col("query_id") < F.col("neighbor_id")

    def side(first: str, second: str) -> Column:
        return F.when(query_first, F.col(first)).otherwise(F.col(second))

    return partials.select(
        side("query_id", "neighbor_id").alias("image_a"),
        side("query_path", "neighbor_path").alias("path_a"),
        side("query_label", "neighbor_label").alias("label_a"),
        side("neighbor_id", "query_id").alias("image_b"),
        side("neighbor_path", "query_path").alias("path_b"),
        side("neighbor_label", "query_label").alias("label_b"),
        "distance",
        "similarity",
    ).dropDuplicates(["image_a", "image_b"])


def write(
    spark: SparkSession, answers: Answers, output: str, by_tasks: bool, check: Callable[[], None] | None = None
) -> int:
    """Write a result table, staged beside output and swapped in, by the tasks that make its rows (by_tasks, as
    planned; Spark's writer where the folder cannot be made) or by Spark; its row count (counted as it is written: no
    second read). check: run once the table is written; if it raises, nothing is swapped in."""
    staged = storage.sibling(output, "staging")
    files = writable(spark, staged) if by_tasks and answers.last is not None else None
    try:
        if files is not None:
            written = write_files(answers, files)
        else:
            observed = Observation("written")
            answers.table.observe(observed, F.count(F.lit(1)).alias("rows")).write.parquet(staged)
            written = int(observed.get["rows"])
        if check:
            check()
    except BaseException:
        storage.delete(spark, staged)
        raise
    storage.swap_in(spark, staged, output)
    return written


def write_files(answers: Answers, files: Location) -> int:
    """The table's rows written by the tasks of its last step, a Parquet file each (an empty one where none has rows,
    as Spark's writer leaves its schema); the rows written."""
    schema, last = to_arrow_schema(answers.schema), answers.last  # not answers: its frame stays on the driver

    def write(fs: pafs.FileSystem, path: str, batches: Iterator[pa.RecordBatch]) -> dict[str, Any] | None:
        return parquet_file(fs, path, schema, last(batches))  # type: ignore[misc]

    task = file_per_task(files, write, pa.schema([("name", pa.string()), ("rows", pa.int64())]))
    if answers.tasks is not None:
        numbers = answers.frame.sparkSession.sparkContext.parallelize(range(answers.tasks), answers.tasks)
        found = numbers.mapPartitions(lambda ids: rows_of(task(numbered_batch(ids)))).collect()  # a row per task
    else:
        found = [row.asDict() for row in answers.frame.mapInArrow(task, "name string, rows bigint").collect()]
    if not found:
        pq.write_table(schema.empty_table(), f"{files.root}/part-00000-empty.parquet", filesystem=files.filesystem())
    mark_written(files)
    return sum(row["rows"] for row in found)


def numbered_batch(ids: Iterator[int]) -> Iterator[pa.RecordBatch]:
    """A task's numbers as the batch its partition of spark.range gives."""
    yield pa.RecordBatch.from_pydict({"id": pa.array(list(ids), pa.int64())})


def rows_of(batches: Iterator[pa.RecordBatch]) -> Iterator[dict[str, Any]]:
    """The batches' rows as dictionaries (what an RDD task returns)."""
    for batch in batches:
        yield from batch.to_pylist()


def parquet_file(
    fs: pafs.FileSystem, path: str, schema: pa.Schema, batches: Iterator[pa.RecordBatch]
) -> dict[str, Any] | None:
    """The batches written to one Parquet file at path (none written: no rows); its rows. A file that fails part way
    is deleted."""
    writer, rows = None, 0
    try:
        for batch in batches:
            if len(batch):
                writer = writer or pq.ParquetWriter(path, schema, filesystem=fs, compression="snappy")
                writer.write_batch(pa.RecordBatch.from_arrays(batch.columns, schema=schema))
                rows += len(batch)
        if writer is not None:
            writer.close()
    except BaseException:
        if writer is not None:
            writer.close()
            fs.delete_file(path)
        raise
    return {"rows": rows} if rows else None


def first_queries(neighbours: DataFrame, limit: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The first `limit` queries by path (query_id, query_path) and their rows sorted by query and rank.

    Spark picks the queries (distinct, then a top-N sort); only the chosen queries' rows reach the driver.
    """
    chosen = (
        neighbours.select("query_id", "query_path").distinct().orderBy("query_path", "query_id").limit(limit).toPandas()
    )
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

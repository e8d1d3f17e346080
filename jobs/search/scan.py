"""Exact and LSH search: queries stream to the driver a block at a time, each block is broadcast and the
whole catalog is scanned once per block (its files read by the executors where pyarrow opens them);
every block's answers are written by the executors."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import pyarrow as pa
from pyspark import Broadcast
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from jobs.ivf import Index, rand_unit_vectors
from jobs.knn import BucketIndex, id_ranks, lsh_topk, nearest, probe_keys, ranks_in_runs, squared_distances, squared_norms
from jobs.runlog import get_logger
from jobs.search import direct
from jobs.search.results import PARTIAL_SCHEMA, nearest_per_query, partial_batch, top_k
from jobs.vectors import matrix_from_binary

log = get_logger("jobs.search")


def blocks(queries: DataFrame, size: int) -> Iterator[pa.RecordBatch]:
    """The queries as Arrow batches of up to `size` rows, one Spark partition at a time on the driver."""
    rows: list = []
    for row in queries.toLocalIterator():
        rows.append(row)
        if len(rows) == size:
            yield to_batch(rows)
            rows = []
    if rows:
        yield to_batch(rows)


def to_batch(rows: list) -> pa.RecordBatch:
    return pa.RecordBatch.from_arrays(
        [pa.array([r.qidx for r in rows], pa.int64()), pa.array([r.query_id for r in rows], pa.string()),
         pa.array([r.query_path for r in rows], pa.string()), pa.array([r.query_label for r in rows], pa.string()),
         pa.array([bytes(r.vector) if isinstance(r.vector, (bytes, bytearray)) else np.asarray(r.vector, np.float32).tobytes() for r in rows], pa.binary())],
        names=["qidx", "query_id", "query_path", "query_label", "vector"])


def catalog_source(spark: SparkSession, index: Index, columns: list[str], reader: str) -> tuple[DataFrame, Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]], int | None]:
    """What a scan maps over, how a task turns its input into catalog batches, and its partitions if known: the
    files, one per task, read by the executors with pyarrow where it opens the catalog, or Spark's own read."""
    files = direct.chosen(spark, index, reader)
    if files is None:
        return spark.read.parquet(index.catalog_uri).select(*columns), lambda batches: batches, None
    return direct.file_table(spark, index), direct.file_reader(files, index, columns), len(index.meta["files"])


class Bound:
    """Each query's k-th smallest squared distance so far in a scan: once every query has k, a batch's rows
    are only gathered where they can still enter (a comparison instead of a partial sort of the whole batch)."""

    def __init__(self, queries: int, k: int) -> None:
        self.k = k
        self.top = np.full((queries, k), np.inf, np.float32)  # each query's k smallest so far, ascending

    def candidates(self, d2: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(query, column, squared distance) of the entries that may be among their query's k nearest."""
        if np.isfinite(self.top[:, -1]).all():
            # a hair above the k-th: rows whose float32 distance ties it still reach the merge, which breaks ties by id
            q, col = np.nonzero(d2 <= np.nextafter(self.top[:, -1], np.inf)[:, None] * np.float32(1 + 1e-6))
        else:
            cols, _ = nearest(d2, keys, self.k)
            q, col = np.nonzero(cols >= 0)
            col = cols[q, col]
        values = d2[q, col]
        if len(q):
            extra = np.full((len(self.top), np.bincount(q).max()), np.inf, np.float32)
            extra[q, ranks_in_runs(q)] = values  # q ascends: nonzero goes row by row
            self.top = np.sort(np.concatenate([self.top, extra], axis=1), axis=1)[:, : self.k]
        return q, col, values


def scan(spark: SparkSession, index: Index, block: pa.RecordBatch, probes: np.ndarray | None, k: int, exclude_self: bool,
         reader: str = "auto") -> tuple[DataFrame, Broadcast]:
    """One pass over the catalog for a broadcast block of queries: the block's k nearest (among LSH candidates
    when probes are given), ranked, and the broadcast to release once they are written."""
    shipped = spark.sparkContext.broadcast((block, probes))
    dim = index.dim
    columns = ["image_id", "path", "label", "vector"] + (["buckets"] if probes is not None else [])
    source, catalog_batches, partitions = catalog_source(spark, index, columns, reader)

    def partition(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        queries, query_probes = shipped.value
        vectors = matrix_from_binary(queries.column("vector"), dim)
        query_sq = squared_norms(vectors)
        own = {q: i for i, q in enumerate(queries.column("query_id").to_pylist())} if exclude_self else {}
        best = None  # the task's k nearest so far: one row set per task, not per batch, goes to the merge
        bound = Bound(len(vectors), k)
        for batch in catalog_batches(batches):
            catalog = matrix_from_binary(batch.column("vector"), dim)
            catalog_sq = squared_norms(catalog)
            ids = batch.column("image_id").to_pylist()
            keys = id_ranks(ids)
            selves = tuple(np.array([(own[i], col) for col, i in enumerate(ids) if i in own], np.int64).reshape(-1, 2).T) if own else None
            if query_probes is None:
                d2 = squared_distances(vectors, catalog, catalog_sq)
                if selves is not None:
                    d2[selves] = np.inf
                q, r, found_d2 = bound.candidates(d2, keys)
            else:
                exclude = None
                if selves is not None:
                    exclude = np.zeros((len(vectors), len(ids)), bool)
                    exclude[selves] = True
                buckets = batch.column("buckets").flatten().to_numpy(zero_copy_only=False).reshape(len(batch), -1)
                idx, dist, _ = lsh_topk(vectors, query_probes, catalog, BucketIndex(buckets), k, exclude)
                q, r = np.nonzero(idx >= 0)
                q, r, found_d2 = q, idx[q, r], dist[q, r] ** 2
            found = pa.Table.from_batches([partial_batch(queries, q, query_sq, batch, r, catalog_sq, found_d2)])
            best = found if best is None else nearest_per_query(pa.concat_tables([best, found]), k)
        if best is not None:
            yield from best.to_batches()

    return top_k(source.mapInArrow(partition, PARTIAL_SCHEMA), k, partitions), shipped


def answer_block(spark: SparkSession, index: Index, block: pa.RecordBatch, method: str, k: int, exclude_self: bool,
                 reader: str = "auto") -> tuple[DataFrame, list[Broadcast], int]:
    """The ranked answers of one block, the broadcasts to release once they are written, and the LSH fallbacks.

    With lsh, a query with fewer than k candidates in its buckets is answered exactly instead.
    """
    if method == "exact":
        ranked, shipped = scan(spark, index, block, None, k, exclude_self, reader)
        return ranked, [shipped], 0
    vectors = matrix_from_binary(block.column("vector"), index.dim)
    projections = rand_unit_vectors(spark, f"{index.uri}/model")
    ranked, shipped = scan(spark, index, block, probe_keys(vectors, projections, index.lsh), k, exclude_self, reader)
    ranked = ranked.cache()
    expected = min(k, index.count - (1 if exclude_self else 0))
    counts = dict(ranked.groupBy("query_id").count().collect())  # one row per query of the block
    short = [i for i, q in enumerate(block.column("query_id").to_pylist()) if counts.get(q, 0) < expected]
    handles = [shipped]
    if short:
        log.info("%d of %d queries had fewer than %d LSH candidates: answering them exactly", len(short), len(block), expected)
        exact, shipped = scan(spark, index, block.take(pa.array(short)), None, k, exclude_self, reader)
        handles.append(shipped)
        ranked = ranked.where(~F.col("query_id").isin([block.column("query_id")[i].as_py() for i in short])).unionByName(exact)
    return ranked, handles, len(short)

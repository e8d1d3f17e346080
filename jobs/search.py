"""search: k nearest neighbours of many queries in one Spark job, or near-duplicate pairs in the catalog.

The queries (an embeddings table, or ids from the catalog) are broadcast; every catalog partition
computes its own top-k per query with numpy (exact, or among LSH candidates) and Spark merges them.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from jobs import storage
from jobs.errors import UsageError
from jobs.index import Index, load_index
from jobs.knn import BucketIndex, exact_topk, lsh_topk, probe_keys
from jobs.runlog import RunSummary, get_logger, print_summary
from jobs.tables import NEIGHBOURS_SCHEMA, read_embeddings

log = get_logger("jobs.search")
PARTIAL_SCHEMA = "query_idx int, neighbor_id string, neighbor_path string, neighbor_label string, distance float, similarity float"
PAIRS_COLUMNS = ["image_a", "path_a", "label_a", "image_b", "path_b", "label_b", "distance", "similarity"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index", required=True, help="index folder written by the index job")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--queries", help="embeddings table of query images (embed run on a folder of queries)")
    source.add_argument("--query-ids", help="comma-separated image_id values from the catalog")
    source.add_argument("--duplicates", action="store_true", help="list catalog pairs closer than --threshold instead")
    parser.add_argument("--output", required=True, help="neighbours table (or duplicate pairs) to write")
    parser.add_argument("-k", type=int, default=10, help="neighbours per query")
    parser.add_argument("--method", default="lsh", choices=["lsh", "exact"], help="lsh: candidates from the index's buckets; exact: brute force")
    parser.add_argument("--exclude-self", action="store_true", help="never return a query as its own neighbour (same image_id)")
    parser.add_argument("--threshold", type=float, help="with --duplicates: maximum Euclidean distance (0.3 ~ cosine 0.955)")
    parser.add_argument("--query-block", type=int, default=4096, help="queries broadcast per Spark job")


@dataclass
class Queries:
    """Query vectors on the driver, with their ids and paths."""

    ids: np.ndarray
    paths: np.ndarray
    labels: np.ndarray
    vectors: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, rows: slice | np.ndarray) -> Queries:
        """The queries at these rows (a slice or an index array)."""
        return Queries(self.ids[rows], self.paths[rows], self.labels[rows], self.vectors[rows])


def queries_from_frame(frame: pd.DataFrame) -> Queries:
    vectors = np.stack(frame["embedding"].to_numpy()).astype(np.float32) if len(frame) else np.empty((0, 0), np.float32)
    return Queries(frame["image_id"].to_numpy(object), frame["path"].to_numpy(object), frame["label"].to_numpy(object), vectors)


def queries_from_table(spark: SparkSession, uri: str, index: Index) -> Queries:
    table, model, dim = read_embeddings(spark, uri, "queries table")
    if (model, dim) != (index.model, index.dim):
        raise UsageError(f"queries {uri} are {model} {dim}-d vectors but index {index.uri} holds {index.model} {index.dim}-d; embed the queries with --model {index.model}")
    return queries_from_frame(table.select("image_id", "path", "label", "embedding").toPandas())


def queries_from_ids(spark: SparkSession, index: Index, ids: list[str]) -> Queries:
    catalog = spark.read.parquet(index.catalog_uri)
    found = catalog.where(F.col("image_id").isin(ids)).select("image_id", "path", "label", "embedding").toPandas()
    unknown = [i for i in ids if i not in set(found["image_id"])]
    if unknown:
        raise UsageError(f"{len(unknown)} query id(s) not in the catalog of {index.uri}: {', '.join(unknown[:5])}")
    return queries_from_frame(found.drop_duplicates("image_id").set_index("image_id").loc[ids].reset_index())


def _partition_topk(batches: Iterator[pa.RecordBatch], queries: Queries, probes: np.ndarray | None, k: int, exclude_self: bool) -> Iterator[pa.RecordBatch]:
    """Executor side: the k nearest catalog rows of this batch for every query."""
    query_rows = {qid: i for i, qid in enumerate(queries.ids)} if exclude_self else {}
    query_norms = np.linalg.norm(queries.vectors, axis=1)
    for batch in batches:
        catalog = batch.column("embedding").flatten().to_numpy(zero_copy_only=False).reshape(len(batch), -1).astype(np.float32)
        ids = batch.column("image_id").to_numpy(zero_copy_only=False)
        exclude = None
        if exclude_self:
            exclude = np.zeros((len(queries), len(batch)), dtype=bool)
            for row, image_id in enumerate(ids):
                if image_id in query_rows:
                    exclude[query_rows[image_id], row] = True
        if probes is None:
            idx, dist = exact_topk(queries.vectors, catalog, k, exclude)
        else:
            keys = batch.column("buckets").flatten().to_numpy(zero_copy_only=False).reshape(len(batch), -1)
            idx, dist, _ = lsh_topk(queries.vectors, probes, catalog, BucketIndex(keys), k, exclude)
        q, rank = np.nonzero(idx >= 0)
        c = idx[q, rank]
        d = dist[q, rank]
        c_norms = np.linalg.norm(catalog[c], axis=1)
        similarity = (query_norms[q] ** 2 + c_norms**2 - d**2) / np.maximum(2 * query_norms[q] * c_norms, 1e-12)
        yield pa.RecordBatch.from_arrays(
            [pa.array(q.astype(np.int32)), pa.array(ids[c], pa.string()), batch.column("path").take(pa.array(c)),
             batch.column("label").take(pa.array(c)), pa.array(d.astype(np.float32)), pa.array(similarity.astype(np.float32))],
            schema=pa.schema([("query_idx", pa.int32()), ("neighbor_id", pa.string()), ("neighbor_path", pa.string()),
                              ("neighbor_label", pa.string()), ("distance", pa.float32()), ("similarity", pa.float32())]),
        )


def top_k(partials: DataFrame, k: int) -> DataFrame:
    """Merge per-partition candidates: the k nearest per query, ranked 1..k (ties broken by id)."""
    order = Window.partitionBy("query_idx").orderBy("distance", "neighbor_id")
    return partials.withColumn("rank", F.row_number().over(order)).where(F.col("rank") <= k)


def _search(spark: SparkSession, catalog: DataFrame, queries: Queries, probes: np.ndarray | None, k: int, exclude_self: bool) -> pd.DataFrame:
    """One Spark job: broadcast the queries, top-k in every catalog partition, merge; exact when probes is None."""
    shipped = spark.sparkContext.broadcast((queries, probes))

    def partition(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        qs, pr = shipped.value
        return _partition_topk(batches, qs, pr, k, exclude_self)

    try:
        return top_k(catalog.mapInArrow(partition, PARTIAL_SCHEMA), k).toPandas()
    finally:
        shipped.unpersist()


def find_neighbours(spark: SparkSession, index: Index, queries: Queries, k: int, method: str, exclude_self: bool) -> tuple[pd.DataFrame, int]:
    """Neighbours of these queries (pandas, neighbours contract + query_idx) and how many needed the exact fallback.

    With lsh, a query with fewer than k candidates in its buckets is answered exactly instead, so every
    query gets k neighbours whenever the catalog has them.
    """
    catalog = spark.read.parquet(index.catalog_uri)
    probes = probe_keys(queries.vectors, index.rand_unit_vectors, index.params) if method == "lsh" else None
    found = _search(spark, catalog, queries, probes, k, exclude_self)
    fallback = 0
    if method == "lsh":
        expected = min(k, index.count - (1 if exclude_self else 0))
        per_query = found.groupby("query_idx").size().reindex(range(len(queries)), fill_value=0).to_numpy()
        short = np.flatnonzero(per_query < expected)
        fallback = len(short)
        if fallback:
            log.info("%d of %d queries had fewer than %d LSH candidates: answering them exactly", fallback, len(queries), k)
            subset = queries.take(short)
            exact = _search(spark, catalog, subset, None, k, exclude_self)
            exact["query_idx"] = short[exact["query_idx"].to_numpy()]
            found = pd.concat([found[~found["query_idx"].isin(short)], exact], ignore_index=True)
    rows = found["query_idx"].to_numpy()
    found["query_id"] = queries.ids[rows]
    found["query_path"] = queries.paths[rows]
    found = found.sort_values(["query_idx", "rank"], kind="stable")
    return found[[f.name for f in NEIGHBOURS_SCHEMA.fields] + ["query_idx"]].reset_index(drop=True), fallback


def duplicate_pairs(neighbours: pd.DataFrame, labels: dict[str, str | None], threshold: float) -> pd.DataFrame:
    """Pairs closer than threshold, each once as (a, b) with a < b, from a catalog-vs-itself search."""
    close = neighbours[neighbours["distance"] < threshold]
    a = np.minimum(close["query_id"].to_numpy(object), close["neighbor_id"].to_numpy(object))
    flipped = close["query_id"].to_numpy(object) != a
    path_q, path_n = close["query_path"].to_numpy(object), close["neighbor_path"].to_numpy(object)
    pairs = pd.DataFrame({
        "image_a": a,
        "path_a": np.where(flipped, path_n, path_q),
        "image_b": np.where(flipped, close["query_id"], close["neighbor_id"]),
        "path_b": np.where(flipped, path_q, path_n),
        "distance": close["distance"].to_numpy(np.float32),
        "similarity": close["similarity"].to_numpy(np.float32),
    }).drop_duplicates(["image_a", "image_b"])
    pairs["label_a"] = pairs["image_a"].map(labels)
    pairs["label_b"] = pairs["image_b"].map(labels)
    return pairs[PAIRS_COLUMNS].sort_values(["distance", "image_a"]).reset_index(drop=True)


def catalog_queries(spark: SparkSession, index: Index) -> Queries:
    frame = spark.read.parquet(index.catalog_uri).select("image_id", "path", "label", "embedding").toPandas()
    return queries_from_frame(frame)


def write_table(spark: SparkSession, frame: pd.DataFrame, schema, output: str) -> int:  # type: ignore[no-untyped-def]
    """Write a small result atomically (staged beside the output, then swapped in)."""
    staged = storage.sibling(output, "staging")
    spark.createDataFrame(frame, schema).write.parquet(staged)
    storage.swap_in(spark, staged, output)
    return len(frame)


PAIRS_SCHEMA = "image_a string, path_a string, label_a string, image_b string, path_b string, label_b string, distance float, similarity float"


def run(spark: SparkSession, args: argparse.Namespace) -> int:
    if args.k < 1:
        raise UsageError("-k must be at least 1")
    if args.query_block < 1:
        raise UsageError("--query-block must be at least 1")
    if not (args.queries or args.query_ids or args.duplicates):
        raise UsageError("give --queries, --query-ids or --duplicates")
    if args.duplicates and args.threshold is None:
        raise UsageError("--duplicates needs --threshold (a Euclidean distance, e.g. 0.3)")
    summary = RunSummary("search", vars(args))
    index = load_index(spark, args.index)
    if args.k > index.count:
        raise UsageError(f"-k {args.k} is larger than the catalog of {index.uri} ({index.count} images)")
    with summary.stage("queries"):
        if args.duplicates:
            queries = catalog_queries(spark, index)
        elif args.queries:
            queries = queries_from_table(spark, args.queries, index)
        else:
            queries = queries_from_ids(spark, index, [i.strip() for i in args.query_ids.split(",") if i.strip()])
    exclude_self = args.exclude_self or args.duplicates
    results, fallback = [], 0
    with summary.stage("search"):
        for start in range(0, len(queries), args.query_block):
            found, short = find_neighbours(spark, index, queries.take(slice(start, start + args.query_block)), args.k, args.method, exclude_self)
            found["query_idx"] += start
            results.append(found)
            fallback += short
            log.info("%d/%d queries answered", min(len(queries), start + args.query_block), len(queries))
    neighbours = pd.concat(results, ignore_index=True)
    with summary.stage("write"):
        if args.duplicates:
            labels = dict(zip(queries.ids, queries.labels))
            written = write_table(spark, duplicate_pairs(neighbours, labels, args.threshold), PAIRS_SCHEMA, args.output)
        else:
            written = write_table(spark, neighbours.drop(columns="query_idx"), NEIGHBOURS_SCHEMA, args.output)
    seconds = summary.data["seconds"]["search"]
    summary.count(queries=len(queries), rows=written, lsh_fallback_queries=fallback, catalog=index.count)
    summary.set(index=args.index, method=args.method, k=args.k, queries_per_second=round(len(queries) / seconds, 2) if seconds else None)
    summary.finish()
    storage.write_text(spark, f"{args.output}/_summary.json", summary.to_json())
    rows = [
        ("index", f"{args.index} ({index.count} images, {index.model})"),
        ("queries", len(queries)), ("method", f"{args.method}, k={args.k}" + (", excluding self" if exclude_self else "")),
        ("duplicate pairs" if args.duplicates else "neighbour rows", written),
        ("output", args.output),
        ("seconds", f"{summary.data['seconds']['total']:.1f} total, {seconds:.1f} searching ({summary.data['queries_per_second']} queries/s)"),
    ]
    if args.method == "lsh":
        rows.append(("lsh fallbacks", f"{fallback} queries had < k candidates and were answered exactly"))
    print_summary("search summary", rows)
    return 0

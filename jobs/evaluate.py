"""evaluate: how good are the answers? recall@k of lsh against exact, and precision@k and mAP by label.

Queries are a sample of the catalog itself (each excluded from its own answers) or, with --queries,
a separate embeddings table. Results are printed and written as JSON (default: beside the index).
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
from pyspark.sql import SparkSession

from jobs import storage
from jobs.errors import UsageError
from jobs.index import load_index
from jobs.runlog import RunSummary, print_summary
from jobs.search import Queries, catalog_queries, find_neighbours, queries_from_table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index", required=True, help="index folder written by the index job")
    parser.add_argument("--queries", help="embeddings table of held-out queries (default: a sample of the catalog, excluding self)")
    parser.add_argument("-k", type=int, default=10, help="neighbours per query")
    parser.add_argument("--sample", type=int, default=500, help="queries to evaluate (random, seeded)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", help="evaluation JSON (default: INDEX/_evaluation.json)")


def recall_at_k(approx: pd.DataFrame, exact: pd.DataFrame, k: int) -> float:
    """Mean over queries of |approx top-k ∩ exact top-k| / (size of exact top-k)."""
    truth = exact[exact["rank"] <= k].groupby("query_id")["neighbor_id"].apply(set)
    found = approx[approx["rank"] <= k].groupby("query_id")["neighbor_id"].apply(set)
    scores = [len(found.get(q, set()) & ids) / len(ids) for q, ids in truth.items() if ids]
    return float(np.mean(scores)) if scores else float("nan")


def label_metrics(neighbours: pd.DataFrame, query_labels: dict[str, str], label_counts: dict[str, int], k: int, self_in_catalog: bool) -> dict[str, float]:
    """precision@k (share of the k neighbours with the query's label) and mAP@k over labelled queries.

    AP@k = sum over ranks i of precision@i * relevant(i), divided by min(k, number of relevant images).
    """
    precisions, average_precisions = [], []
    for query_id, group in neighbours[neighbours["rank"] <= k].groupby("query_id"):
        label = query_labels.get(query_id)
        if label is None:
            continue
        relevant = (group.sort_values("rank")["neighbor_label"].to_numpy() == label).astype(float)
        available = label_counts.get(label, 0) - (1 if self_in_catalog else 0)
        precisions.append(relevant.sum() / k)
        if available > 0:
            hits = np.cumsum(relevant)
            average_precisions.append(float((hits / np.arange(1, len(relevant) + 1) * relevant).sum() / min(k, available)))
    return {
        f"precision@{k}": float(np.mean(precisions)) if precisions else float("nan"),
        f"mAP@{k}": float(np.mean(average_precisions)) if average_precisions else float("nan"),
        "labelled_queries": len(precisions),
    }


def per_query_precision(neighbours: pd.DataFrame, query_labels: dict[str, str], k: int) -> dict[str, float]:
    """query_id -> share of its k neighbours that carry its label (labelled queries only)."""
    out = {}
    for query_id, group in neighbours[neighbours["rank"] <= k].groupby("query_id"):
        if query_labels.get(query_id) is not None:
            out[query_id] = float((group["neighbor_label"] == query_labels[query_id]).sum() / k)
    return out


def sample_queries(queries: Queries, n: int, seed: int) -> Queries:
    if n >= len(queries):
        return queries
    rows = np.sort(np.random.default_rng(seed).choice(len(queries), size=n, replace=False))
    return queries.take(rows)


def run(spark: SparkSession, args: argparse.Namespace) -> int:
    if args.k < 1 or args.sample < 1:
        raise UsageError("-k and --sample must be at least 1")
    summary = RunSummary("evaluate", vars(args))
    index = load_index(spark, args.index)
    held_out = args.queries is not None
    if args.k > index.count - (0 if held_out else 1):
        raise UsageError(f"-k {args.k} is larger than the catalog of {index.uri} allows ({index.count} images)")
    with summary.stage("queries"):
        pool = queries_from_table(spark, args.queries, index) if held_out else catalog_queries(spark, index)
        queries = sample_queries(pool, args.sample, args.seed)
    with summary.stage("exact"):
        exact, _ = find_neighbours(spark, index, queries, args.k, "exact", exclude_self=not held_out)
    with summary.stage("lsh"):
        approx, fallback = find_neighbours(spark, index, queries, args.k, "lsh", exclude_self=not held_out)
    metrics: dict[str, float | int] = {f"recall@{args.k}": recall_at_k(approx, exact, args.k), "queries": len(queries), "lsh_fallback_queries": fallback}
    labels = spark.read.parquet(index.catalog_uri).groupBy("label").count().toPandas()
    label_counts = {r.label: int(r.count) for r in labels.itertuples() if r.label is not None}
    query_labels = {q: lab for q, lab in zip(queries.ids, queries.labels) if lab is not None}
    if query_labels and label_counts:
        for name, frame in (("exact", exact), ("lsh", approx)):
            for key, value in label_metrics(frame, query_labels, label_counts, args.k, not held_out).items():
                metrics[f"{name}_{key}" if key != "labelled_queries" else key] = value
    summary.set(index=args.index, k=args.k, metrics=metrics,
                per_query_precision=per_query_precision(approx, query_labels, args.k) if query_labels else {})
    summary.finish()
    output = args.output or f"{args.index}/_evaluation.json"
    storage.write_text(spark, output, summary.to_json())
    rows = [("index", f"{args.index} ({index.count} images)"), ("queries", f"{len(queries)} {'held out' if held_out else 'sampled from the catalog'}")]
    rows += [(key, f"{value:.4f}" if isinstance(value, float) else value) for key, value in metrics.items() if key != "queries"]
    rows += [("written", output), ("seconds", f"{summary.data['seconds']['total']:.1f}")]
    print_summary("evaluate summary", rows)
    return 0

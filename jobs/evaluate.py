"""evaluate: how good are the answers? recall@k of ivf (or lsh) against exact, and precision@k and mAP by label.

Queries are a sample of the catalog itself (each excluded from its own answers) or, with --queries,
a separate embeddings table. Results are printed and written as JSON (default: beside the index).
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from jobs import ivf, storage
from jobs.errors import UsageError
from jobs.filesystems import Location
from jobs.ivf import Index
from jobs.ivf.files import live_rows
from jobs.runlog import RunSummary, print_summary
from jobs.search import answer, catalog, queries
from jobs.search.queries import Source
from jobs.search.scoring import Wanted


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index", required=True, help="index folder written by the index job")
    parser.add_argument(
        "--queries", help="embeddings table of held-out queries (default: a sample of the catalog, excluding self)"
    )
    parser.add_argument("-k", type=int, default=10, help="neighbours per query")
    parser.add_argument("--sample", type=int, default=500, help="queries to evaluate (random, seeded)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--method", choices=["ivf", "lsh"], help="the approximate method to measure (default: the index's)"
    )
    parser.add_argument("--nprobe", type=int, help="ivf: cells each query probes (default: the index's)")
    parser.add_argument("--output", help="evaluation JSON (default: INDEX/_evaluation.json)")


def recall_at_k(approx: pd.DataFrame, exact: pd.DataFrame, k: int) -> float:
    """Mean over queries of |approx top-k ∩ exact top-k| / (size of exact top-k)."""
    truth = exact[exact["rank"] <= k].groupby("query_id")["neighbor_id"].apply(set)
    found = approx[approx["rank"] <= k].groupby("query_id")["neighbor_id"].apply(set)
    scores = [len(found.get(q, set()) & ids) / len(ids) for q, ids in truth.items() if ids]
    return float(np.mean(scores)) if scores else float("nan")


def label_metrics(
    neighbours: pd.DataFrame, query_labels: dict[str, str], label_counts: dict[str, int], k: int, self_in_catalog: bool
) -> dict[str, float]:
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
            average_precisions.append(
                float((hits / np.arange(1, len(relevant) + 1) * relevant).sum() / min(k, available))
            )
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


def answers(
    spark: SparkSession,
    index: Index,
    sample: DataFrame,
    count: int,
    method: str,
    k: int,
    nprobe: int,
    exclude_self: bool,
    files: Location,
) -> pd.DataFrame:
    """The ranked answers of a bounded sample of queries, on the driver (at most --sample x k rows)."""
    found = answer(spark, index, Source(count, frame=sample), method, Wanted(k, exclude_self), nprobe, files)
    frame = found.answers.table.toPandas()
    frame.attrs["lsh_fallback_queries"] = found.touched(index)["lsh_fallback_queries"]
    return frame


def run(spark: SparkSession, args: argparse.Namespace) -> int:
    if args.k < 1 or args.sample < 1:
        raise UsageError("-k and --sample must be at least 1")
    summary = RunSummary("evaluate", vars(args))
    index = ivf.load(spark, args.index)
    method = args.method or index.manifest.default_method
    if method == "lsh" and index.lsh is None:
        raise UsageError(f"index {index.uri} has no LSH keys; evaluate --method ivf")
    held_out = args.queries is not None
    if args.k > index.count - (0 if held_out else 1):
        raise UsageError(f"-k {args.k} is larger than the catalog of {index.uri} allows ({index.count} images)")
    files = catalog.locate(spark, index)
    with summary.stage("queries"):
        pool = (
            queries.from_table(spark, args.queries, index) if held_out else queries.catalog_queries(spark, index, files)
        )
        sample = pool.orderBy(F.xxhash64("query_id", F.lit(args.seed))).limit(args.sample).cache()
        sampled = sample.select("query_id", "query_label").toPandas()  # at most --sample rows
    nprobe = args.nprobe or index.params.nprobe
    with summary.stage("exact"):
        exact = answers(spark, index, sample, len(sampled), "exact", args.k, nprobe, not held_out, files)
    with summary.stage(method):
        approx = answers(spark, index, sample, len(sampled), method, args.k, nprobe, not held_out, files)
    sample.unpersist()
    metrics: dict[str, float | int] = {f"recall@{args.k}": recall_at_k(approx, exact, args.k), "queries": len(sampled)}
    if method == "lsh":
        metrics["lsh_fallback_queries"] = approx.attrs.get("lsh_fallback_queries", 0)
    labels = live_rows(spark, index, files, ["label"]).groupBy("label").count().toPandas()  # a row a label
    label_counts = {r.label: int(r.count) for r in labels.itertuples() if r.label is not None}
    query_labels = {q: lab for q, lab in zip(sampled["query_id"], sampled["query_label"]) if lab is not None}
    if query_labels and label_counts:
        for name, frame in (("exact", exact), (method, approx)):
            for key, value in label_metrics(frame, query_labels, label_counts, args.k, not held_out).items():
                metrics[f"{name}_{key}" if key != "labelled_queries" else key] = value
    summary.set(
        index=args.index,
        method=method,
        nprobe=nprobe if method == "ivf" else None,
        k=args.k,
        metrics=metrics,
        per_query_precision=per_query_precision(approx, query_labels, args.k) if query_labels else {},
    )
    summary.finish()
    output = args.output or f"{args.index}/_evaluation.json"
    storage.write_text(spark, output, summary.to_json())
    rows = [
        ("index", f"{args.index} ({index.count} images)"),
        ("queries", f"{len(sampled)} {'held out' if held_out else 'sampled from the catalog'}"),
        ("method", f"{method}" + (f", nprobe {nprobe} of {index.cells} cells" if method == "ivf" else "")),
    ]
    rows += [
        (key, f"{value:.4f}" if isinstance(value, float) else value)
        for key, value in metrics.items()
        if key != "queries"
    ]
    rows += [("written", output), ("seconds", f"{summary.data['seconds']['total']:.1f}")]
    print_summary("evaluate summary", rows)
    return 0

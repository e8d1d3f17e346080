"""report: neighbours table -> contact sheets (PNG), a self-contained HTML gallery and an embedding map.

Writes to any URI the jobs can read (local, s3a://, s3://, gs://, hdfs://) through Hadoop's filesystem, into a
folder beside the target that is swapped in at the end. A big neighbours table is never collected: Spark picks
--max-queries queries (the first by path) and only their rows reach the driver; the map plots at most
--map-points sampled embeddings.
"""

from __future__ import annotations

import argparse
import hashlib
import html
import json

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from jobs import storage
from jobs.errors import UsageError
from jobs.report.draw import Sheet, draw_sheet, embedding_map, png_bytes, sheet_size
from jobs.runlog import RunSummary, get_logger, print_summary
from jobs.search.results import first_queries

__all__ = ["add_arguments", "run", "sheet_size"]
log = get_logger("jobs.report")
NEIGHBOUR_COLUMNS = {"query_id", "query_path", "rank", "neighbor_id", "neighbor_path", "neighbor_label", "similarity"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--neighbours", required=True, help="neighbours table written by search")
    parser.add_argument(
        "--output",
        required=True,
        help="folder (local, s3a://, gs://, hdfs://) for index.html, sheets/ and embedding_map.png",
    )
    parser.add_argument(
        "--embeddings",
        action="append",
        default=[],
        help="embeddings table(s): labels of the queries and the points of the map (repeatable)",
    )
    parser.add_argument("--evaluation", help="evaluation JSON written by evaluate, shown in the gallery")
    parser.add_argument(
        "--max-queries", type=int, default=50, help="contact sheets for at most this many queries (the first by path)"
    )
    parser.add_argument("--map-points", type=int, default=5000, help="points drawn on the embedding map (sampled)")


def pca_points(spark: SparkSession, uris: list[str], limit: int) -> pd.DataFrame:
    """A seeded sample of at most `limit` embeddings, projected to 2-D by their own principal components: the map
    draws these points, and a few thousand fix its two axes as well as every row would (fitted on the driver, on the
    sample alone: no pass over the tables but the sample's)."""
    tables = [
        spark.read.parquet(u)
        .where(F.col("embedding").isNotNull())
        .select("image_id", "path", "label", "model", "embedding")
        for u in uris
    ]
    table = tables[0]
    for other in tables[1:]:
        table = table.unionByName(other)
    # a seeded random top-N (each partition keeps at most `limit` rows): min(limit, rows) points reach the driver
    sampled = table.orderBy(F.rand(seed=0)).limit(limit).toPandas()
    if sampled.empty:
        return sampled.drop(columns="embedding").assign(x=[], y=[])
    matrix = np.array(sampled["embedding"].tolist(), np.float64)
    centred = matrix - matrix.mean(axis=0)
    axes = np.linalg.svd(centred, full_matrices=False)[2][:2]  # fewer than 2 where there are fewer points or dims
    xy = np.pad(centred @ axes.T, ((0, 0), (0, 2 - len(axes))))
    return sampled.drop(columns="embedding").assign(x=xy[:, 0], y=xy[:, 1])


def gallery_html(sheets: list[tuple[Sheet, str]], facts: list[tuple[str, str]], has_map: bool) -> str:
    """index.html: facts, then every query's sheet with its precision. Everything shown is escaped."""
    e = html.escape
    rows = "\n".join(f"<tr><th>{e(k)}</th><td>{e(str(v))}</td></tr>" for k, v in facts)
    cards = []
    for sheet, file_name in sheets:
        precision = (
            ""
            if sheet.precision is None
            else f' <span class="p">precision@{len(sheet.neighbours)} {sheet.precision:.2f}</span>'
        )
        label = "" if sheet.query_label is None else f" — {e(sheet.query_label)}"
        cards.append(
            f'<section id="{e(sheet.query_id)}"><h2>{e(sheet.query_path.rsplit("/", 1)[-1])}{label}{precision}</h2>'
            f'<p class="path">{e(sheet.query_path)}</p>'
            f'<a href="sheets/{e(file_name)}"><img src="sheets/{e(file_name)}" '
            f'alt="{e(sheet.query_path)}" loading="lazy"></a></section>'
        )
    figure = '<h2>Embedding map</h2><img src="embedding_map.png" alt="embedding map">' if has_map else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Vehicle similarity search report</title>
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src 'self'; style-src 'unsafe-inline'">
<style>body{{font-family:system-ui,sans-serif;margin:24px;color:#222;background:#fafafa}}table{{border-collapse:collapse;margin-bottom:16px}}
th,td{{text-align:left;padding:3px 12px 3px 0}}section{{background:#fff;padding:8px 12px;margin:12px 0;border-
radius:6px;box-shadow:0 1px 3px #0002}}
section img{{max-width:100%}}h2{{font-size:16px;margin:4px 0}}.p{{color:#2e7d32;font-weight:normal;margin-
left:8px}}.path{{color:#777;font-size:12px;margin:0 0 6px}}</style>
</head><body><h1>Vehicle similarity search</h1><table>{rows}</table>{figure}
<h2>{len(sheets)} queries</h2>
{chr(10).join(cards)}
</body></html>
"""


def query_labels(spark: SparkSession, uris: list[str], queries: pd.DataFrame) -> dict[str, str | None]:
    """Labels of the queries from the embeddings tables, else their folder names."""
    found: dict[str, str | None] = {}
    wanted = spark.createDataFrame(queries[["query_id"]].drop_duplicates(), "query_id string")
    for uri in uris:
        rows = (
            spark.read.parquet(uri)
            .select(F.col("image_id").alias("query_id"), "label")
            .join(F.broadcast(wanted), "query_id")
        )
        found.update({r.query_id: r.label for r in rows.collect()})
    return {
        q: found.get(q, p.rsplit("/", 2)[-2] if p.count("/") >= 2 else None)
        for q, p in zip(queries["query_id"], queries["query_path"])
    }


def sample_queries(neighbours: DataFrame, limit: int) -> tuple[pd.DataFrame, pd.DataFrame, int]:
    """The first `limit` queries by path, their rows sorted by query and rank, and the number of queries."""
    chosen, rows = first_queries(neighbours, limit)
    return chosen, rows, neighbours.select("query_id", "query_path").distinct().count() if len(chosen) else 0


def checked_inputs(spark: SparkSession, args: argparse.Namespace) -> DataFrame:
    """The neighbours table; UsageError for a bad option, a missing table or one that holds no neighbours."""
    if args.max_queries < 1 or args.map_points < 1:
        raise UsageError("--max-queries and --map-points must be at least 1")
    if not storage.exists(spark, args.neighbours):
        raise UsageError(f"neighbours table {args.neighbours} does not exist")
    for uri in args.embeddings:
        if not storage.exists(spark, uri):
            raise UsageError(f"embeddings table {uri} does not exist")
    neighbours = spark.read.parquet(args.neighbours)
    missing = NEIGHBOUR_COLUMNS - set(neighbours.columns)
    if missing:
        raise UsageError(f"{args.neighbours} is not a neighbours table: missing {', '.join(sorted(missing))}")
    return neighbours


def gallery_facts(
    spark: SparkSession, args: argparse.Namespace, sheets: list[tuple[Sheet, str]], total_queries: int, k: int
) -> list[tuple[str, str]]:
    """The lines atop the gallery: the search that wrote the neighbours, the precision shown, the evaluation."""
    facts: list[tuple[str, str]] = [
        ("neighbours", args.neighbours),
        ("queries shown", f"{len(sheets)} of {total_queries}"),
    ]
    facts.append(("k", str(k)))
    if storage.exists(spark, f"{args.neighbours}/_summary.json"):
        run_info = json.loads(storage.read_text(spark, f"{args.neighbours}/_summary.json"))
        facts += [
            ("index", run_info.get("index", "")),
            ("method", run_info.get("method", "")),
            ("catalog images", run_info.get("counts", {}).get("catalog", "")),
        ]
    precisions = [s.precision for s, _ in sheets if s.precision is not None]
    if precisions:
        facts.append((f"mean precision@{k} (shown queries)", f"{np.mean(precisions):.3f}"))
    if args.evaluation:
        evaluation = json.loads(storage.read_text(spark, args.evaluation))
        facts += [
            (key, f"{v:.4f}" if isinstance(v, float) else str(v)) for key, v in evaluation.get("metrics", {}).items()
        ]
    return facts


def run(spark: SparkSession, args: argparse.Namespace) -> int:
    neighbours = checked_inputs(spark, args)
    summary = RunSummary("report", vars(args))
    output = storage.qualify(spark, args.output)
    staging = storage.sibling(output, "staging")
    with summary.stage("sample"):
        order, frame, total_queries = sample_queries(neighbours, args.max_queries)
        labels = query_labels(spark, args.embeddings, order)
    k = int(frame["rank"].max()) if len(frame) else 0
    sheets, cache = [], {}
    with summary.stage("sheets"):
        for n, (query_id, query_path) in enumerate(order.itertuples(index=False), 1):
            sheet = Sheet(query_id, query_path, labels.get(query_id), frame[frame["query_id"] == query_id])
            file_name = f"{n:04d}_{hashlib.sha1(query_id.encode()).hexdigest()[:10]}.png"
            storage.write_bytes(spark, f"{staging}/sheets/{file_name}", png_bytes(draw_sheet(spark, sheet, k, cache)))
            sheets.append((sheet, file_name))
            if n % 10 == 0:
                log.info("%d/%d contact sheets", n, len(order))
    has_map = bool(args.embeddings)
    if has_map:
        with summary.stage("map"):
            points = pca_points(spark, args.embeddings, args.map_points)
            storage.write_bytes(spark, f"{staging}/embedding_map.png", embedding_map(points, spark))
            summary.count(map_points=len(points))
    facts = gallery_facts(spark, args, sheets, total_queries, k)
    storage.write_text(spark, f"{staging}/index.html", gallery_html(sheets, facts, has_map))
    summary.count(
        sheets=len(sheets), queries=total_queries, placeholders=sum("placeholder" in img.info for img in cache.values())
    )
    summary.finish()
    storage.write_text(spark, f"{staging}/report_summary.json", summary.to_json())
    storage.swap_in(spark, staging, output)
    print_summary(
        "report summary",
        [
            ("contact sheets", f"{len(sheets)} of {total_queries} queries in {output}/sheets"),
            ("embedding map", f"{output}/embedding_map.png" if has_map else "(no --embeddings given)"),
            ("gallery", f"{output}/index.html"),
            ("seconds", f"{summary.data['seconds']['total']:.1f}"),
        ],
    )
    return 0

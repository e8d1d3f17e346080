"""The cells' KMeans on both sides of DRIVER_SAMPLE_BYTES: numpy on the driver against Spark ML on the same sample.

  python bench/train.py [--points glove:300000,clustered:10000,clustered:50000,clustered:100000,...]

Each point is a catalog (GloVe 6B 50-d, or unit vectors around random centres, 100 a centre, noise 0.6, 512-d unless
kind:size:dim says otherwise) written
as an embeddings table and trained as the index job trains it (its default cells and sample, 10 iterations, seed 42),
in one local[2] session: once by the trainer the job picks (the driver where the sample is at most
DRIVER_SAMPLE_BYTES) and once by the other. Quality is the mean cosine of every catalog row to its nearest centroid
and the largest cell against the mean. The points lie on both sides of both bounds: 512-d at 50k and 100k rows
(the sample's bytes), 128-d at 200k and 300k (the products of an iteration; the sample's bytes fit at both).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "tests")]

from common import HIGHER, LOWER, note, print_table, write_json  # noqa: E402
from search import data_of, vectors_of  # noqa: E402

from jobs.index import train  # noqa: E402
from jobs.ivf import cell_scores  # noqa: E402
from scripts.vectors import clustered_unit_vectors  # noqa: E402

COLUMNS = {
    "catalog": "the catalog trained on",
    "cells": "cells (KMeans k): the index job's default, about 4 x sqrt(rows)",
    "sample_mib": "the training sample: rows x dimension x 4 bytes",
    "products_g": "sample rows x cells x dimension, in billions: the products of one iteration",
    "picked": "the trainer the index job picks: driver (numpy) up to DRIVER_SAMPLE_BYTES and DRIVER_PRODUCTS, else "
    "spark (Spark ML)",
    "driver_s": f"seconds to train on the driver, sample collected; {LOWER}",
    "spark_s": f"seconds to train with Spark ML KMeans (cosine, block solver); {LOWER}",
    "driver_x_spark": f"driver_s / spark_s; {LOWER}",
    "driver_cosine": f"mean cosine of every row to its nearest centroid, driver's cells; {HIGHER}",
    "spark_cosine": f"the same, Spark ML's cells; {HIGHER}",
    "driver_largest": f"largest cell / mean cell, driver's cells; {LOWER}",
    "spark_largest": f"the same, Spark ML's cells; {LOWER}",
}


def quality(vectors: np.ndarray, centroids: np.ndarray) -> tuple[float, float]:
    """Mean cosine of the rows to their nearest centroid, and the largest cell over the mean."""
    nearest, best = [], []
    for start in range(0, len(vectors), 8192):
        scores = cell_scores(vectors[start : start + 8192], centroids, True)
        nearest.append(scores.argmin(axis=1))
        best.append(-scores.min(axis=1))
    sizes = np.bincount(np.concatenate(nearest), minlength=len(centroids))
    return float(np.concatenate(best).mean()), float(sizes.max() / sizes.mean())


def trained(rows, count: int, dim: int, driver: bool) -> tuple[float, np.ndarray]:
    """Seconds and centroids of the index job's training, on the driver or with Spark ML."""
    cells = train.default_cells(count)
    sample = min(count, max(32 * cells, 10_000))
    saved, train.on_driver = train.on_driver, lambda *_: driver
    try:
        started = time.perf_counter()
        centroids = train.train_centroids(rows, count, dim, cells, sample, 10, 42)
        return time.perf_counter() - started, centroids
    finally:
        train.on_driver = saved


def point(spark, folder: Path, kind: str, count: int, dim: int | None) -> dict:
    from pyspark.sql import functions as F

    vectors = clustered_unit_vectors(count, dim, noise=0.6, seed=7)[0] if dim else vectors_of(kind, count, 0)[0]
    dim = vectors.shape[1]
    path = folder / f"{kind}_{count}_{dim}"
    path.mkdir()
    for part, rows in enumerate(np.array_split(np.arange(count), 4)):
        embedding = pa.ListArray.from_arrays(np.arange(len(rows) + 1, dtype=np.int32) * dim, vectors[rows].ravel())
        ids = pa.array([f"r{i}" for i in rows])
        pq.write_table(pa.table({"image_id": ids, "embedding": embedding}), path / f"part-{part}.parquet")
    rows = spark.read.parquet(str(path)).where(F.col("embedding").isNotNull())
    cells = train.default_cells(count)
    sample = min(count, max(32 * cells, 10_000))
    found = {
        "catalog": f"{kind} {count:,} x {dim}",
        "dim": dim,
        "cells": cells,
        "sample_mib": round(sample * dim * 4 / 2**20, 1),
        "products_g": round(sample * cells * dim / 1e9, 1),
        "picked": "driver" if train.on_driver(sample, cells, dim) else "spark",
    }
    for name in ("driver", "spark"):
        seconds, centroids = trained(rows, count, dim, name == "driver")
        found[f"{name}_s"] = seconds
        found[f"{name}_cosine"], found[f"{name}_largest"] = quality(vectors, centroids)
    found["driver_x_spark"] = found["driver_s"] / found["spark_s"]
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--points",
        default="glove:300000,clustered:10000,clustered:50000,clustered:100000,clustered:200000:128,"
        "clustered:300000:128",
        help="kind:size[:dim], comma-separated",
    )
    parser.add_argument("--name", default="train")
    args = parser.parse_args()
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    from jobs.cli import spark_session

    spark = spark_session("bench-train", {"spark.master": "local[2]", "spark.driver.memory": "4g"})
    spark.sparkContext.setLogLevel("ERROR")
    rows, data = [], []
    with tempfile.TemporaryDirectory(dir=ROOT / "bench" / "data") as folder:
        for spec in args.points.split(","):
            kind, size, *dim = spec.split(":")
            rows.append(point(spark, Path(folder), kind, int(size), int(dim[0]) if dim else None))
            data.append(data_of(kind, int(size), rows[-1]["dim"]))
            print(rows[-1], flush=True)
    spark.stop()
    table = [[round(r[h], 3) if isinstance(r[h], float) else r[h] for h in COLUMNS] for r in rows]
    print_table(
        f"the cells' KMeans, driver against Spark ML, local[2]; the driver's bounds: "
        f"{train.DRIVER_SAMPLE_BYTES >> 20} MiB of sample, {train.DRIVER_PRODUCTS / 1e9:.1f}G products an iteration",
        list(COLUMNS),
        table,
        COLUMNS,
    )
    note("Each trainer runs once a point, after the table is written; the driver's time includes collecting it.")
    write_json(args.name, {"parameters": vars(args), "data": data, "results": rows})


if __name__ == "__main__":
    main()

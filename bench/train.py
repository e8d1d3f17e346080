"""The cells' KMeans on both sides of DRIVER_SAMPLE_BYTES: numpy on the driver against Spark ML on the same sample.

  python bench/train.py [--points glove:300000,clustered:10000,clustered:50000,clustered:100000]

Each point is a catalog (GloVe 6B 50-d, or 512-d unit vectors around random centres, 100 a centre, noise 0.6) written
as an embeddings table and trained as the index job trains it (its default cells and sample, 10 iterations, seed 42),
in one local[2] session: once by the trainer the job picks (the driver where the sample is at most
DRIVER_SAMPLE_BYTES) and once by the other. Quality is the mean cosine of every catalog row to its nearest centroid
and the largest cell against the mean; the clustered points put samples on both sides of the threshold.
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

from common import note, print_table, write_json  # noqa: E402
from search import data_of, vectors_of  # noqa: E402

from jobs.index import train  # noqa: E402
from jobs.ivf import cell_scores  # noqa: E402

LOWER, HIGHER = "lower is better", "higher is better"
COLUMNS = {
    "catalog": "the catalog trained on",
    "cells": "cells (KMeans k): the index job's default, about 4 x sqrt(rows)",
    "sample_mib": "the training sample: rows x dimension x 4 bytes",
    "picked": "the trainer the index job picks: driver (numpy) up to DRIVER_SAMPLE_BYTES, else spark (Spark ML)",
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


def trained(rows, count: int, dim: int, threshold: int) -> tuple[float, np.ndarray]:
    """Seconds and centroids of the index job's training, with DRIVER_SAMPLE_BYTES set to threshold."""
    cells = train.default_cells(count)
    sample = min(count, max(32 * cells, 10_000))
    saved, train.DRIVER_SAMPLE_BYTES = train.DRIVER_SAMPLE_BYTES, threshold
    try:
        started = time.perf_counter()
        centroids = train.train_centroids(rows, count, dim, cells, sample, 10, 42)
        return time.perf_counter() - started, centroids
    finally:
        train.DRIVER_SAMPLE_BYTES = saved


def point(spark, folder: Path, kind: str, count: int) -> dict:
    from pyspark.sql import functions as F

    vectors, _ = vectors_of(kind, count, 0)
    dim = vectors.shape[1]
    path = folder / f"{kind}_{count}"
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
        "cells": cells,
        "sample_mib": round(sample * dim * 4 / 2**20, 1),
        "picked": "driver" if sample * dim * 4 <= train.DRIVER_SAMPLE_BYTES else "spark",
    }
    for name, threshold in (("driver", 2**62), ("spark", -1)):
        seconds, centroids = trained(rows, count, dim, threshold)
        found[f"{name}_s"] = seconds
        found[f"{name}_cosine"], found[f"{name}_largest"] = quality(vectors, centroids)
    found["driver_x_spark"] = found["driver_s"] / found["spark_s"]
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", default="glove:300000,clustered:10000,clustered:50000,clustered:100000")
    parser.add_argument("--name", default="train")
    args = parser.parse_args()
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    from jobs.cli import spark_session

    spark = spark_session("bench-train", {"spark.master": "local[2]", "spark.driver.memory": "4g"})
    spark.sparkContext.setLogLevel("ERROR")
    rows, data = [], []
    with tempfile.TemporaryDirectory(dir=ROOT / "bench" / "data") as folder:
        for spec in args.points.split(","):
            kind, size = spec.split(":")
            rows.append(point(spark, Path(folder), kind, int(size)))
            data.append(data_of(kind, int(size), 50 if kind == "glove" else 512))
            print(rows[-1], flush=True)
    spark.stop()
    table = [[round(r[h], 3) if isinstance(r[h], float) else r[h] for h in COLUMNS] for r in rows]
    print_table(
        f"the cells' KMeans, driver against Spark ML, local[2]; threshold {train.DRIVER_SAMPLE_BYTES / 2**20:.0f} MiB",
        list(COLUMNS),
        table,
        COLUMNS,
    )
    note("Each trainer runs once a point, after the table is written; the driver's time includes collecting it.")
    write_json(args.name, {"parameters": vars(args), "data": data, "results": rows})


if __name__ == "__main__":
    main()

"""Train the coarse quantizer: KMeans (cosine) on a sample of the catalog, on the driver where the sample is small and
with Spark ML otherwise, cells renumbered in locality order."""

from __future__ import annotations

import numpy as np
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from jobs.errors import UsageError
from jobs.ivf import cell_scores


def default_cells(count: int) -> int:
    """About 4 x sqrt(N) cells, as FAISS suggests for IVF-Flat, and never more cells than vectors."""
    return max(1, min(count, round(4 * np.sqrt(count))))


def default_nprobe(cells: int) -> int:
    """About 2.25 x sqrt(cells): on GloVe's 2,191 cells 2 x gave the kNN graph recall@10 0.949, 2.25 x 0.956."""
    return max(1, min(cells, round(2.25 * np.sqrt(cells))))


# A small sample trains on the driver: Spark ML's KMeans runs a dozen Spark jobs whatever the sample's size, 11 s of
# a pipeline on 24 photos on a two-worker cluster, while numpy trains 64 MiB of vectors in a few seconds
# (bench/train.py). Two bounds keep the driver's share fixed: the sample's bytes (its memory) and the products an
# iteration computes, sample rows x cells x dimension (its time: about 4 s for 10 iterations on 2 cores). With the
# default sample (32 rows a cell, 4 sqrt(N) cells) that is catalogs of up to 65k rows at 512-d, 262k at 128-d and
# 671k at 50-d; larger ones train on the executors.
DRIVER_SAMPLE_BYTES = 64 << 20
DRIVER_PRODUCTS = 1 << 34
SCORES_BYTES = 64 << 20  # the scores of sample rows against every centroid held at once on the driver


def train_centroids(
    vectors: DataFrame, count: int, dim: int, cells: int, sample: int, iterations: int, seed: int
) -> np.ndarray:
    """(cells, dim) float32 unit centroids, spherical KMeans (cosine) on a seeded sample of `embedding`, in locality
    order: on the driver where the sample is small (on_driver), else Spark ML's KMeans (block solver)."""
    fraction = min(1.0, 1.1 * sample / max(count, 1))
    rows = vectors.sample(fraction=fraction, seed=seed) if fraction < 1.0 else vectors
    rows = rows.where(F.exists("embedding", lambda x: x != 0)).limit(sample)  # cosine is undefined for a zero vector
    if on_driver(sample, cells, dim):
        # bounded by DRIVER_SAMPLE_BYTES; in the order of the ids, not of the files (which a local copy of the same
        # table lists otherwise), so that the same rows give the same cells
        sampled = rows.select("image_id", "embedding").toPandas().sort_values("image_id", kind="stable")
        if sampled.empty:
            raise UsageError("the embeddings table has no non-zero vector to train the cells on")
        data = np.stack(sampled["embedding"].to_list()).astype(np.float32)
        centroids = spherical_kmeans(data, cells, iterations, seed)
    else:
        centroids = spark_kmeans(rows, cells, iterations, seed)
    return centroids[locality_order(centroids)]


def on_driver(sample: int, cells: int, dim: int) -> bool:
    """Whether a sample of this many rows trains its cells on the driver: DRIVER_SAMPLE_BYTES and DRIVER_PRODUCTS."""
    return sample * dim * 4 <= DRIVER_SAMPLE_BYTES and sample * cells * dim <= DRIVER_PRODUCTS


def spark_kmeans(rows: DataFrame, cells: int, iterations: int, seed: int) -> np.ndarray:
    """Spark ML KMeans (cosine, block solver) on the rows' `embedding`, spread over every core."""
    # here: Spark ML imports pandas and scipy (about a second), which an update and the Python workers never need
    from pyspark.ml.clustering import KMeans
    from pyspark.ml.functions import array_to_vector

    # limit() leaves one partition: spread the sample again, or KMeans runs on one core
    parallelism = rows.sparkSession.sparkContext.defaultParallelism
    features = rows.repartition(parallelism).select(array_to_vector("embedding").alias("features")).cache()
    try:
        k = min(cells, features.count())
        # k-means|| costs more than all the iterations at thousands of cells; random init is then enough
        # (and k-means|| copes with samples of few distinct points, where Spark's random init fails).
        # Cosine (unit centroids): with Euclidean centroids, the rows of groups no centroid claims pile
        # into the cell of the shortest centroid, a cell 86x the mean at 1M that every query probed.
        kmeans = KMeans(
            k=k,
            maxIter=iterations,
            seed=seed,
            initMode="random" if k > 256 else "k-means||",
            solver="block",
            tol=1e-4,
            distanceMeasure="cosine",
        )
        return np.array(kmeans.fit(features).clusterCenters(), dtype=np.float32)
    finally:
        features.unpersist()


def spherical_kmeans(data: np.ndarray, cells: int, iterations: int, seed: int, tol: float = 1e-4) -> np.ndarray:
    """Unit centroids of KMeans with cosine distance on the rows of data, as Spark ML's: at most `cells` (fewer where
    the rows have fewer distinct directions), seeded from distinct rows, stopped when no centroid moves by tol."""
    unit = data / np.linalg.norm(data, axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    centroids = seeds(unit, cells, rng)
    rows = max(1, SCORES_BYTES // (4 * len(centroids)))
    for _ in range(iterations):
        nearest = np.concatenate(
            [
                cell_scores(unit[start : start + rows], centroids, True).argmin(axis=1)
                for start in range(0, len(unit), rows)
            ]
        )
        order = np.argsort(nearest, kind="stable")
        held, starts = np.unique(nearest[order], return_index=True)
        moved = centroids.copy()  # a cell that claims no row keeps its centroid, as in Spark
        moved[held] = np.add.reduceat(unit[order], starts, axis=0)
        moved[held] /= np.maximum(np.linalg.norm(moved[held], axis=1, keepdims=True), 1e-12)
        shift = 1 - np.einsum("ij,ij->i", centroids, moved)
        centroids = moved
        if shift.max() <= tol:
            break
    return centroids.astype(np.float32)


def seeds(unit: np.ndarray, cells: int, rng: np.random.Generator) -> np.ndarray:
    """The first centroids, as Spark ML seeds them: k-means++ (each next seed drawn by its distance to the nearest
    seed so far) up to 256 cells, distinct rows at random beyond, where k-means++ costs more than the iterations."""
    if cells > 256:
        _, first = np.unique(unit.round(6), axis=0, return_index=True)  # one row of each direction
        return unit[rng.choice(first, min(cells, len(first)), replace=False)]
    chosen = [int(rng.integers(len(unit)))]
    distance = cosine_distance(unit, chosen[0])
    while len(chosen) < cells and (total := float(distance.sum())) > 0:  # no more distinct directions when 0
        chosen.append(int(rng.choice(len(unit), p=distance / total)))
        distance = np.minimum(distance, cosine_distance(unit, chosen[-1]))
    return unit[chosen]


def cosine_distance(unit: np.ndarray, row: int) -> np.ndarray:
    """1 - cosine of every row to one of them, float64 (k-means++'s draw weights), rounding error counted as 0."""
    distance = 1 - (unit @ unit[row]).astype(np.float64)
    return np.where(distance < 1e-6, 0.0, distance)


def locality_order(centroids: np.ndarray) -> np.ndarray:
    """An order of the centroids in which neighbours in space tend to be neighbours in number.

    Recursive halving along each subset's principal direction (a PCA tree), leaves left to right.
    """
    order: list[int] = []
    rng = np.random.default_rng(0)
    stack = [np.arange(len(centroids))]
    while stack:
        subset = stack.pop()
        if len(subset) <= 2:
            order.extend(subset.tolist())
            continue
        centred = centroids[subset] - centroids[subset].mean(axis=0)
        direction = rng.standard_normal(centroids.shape[1]).astype(np.float32)
        for _ in range(8):  # power iteration towards the top principal direction
            direction = centred.T @ (centred @ direction)
            direction /= max(float(np.linalg.norm(direction)), 1e-12)
        ranked = subset[np.argsort(centred @ direction, kind="stable")]
        half = len(ranked) // 2
        stack += [ranked[half:], ranked[:half]]  # the lower half comes off the stack first
    return np.array(order, dtype=np.int64)

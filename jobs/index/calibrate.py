"""Calibrate the default nprobe: the smallest that reaches a target recall@k on a sample of the catalog's own rows.

A probed neighbour is always found (only nearer rows could push it out, and they are neighbours too), so a row's
recall at nprobe p is the share of its exact k nearest (self excluded) whose cells are among its p nearest cells:
one exact search of the sample gives the recall at every nprobe at once.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from jobs.knn import nearest, squared_distances
from jobs.vectors import matrix_from_binary

SCORED_ROWS = 8192  # catalog rows scored against the whole sample at once
CALIBRATION_SEED = 7919  # added to the index's seed


@dataclass(frozen=True)
class Calibration:
    """What was measured: recall@k of the sample at each nprobe (index p - 1) and its standard error, and the nprobe
    chosen: the smallest whose recall, less twice its standard error, reaches the target."""

    target: float
    k: int
    sample: int
    recall: np.ndarray
    error: np.ndarray
    nprobe: int

    def report(self) -> dict:
        """For index.json: the target, the sample, the nprobe chosen and the recall at it and at powers of two."""
        shown = sorted({p for p in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if p <= len(self.recall)} | {self.nprobe})
        return {
            "target_recall": self.target,
            "k": self.k,
            "sample": self.sample,
            "nprobe": self.nprobe,
            "recall": round(float(self.recall[self.nprobe - 1]), 4),
            "standard_error": round(float(self.error[self.nprobe - 1]), 4),
            "recall_at": {str(p): round(float(self.recall[p - 1]), 4) for p in shown},
        }


def exact_neighbour_cells(assigned: DataFrame, sample: np.ndarray, sample_ids: list[str], k: int) -> np.ndarray:
    """(len(sample), k) cells of each sampled row's k nearest catalog rows, itself excluded (one pass over the catalog;
    at most partitions x sample x k small rows are shuffled, sample x k reach the driver)."""
    shipped = assigned.sparkSession.sparkContext.broadcast((sample, sample_ids))
    dim = sample.shape[1]

    def nearest_here(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        queries, ids = shipped.value
        own = {image_id: i for i, image_id in enumerate(ids)}
        best_d2, best_cell = np.full((len(queries), k), np.inf, np.float32), np.full((len(queries), k), -1, np.int32)
        for batch in batches:
            for first in range(0, len(batch), SCORED_ROWS):
                rows = batch.slice(first, SCORED_ROWS)
                d2 = squared_distances(queries, matrix_from_binary(rows.column("vector"), dim))
                for col, image_id in enumerate(rows.column("image_id").to_pylist()):
                    if image_id in own:
                        d2[own[image_id], col] = np.inf
                cols, values = nearest(np.concatenate([best_d2, d2], axis=1), np.arange(k + d2.shape[1]), k)
                cells = np.concatenate(
                    [best_cell, np.broadcast_to(rows.column("cell").to_numpy().astype(np.int32), d2.shape)], axis=1
                )
                best_d2, best_cell = values, np.take_along_axis(cells, np.maximum(cols, 0), axis=1)
        found = np.isfinite(best_d2)
        query, _ = np.nonzero(found)
        yield pa.RecordBatch.from_arrays(
            [pa.array(query.astype(np.int32)), pa.array(best_d2[found]), pa.array(best_cell[found])],
            names=["q", "d2", "cell"],
        )

    partial = assigned.select("image_id", "cell", "vector").mapInArrow(nearest_here, "q int, d2 float, cell int")
    top = partial.withColumn("rank", F.row_number().over(Window.partitionBy("q").orderBy("d2"))).where(
        F.col("rank") <= k
    )
    cells = np.full((len(sample), k), -1, np.int32)
    for row in top.collect():  # sample x k rows
        cells[row["q"], row["rank"] - 1] = row["cell"]
    shipped.destroy()
    return cells


def recall_curve(
    sample: np.ndarray, centroids: np.ndarray, neighbour_cells: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Recall@k of the sample at every nprobe 1 .. cells, and its standard error: the share of each row's neighbours
    whose cell is among its nprobe nearest cells (ranked as the search ranks them: by dot product for unit centroids),
    averaged over the rows."""
    unit = bool(len(centroids)) and bool(np.abs(np.linalg.norm(centroids, axis=1) - 1).max() < 1e-4)
    scores = -(sample @ centroids.T) if unit else squared_distances(sample, centroids)
    place = np.empty_like(scores, dtype=np.int64)
    np.put_along_axis(place, np.argsort(scores, axis=1, kind="stable"), np.arange(len(centroids))[None, :], axis=1)
    known = neighbour_cells >= 0
    rows = np.flatnonzero(known.any(axis=1))
    if not len(rows):
        return np.ones(len(centroids)), np.zeros(len(centroids))
    found = np.zeros((len(sample), len(centroids)))
    row, col = np.nonzero(known)
    np.add.at(found, (row, place[row, neighbour_cells[row, col]]), 1)
    per_row = np.cumsum(found[rows], axis=1) / known[rows].sum(axis=1, keepdims=True)
    return per_row.mean(axis=0), per_row.std(axis=0) / np.sqrt(len(rows))


def calibrate(
    assigned: DataFrame, centroids: np.ndarray, count: int, target: float, sample_size: int, k: int, seed: int
) -> Calibration:
    """The smallest nprobe whose recall@k on a seeded sample of the catalog (self excluded) reaches target."""
    fraction = min(1.0, 2.0 * sample_size / max(count, 1))
    # a seed of its own: with KMeans's, Spark's sampler keeps a subset of the rows KMeans trained on (recall 0.950
    # there against 0.942 on held-out GloVe queries at the same nprobe); at most sample_size rows reach the driver
    sampled = assigned.sample(fraction=fraction, seed=seed + CALIBRATION_SEED).select("image_id", "vector")
    rows = sampled.limit(sample_size).collect()
    sample = (
        np.stack([np.frombuffer(r["vector"], np.float32) for r in rows])
        if rows
        else np.empty((0, centroids.shape[1]), np.float32)
    )
    curve, error = recall_curve(
        sample, centroids, exact_neighbour_cells(assigned, sample, [r["image_id"] for r in rows], k)
    )
    reached = np.flatnonzero(curve - 2 * error >= target - 1e-9)
    return Calibration(target, k, len(rows), curve, error, int(reached[0]) + 1 if len(reached) else len(centroids))

"""Calibrate the default nprobe: the smallest that reaches a target recall@k on a sample of the catalog's own rows.

A probed neighbour is always found (only nearer rows could push it out, and they are neighbours too), so a row's
recall at nprobe p is the share of its exact k nearest (self excluded) whose cells are among its p nearest cells:
one exact search of the sample gives the recall at every nprobe at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyspark.sql import DataFrame

from jobs.ivf import cell_scores, unit_length
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


Batches = Iterator[pa.RecordBatch]


class Nearest:
    """The k nearest catalog rows seen so far of a few query vectors (a row of a query's own image_id left out, where
    ids are given):
    their squared distances and cells, -1 and inf while fewer were seen."""

    def __init__(self, queries: np.ndarray, ids: list[str], k: int) -> None:
        self.queries, self.k = queries, k
        self.ids = pa.array(ids, pa.string())
        self.d2 = np.full((len(queries), k), np.inf, np.float32)
        self.cells = np.full((len(queries), k), -1, np.int32)

    def add_all(self, batches: Batches) -> Nearest:
        """Catalog rows in batches of any size, scored SCORED_ROWS at a time (a cell's row group can be a few rows)."""
        held: list[pa.RecordBatch] = []
        for batch in batches:
            held.append(batch)
            if sum(len(b) for b in held) >= SCORED_ROWS:
                self.add(pa.Table.from_batches(held).combine_chunks().to_batches()[0])
                held = []
        if held and sum(len(b) for b in held):
            self.add(pa.Table.from_batches(held).combine_chunks().to_batches()[0])
        return self

    def add(self, batch: pa.RecordBatch) -> None:
        """Catalog rows: image_id, cell, vector (float32 bytes)."""
        for first in range(0, len(batch), SCORED_ROWS):
            part = batch.slice(first, SCORED_ROWS)
            d2 = squared_distances(self.queries, matrix_from_binary(part.column("vector"), self.queries.shape[1]))
            if len(self.ids):  # a query's own row is never its neighbour
                own = pc.index_in(part.column("image_id"), value_set=self.ids)
                col = np.flatnonzero(own.is_valid().to_numpy(zero_copy_only=False))
                d2[own.drop_null().to_numpy().astype(np.int64), col] = np.inf
            cells = np.broadcast_to(part.column("cell").to_numpy().astype(np.int32), d2.shape)
            self.merge(d2, cells)

    def merge(self, d2: np.ndarray, cells: np.ndarray) -> None:
        """Candidates (squared distances and cells, one row a query) merged into the k nearest; once k are kept, only
        those nearer than a query's k-th so far are ranked (after the first rows, a handful)."""
        if not np.isinf(self.d2[:, -1]).all():
            d2, cells = self.nearer(d2, cells)
        picked, values = nearest(np.concatenate([self.d2, d2], axis=1), np.arange(self.k + d2.shape[1]), self.k)
        self.cells = np.take_along_axis(np.concatenate([self.cells, cells], axis=1), np.maximum(picked, 0), axis=1)
        self.d2 = values

    def nearer(self, d2: np.ndarray, cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The candidates nearer than each query's k-th so far, packed to the left of as few columns as they need."""
        row, col = np.nonzero(d2 < self.d2.max(axis=1, keepdims=True))
        place = np.arange(len(row)) - np.searchsorted(row, np.arange(len(d2)))[row]
        width = int(place.max()) + 1 if len(row) else 0
        near, near_cells = np.full((len(d2), width), np.inf, np.float32), np.full((len(d2), width), -1, np.int32)
        near[row, place], near_cells[row, place] = d2[row, col], cells[row, col]
        return near, near_cells


def exact_neighbours(
    rows: DataFrame,
    sample: np.ndarray,
    sample_ids: list[str],
    k: int,
    read: Callable[[Batches], Batches] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(len(sample), k) cells and squared distances of each sampled vector's k nearest catalog rows (Nearest), in one
    pass over the catalog. rows (or, given read, what read turns rows' batches into) carries image_id, cell and vector;
    each task sends the driver its own sample x k best, merged there as they come."""
    shipped = rows.sparkSession.sparkContext.broadcast((sample, sample_ids))

    def nearest_here(batches: Batches) -> Batches:
        found = Nearest(*shipped.value, k).add_all(read(batches) if read else batches)
        yield pa.RecordBatch.from_arrays(
            [pa.array([found.d2.tobytes()], pa.binary()), pa.array([found.cells.tobytes()], pa.binary())],
            names=["d2", "cell"],
        )

    merged = Nearest(sample, sample_ids, k)
    for part in rows.mapInArrow(nearest_here, "d2 binary, cell binary").collect():  # one row a task, sample x k each
        shape = (len(sample), k)
        merged.merge(
            np.frombuffer(part["d2"], np.float32).reshape(shape), np.frombuffer(part["cell"], np.int32).reshape(shape)
        )
    shipped.destroy()
    return merged.cells, merged.d2


def recall_curve(
    sample: np.ndarray,
    centroids: np.ndarray,
    neighbour_cells: np.ndarray,
    sizes: np.ndarray | None = None,
    min_rows: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Recall@k of the sample at every nprobe 1 .. cells, and its standard error: the share of each row's neighbours
    whose cell is among its nprobe nearest cells (ranked as the search ranks them: by dot product for unit centroids),
    averaged over the rows."""
    scores = cell_scores(sample, centroids, unit_length(centroids))
    order = np.argsort(scores, axis=1, kind="stable")  # each row's cells in probe order
    place = np.empty_like(scores, dtype=np.int64)
    np.put_along_axis(place, order, np.arange(len(centroids))[None, :], axis=1)
    known = neighbour_cells >= 0
    rows = np.flatnonzero(known.any(axis=1))
    if not len(rows):
        return np.ones(len(centroids)), np.zeros(len(centroids))
    found = np.zeros((len(sample), len(centroids)))
    row, col = np.nonzero(known)
    np.add.at(found, (row, place[row, neighbour_cells[row, col]]), 1)
    per_row = np.cumsum(found[rows], axis=1) / known[rows].sum(axis=1, keepdims=True)
    if sizes is not None and min_rows:  # the search probes on past nprobe until its cells hold min_rows rows
        needed = (np.cumsum(sizes[order[rows]], axis=1) < min(min_rows, int(sizes.sum()))).sum(
            axis=1
        )  # cells short of it
        probed = np.maximum(np.arange(len(centroids))[None, :], np.minimum(needed, len(centroids) - 1)[:, None])
        per_row = np.take_along_axis(per_row, probed, axis=1)
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
    cells, _ = exact_neighbours(assigned.select("image_id", "cell", "vector"), sample, [r["image_id"] for r in rows], k)
    curve, error = recall_curve(sample, centroids, cells)
    return Calibration(target, k, len(rows), curve, error, smallest_nprobe(curve, error, target) or len(curve))


def smallest_nprobe(curve: np.ndarray, error: np.ndarray, target: float) -> int | None:
    """The smallest nprobe whose recall, less twice its standard error, reaches target; None where none does."""
    reached = np.flatnonzero(curve - 2 * error >= target - 1e-9)
    return int(reached[0]) + 1 if len(reached) else None

"""Scoring on an executor: catalog rows held as a matrix sorted by cell, queries scored cell by cell with one matrix
product each into a running top-k (topk.py); ties go to the smaller id (id_keys)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pyarrow as pa

from jobs.knn import BucketIndex, nearness, squared_norms
from jobs.vectors import gather_matrix

STRING_COLUMNS = ["image_id", "path", "label"]
SCORED_ENTRIES = 1 << 23  # most query x row distances in one matrix (32 MiB of float32; 3 such matrices live at once)
QUERY_SLICE = 4096  # queries scored together against every row (exact)
LSH_QUERIES = 32  # queries whose LSH candidates are gathered and scored together
NO_KEY = np.iinfo(np.int64).max
FLOAT_MAX = np.finfo(np.float32).max


class Keeper(Protocol):
    """What scored rows go into: a running top-k (topk.TopK) or every pair past a similarity (topk.Similar)."""

    def add(
        self, asking: np.ndarray, near: np.ndarray, query_sq: np.ndarray, rows: np.ndarray, keys: np.ndarray
    ) -> None: ...


@dataclass(frozen=True)
class Wanted:
    """What a query wants from the rows it scores: its k nearest, or (min_similarity set) every row at least that
    similar."""

    k: int
    exclude_self: bool = False
    min_similarity: float | None = None

    @property
    def enough(self) -> int:
        """Rows a query's probed cells must hold between them (probing goes on past nprobe until they do)."""
        return 0 if self.min_similarity is not None else self.k + (1 if self.exclude_self else 0)


def cosine(query_sq: np.ndarray, row_sq: np.ndarray, d2: np.ndarray) -> np.ndarray:
    """Cosine similarity from squared norms and squared distance (shapes broadcast); the one formula everywhere."""
    similarity = (query_sq + row_sq - d2) / np.maximum(2 * np.sqrt(query_sq * row_sq), 1e-12)
    return np.clip(similarity, -1, 1).astype(np.float32, copy=False)


@dataclass
class ShardRows:
    """Catalog rows as read (one file's probed row groups) and sorted here by cell: vectors, norms, id ranks, cell
    bounds."""

    rows: pa.RecordBatch  # image_id, path, label (and buckets for LSH) as read: the strings are never reordered
    order: np.ndarray  # position in the sorted arrays -> row
    vectors: np.ndarray
    squares: np.ndarray
    cells: np.ndarray
    bounds: np.ndarray
    keys: np.ndarray  # each row's id_keys: ties go to the smaller id

    @classmethod
    def of(cls, table: pa.Table, dim: int, keep: np.ndarray) -> ShardRows:
        """The rows of `table` (cell, image_id, path, label, vector as float32 bytes, ...) where keep is set; the kept
        vectors are copied once, or not at all where every row is kept and the column is one chunk (a catalog file is
        already sorted by cell), the strings not at all when every row is kept."""
        picked = None if keep.all() else np.flatnonzero(keep)
        cell = table.column("cell").to_numpy()
        cell = cell if picked is None else cell[picked]
        in_order = not (np.diff(cell) < 0).any()  # a catalog file's rows are sorted by cell
        order = np.arange(len(cell)) if in_order else np.argsort(cell, kind="stable")
        strings = [c for c in table.column_names if c not in ("cell", "vector", "group")]
        rows = pa.RecordBatch.from_arrays([table.column(c).combine_chunks() for c in strings], names=strings)
        rows = rows if picked is None else rows.take(pa.array(picked))
        every_row = None if in_order else order  # every row, in order: a view of the column read, no copy
        vectors = gather_matrix(table.column("vector"), dim, every_row if picked is None else picked[order])
        cells, starts = np.unique(cell[order], return_index=True)
        return cls(
            rows,
            order,
            vectors,
            squared_norms(vectors),
            cells,
            np.append(starts, len(order)),
            id_keys(rows.column("image_id"))[order],
        )

    def slots(self, cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For each asked cell, its slot in this shard and whether the shard holds it."""
        if not len(self.cells):
            return np.zeros(len(cells), np.int64), np.zeros(len(cells), bool)
        slot = np.minimum(np.searchsorted(self.cells, cells), len(self.cells) - 1)
        return slot, self.cells[slot] == cells

    def score(
        self,
        keep: Keeper,
        vectors: np.ndarray,
        probes: tuple[np.ndarray, np.ndarray] | None,
        own_row: np.ndarray | None,
        base: int,
    ) -> None:
        """Fold into keep every query's distances to the rows of the cells it probes here (probes: CSR cells, nearest
        first; None: every row), rows numbered base + sorted position. own_row: each query's own row here, or -1."""
        query_sq = squared_norms(vectors)
        if probes is None:
            for first in range(0, len(vectors), QUERY_SLICE):
                asking = np.arange(first, min(first + QUERY_SLICE, len(vectors)))
                self.score_rows(keep, vectors, query_sq, asking, 0, len(self.order), own_row, base)
            return
        cells, offsets = probes
        owner = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
        rank = np.arange(len(cells)) - np.repeat(offsets[:-1], np.diff(offsets))  # 0: the query's nearest cell
        slot, here = self.slots(cells)
        owner, slot, rank = owner[here], slot[here], rank[here]
        # nearest cells first: they set each query's k-th distance, which then rules out most rows of the other cells
        for phase in (rank == 0, rank > 0):
            by_cell = np.argsort(slot[phase], kind="stable")
            phase_owner, phase_slot = owner[phase][by_cell], slot[phase][by_cell]
            for start, end in np.column_stack(run_bounds(phase_slot)) if len(phase_slot) else []:
                lo, hi = self.bounds[phase_slot[start]], self.bounds[phase_slot[start] + 1]
                self.score_rows(keep, vectors, query_sq, phase_owner[start:end], lo, hi, own_row, base)
            keep.flush()  # the nearest cells' candidates merged: the k-th distances they set filter the rest

    def score_rows(
        self,
        keep: Keeper,
        vectors: np.ndarray,
        query_sq: np.ndarray,
        asking: np.ndarray,
        lo: int,
        hi: int,
        own_row: np.ndarray | None,
        base: int,
    ) -> None:
        """Score the asking queries against sorted rows lo..hi, a slice of them at a time (at most SCORED_ENTRIES
        scores): a row's nearness 2 q.r - |r|^2 is |q|^2 less its squared distance, one product and two passes."""
        step = max(1, SCORED_ENTRIES // max(len(asking), 1))
        for first in range(lo, hi, step):
            end = min(first + step, hi)
            near = nearness(vectors[asking], self.vectors[first:end], self.squares[first:end])
            if own_row is not None:
                mine = np.flatnonzero((own_row[asking] >= first) & (own_row[asking] < end))
                near[mine, own_row[asking[mine]] - first] = -np.inf
            keep.add(asking, near, query_sq[asking], np.arange(base + first, base + end), self.keys[first:end])

    def score_lsh(
        self,
        keep: Keeper,
        vectors: np.ndarray,
        probe_keys: np.ndarray,
        own_row: np.ndarray | None,
        base: int,
        candidates: np.ndarray,
    ) -> None:
        """Fold into keep each query's distances to the rows sharing one of its probed LSH buckets (probe_keys:
        queries x tables x probes), a few similar queries at a time; count each query's candidates."""
        query_sq = squared_norms(vectors)
        buckets = BucketIndex(
            self.rows.column("buckets").take(pa.array(self.order)).flatten().to_numpy().reshape(len(self.order), -1)
        )
        for first in range(0, len(vectors), LSH_QUERIES):
            asking = np.arange(first, min(first + LSH_QUERIES, len(vectors)))
            mask = buckets.candidate_mask(probe_keys[asking])
            if own_row is not None:
                mine = np.flatnonzero(own_row[asking] >= 0)
                mask[mine, own_row[asking[mine]]] = False
            candidates[asking] += mask.sum(axis=1)
            union = np.flatnonzero(mask.any(axis=0))
            if len(union):
                near = nearness(vectors[asking], self.vectors[union], self.squares[union])
                near[~mask[:, union]] = -np.inf
                keep.add(asking, near, query_sq[asking], base + union, self.keys[union])

    def own_rows(self, ids: list[str], own_cells: np.ndarray | None) -> np.ndarray:
        """The sorted position of each query's own id in this shard, or -1; looked up in the query's own cell alone
        where it is known (catalog rows searching the catalog)."""
        found = np.full(len(ids), -1, np.int64)
        if own_cells is None:
            position = {image_id: at for at, image_id in enumerate(self.sorted_ids(0, len(self.order)))}
            return np.array([position.get(q, -1) for q in ids], np.int64)
        slot, here = self.slots(own_cells)
        held = np.flatnonzero(here)
        held = held[np.argsort(slot[held], kind="stable")]
        for start, end in np.column_stack(run_bounds(slot[held])) if len(held) else []:
            lo, hi = self.bounds[slot[held[start]]], self.bounds[slot[held[start]] + 1]
            position = {image_id: lo + at for at, image_id in enumerate(self.sorted_ids(lo, hi))}
            for q in held[start:end]:
                found[q] = position.get(ids[q], -1)
        return found

    def sorted_ids(self, lo: int, hi: int) -> list[str]:
        return self.rows.column("image_id").take(pa.array(self.order[lo:hi])).to_pylist()

    def strings(self, positions: np.ndarray) -> pa.Table:
        """id, path and label of rows at these sorted positions."""
        return pa.Table.from_batches([self.rows.select(STRING_COLUMNS).take(pa.array(self.order[positions]))])


def id_keys(ids: pa.Array) -> np.ndarray:
    """An int64 per id that orders as the ids do by their first 8 bytes (image_ids are hex digests: distinct there);
    the tie-break that makes a tie go to the smaller id, in every task alike."""
    if not len(ids):
        return np.empty(0, np.int64)
    ids = ids.cast(pa.large_binary())
    offsets = np.frombuffer(ids.buffers()[1], np.int64)[ids.offset : ids.offset + len(ids) + 1]
    data = np.frombuffer(ids.buffers()[2], np.uint8) if ids.buffers()[2] is not None else np.zeros(1, np.uint8)
    places = offsets[:-1, None] + np.arange(8)
    present = places < offsets[1:, None]
    padded = np.where(present, data[np.minimum(places, max(len(data) - 1, 0))], 0).astype(np.uint64)
    value = np.zeros(len(ids), np.uint64)
    for byte in range(8):
        value = (value << np.uint64(8)) | padded[:, byte]
    return (value ^ np.uint64(1 << 63)).view(np.int64)


def run_bounds(sorted_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and end of each run of equal values in a sorted array."""
    cuts = np.flatnonzero(sorted_values[1:] != sorted_values[:-1]) + 1
    return np.concatenate([[0], cuts]).astype(np.int64), np.concatenate([cuts, [len(sorted_values)]]).astype(np.int64)

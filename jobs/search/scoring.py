"""Scoring on an executor: a shard of catalog rows held as a matrix, queries answered cell by cell with one matrix product each."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jobs.knn import merge_nearest, nearest, ranks_in_runs, squared_distances, squared_norms
from jobs.search.results import cosine, partial_batch
from jobs.vectors import gather_matrix, matrix_from_binary, values_from_binary

ROW_COLUMNS = ["cell", "image_id", "path", "label", "vector"]  # the catalog columns a shard's task holds
SCORED_ENTRIES = 1 << 23  # most query x row distances in one matrix (32 MiB of float32; 3 such matrices live at once)


@dataclass(frozen=True)
class Wanted:
    """What a query wants from the cells it probes: its k nearest, or (min_similarity set) every row at least that similar."""

    k: int
    exclude_self: bool = False
    min_similarity: float | None = None


def asked(queries: pa.RecordBatch) -> pa.RecordBatch:
    """The query columns a candidate row carries, under their partial names."""
    return pa.RecordBatch.from_arrays([queries.column(c) for c in ("qidx", "id", "path", "label")], names=["qidx", "query_id", "query_path", "query_label"])


@dataclass
class ShardRows:
    """One shard's catalog rows as read, and sorted here by cell: their vectors, norms, id ranks and each cell's bounds."""

    rows: pa.RecordBatch  # as read: the strings are never reordered
    order: np.ndarray  # the rows in cell order (position in the sorted arrays -> row)
    vectors: np.ndarray
    squares: np.ndarray
    cells: np.ndarray
    bounds: np.ndarray
    keys: np.ndarray  # rank of each row's id: ties go to the smaller id

    @classmethod
    def of(cls, table: pa.Table, dim: int, keep: np.ndarray | None = None, vectors: np.ndarray | None = None) -> ShardRows:
        """From catalog rows with columns cell, image_id, path, label and vector (float32 bytes), those of keep if given;
        or, with vectors (the kept rows' vectors, in table order), without the vector column.

        The vectors are copied once (none moved: a catalog file is already sorted by cell), the strings not at all
        when every row is kept.
        """
        picked = np.flatnonzero(keep) if keep is not None and not keep.all() else None
        cell = table.column("cell").to_numpy()
        cell = cell if picked is None else cell[picked]
        order = np.argsort(cell, kind="stable") if (np.diff(cell) < 0).any() else None
        moved = picked if order is None else order if picked is None else picked[order]
        strings = [table.column(c) for c in ("cell", "image_id", "path", "label")]
        rows = pa.RecordBatch.from_arrays([c.combine_chunks() if isinstance(c, pa.ChunkedArray) else c for c in strings], names=["cell", "image_id", "path", "label"])
        rows = rows if picked is None else rows.take(pa.array(picked))
        order = np.arange(len(cell)) if order is None else order
        if vectors is None:
            vectors = gather_matrix(table.column("vector"), dim, moved)
        elif order is not None:
            vectors = vectors[order]
        cells, starts = np.unique(cell[order], return_index=True)
        # int64 like knn.id_ranks: pc.rank's uint64 met TopK's int64 keys as float64, and its padding key (int64 max) overflowed
        ranks = pc.rank(rows.column("image_id"), sort_keys="ascending", tiebreaker="first").to_numpy().astype(np.int64) - 1
        keys = ranks[order] if len(rows) else np.empty(0, np.int64)
        return cls(rows, order, vectors, squared_norms(vectors), cells, np.append(starts, len(order)), keys)

    def answer(self, queries: pa.RecordBatch, wanted: Wanted) -> pa.RecordBatch:
        """What each query wants among the rows of the cells it probes in this shard, cell by cell."""
        vectors = matrix_from_binary(queries.column("vector"), self.vectors.shape[1])
        query_sq = squared_norms(vectors)
        keep = TopK(len(queries), wanted.k) if wanted.min_similarity is None else Similar(wanted.min_similarity, query_sq, self.squares)
        self.score(keep, vectors, queries, wanted)
        q, rows, d2 = keep.found()
        row_squares = np.empty_like(self.squares)
        row_squares[self.order] = self.squares
        return partial_batch(asked(queries), q, query_sq, self.rows, self.order[rows], row_squares, d2)

    def score(self, keep: TopK | Similar, vectors: np.ndarray, queries: pa.RecordBatch, wanted: Wanted, base: int = 0) -> None:
        """Fold into keep the rows of the cells each query probes in this shard (rows and keys numbered from base)."""
        cells, offsets = values_from_binary(queries.column("probes"), np.int32)
        owner = np.repeat(np.arange(len(queries)), np.diff(offsets))
        rank = np.arange(len(cells)) - np.repeat(offsets[:-1], np.diff(offsets))  # 0: the query's nearest cell in this shard
        slot = np.minimum(np.searchsorted(self.cells, cells), max(len(self.cells) - 1, 0))
        here = self.cells[slot] == cells if len(self.cells) else np.zeros(len(cells), bool)
        if not here.all():  # a shard holding every probed cell (the local plan's) skips three copies of all the probes
            owner, slot, rank = owner[here], slot[here], rank[here]
        own_row = self.own_rows(queries) if wanted.exclude_self else None
        # nearest cells first: they set each query's k-th distance, which then rules out most rows of the other cells
        for later, phase in enumerate((rank == 0, rank > 0)):
            by_cell = np.argsort(slot[phase], kind="stable")
            phase_owner, phase_slot = owner[phase][by_cell], slot[phase][by_cell]
            for start, end in np.column_stack(run_bounds(phase_slot)) if len(phase_slot) else []:
                lo, hi = self.bounds[phase_slot[start]], self.bounds[phase_slot[start] + 1]
                step = max(1, SCORED_ENTRIES // (hi - lo))  # a big cell asked by many queries: a few of them at a time
                for part in range(start, end, step):
                    asking = phase_owner[part : min(part + step, end)]
                    d2 = squared_distances(vectors[asking], self.vectors[lo:hi], self.squares[lo:hi])
                    if own_row is not None:
                        mine = np.flatnonzero((own_row[asking] >= lo) & (own_row[asking] < hi))
                        d2[mine, own_row[asking[mine]] - lo] = np.inf
                    keep.add(asking, d2, base + lo, base + self.keys[lo:hi], bool(later))

    def own_rows(self, queries: pa.RecordBatch) -> np.ndarray:
        """The (sorted) position of each query's own id in this shard, or -1; queries that carry their own_cell
        (catalog rows searching the catalog) are looked up in that cell alone."""
        ids = queries.column("id").to_pylist()
        if "own_cell" not in queries.schema.names:
            position = {image_id: at for at, image_id in enumerate(self.sorted_ids(0, len(self.order)))}
            return np.array([position.get(q, -1) for q in ids], np.int64)
        found = np.full(len(ids), -1, np.int64)
        query_cells = queries.column("own_cell").to_numpy()
        slot = np.minimum(np.searchsorted(self.cells, query_cells), max(len(self.cells) - 1, 0))
        held = np.flatnonzero(self.cells[slot] == query_cells) if len(self.cells) else np.empty(0, np.int64)
        held = held[np.argsort(slot[held], kind="stable")]
        for start, end in np.column_stack(run_bounds(slot[held])) if len(held) else []:
            lo, hi = self.bounds[slot[held[start]]], self.bounds[slot[held[start]] + 1]
            position = {image_id: lo + at for at, image_id in enumerate(self.sorted_ids(lo, hi))}
            for q in held[start:end]:
                found[q] = position.get(ids[q], -1)
        return found

    def sorted_ids(self, lo: int, hi: int) -> list[str]:
        return self.rows.column("image_id").take(pa.array(self.order[lo:hi])).to_pylist()


class TopK:
    """Each query's k nearest rows so far (row, squared distance, key), ties to the smaller key."""

    def __init__(self, queries: int, k: int) -> None:
        self.k = k
        self.rows = np.full((queries, k), -1, np.int64)
        self.d2 = np.full((queries, k), np.inf, np.float32)
        self.keys = np.full((queries, k), np.iinfo(np.int64).max, np.int64)

    def add(self, asking: np.ndarray, d2: np.ndarray, first_row: int, keys: np.ndarray, bounded: bool) -> None:
        """Fold in d2 (len(asking) x cell rows) of the rows first_row.. . bounded: most rows cannot beat the
        queries' current k-th distance, so only those that can are gathered and merged."""
        if bounded:
            # flat indices, then divmod: 2-D nonzero took three times as long (0.5 ms a cell of 1,190 x 137)
            q, col = np.divmod(np.flatnonzero(d2 <= self.d2[asking, self.k - 1][:, None]), d2.shape[1])
            if len(q):
                self.merge(asking[q], d2[q, col], col, first_row, keys)
            return
        cols, values = nearest(d2, keys, self.k)
        found = np.where(cols >= 0, cols + first_row, -1)
        merged = merge_nearest((self.rows[asking], self.d2[asking], self.keys[asking]),
                               (found, values, np.where(cols >= 0, keys[cols], np.iinfo(np.int64).max)), self.k)
        self.rows[asking], self.d2[asking], self.keys[asking] = merged

    def merge(self, query: np.ndarray, d2: np.ndarray, col: np.ndarray, first_row: int, keys: np.ndarray) -> None:
        """Merge loose candidates (one per entry) into the k best of their queries."""
        touched = np.unique(query)
        queries = np.concatenate([np.repeat(touched, self.k), query])
        d = np.concatenate([self.d2[touched].ravel(), d2])
        key = np.concatenate([self.keys[touched].ravel(), keys[col]])
        row = np.concatenate([self.rows[touched].ravel(), col + first_row])
        order = np.lexsort((key, d, queries))
        queries, d, key, row = queries[order], d[order], key[order], row[order]
        rank = ranks_in_runs(queries)
        top = rank < self.k
        target = (queries[top], rank[top])
        self.rows[target], self.d2[target], self.keys[target] = row[top], d[top], key[top]

    def found(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        q, r = np.nonzero(self.rows >= 0)
        return q, self.rows[q, r], self.d2[q, r]


class Similar:
    """Every (query, row) pair with cosine similarity at or above a threshold."""

    def __init__(self, threshold: float, query_sq: np.ndarray, row_sq: np.ndarray) -> None:
        self.threshold, self.query_sq, self.row_sq = np.float32(threshold), query_sq, row_sq
        self.pairs: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def add(self, asking: np.ndarray, d2: np.ndarray, first_row: int, keys: np.ndarray, bounded: bool) -> None:
        similarity = cosine(self.query_sq[asking][:, None], self.row_sq[first_row : first_row + d2.shape[1]][None, :], d2)
        q, col = np.nonzero(similarity >= self.threshold)
        self.pairs.append((asking[q], col + first_row, d2[q, col]))

    def found(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not self.pairs:
            return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32)
        return tuple(np.concatenate(parts) for parts in zip(*self.pairs))  # type: ignore[return-value]


def run_bounds(sorted_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and end of each run of equal values in a sorted array."""
    cuts = np.flatnonzero(sorted_values[1:] != sorted_values[:-1]) + 1
    return np.concatenate([[0], cuts]).astype(np.int64), np.concatenate([cuts, [len(sorted_values)]]).astype(np.int64)

"""The running top-k every search keeps (and, for a range search, the close pairs): candidates merged a batch at a
time, ties to the smaller key, and the strings of the rows it holds kept as they enter."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from jobs.knn import ranked_within
from jobs.search.scoring import FLOAT_MAX, NO_KEY, STRING_COLUMNS, ShardRows, cosine

FLUSH_ENTRIES = 1 << 18  # candidates a running top-k holds back before it merges them


class TopK:
    """Each query's k nearest rows so far (row, squared distance, key), ties to the smaller key. Candidates are held
    back and merged FLUSH_ENTRIES at a time (one sort instead of one per cell); until then the k-th distances that
    filter new rows are those of the last merge, which are never too tight."""

    def __init__(self, queries: int, k: int) -> None:
        self.k = k
        self.rows = np.full((queries, k), -1, np.int64)
        self.d2 = np.full((queries, k), np.inf, np.float32)
        self.keys = np.full((queries, k), NO_KEY, np.int64)
        self.pending: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        self.held = 0

    def add(
        self, asking: np.ndarray, near: np.ndarray, query_sq: np.ndarray, rows: np.ndarray, keys: np.ndarray
    ) -> None:
        """Take in the rows' nearness to the asking queries (len(asking) x len(rows): |q|^2 less the squared distance;
        -inf for a row excluded): only the entries that may beat their query's k-th distance."""
        bound = np.maximum(query_sq - self.d2[asking, self.k - 1], -FLOAT_MAX)  # an excluded row's -inf never enters
        short = np.flatnonzero(bound == -FLOAT_MAX)
        if len(short) and near.shape[1] >= self.k:  # a query short of k: the k-th nearest here bounds it
            kth = near.shape[1] - self.k
            bound[short] = np.maximum(np.partition(near[short], kth, axis=1)[:, kth], -FLOAT_MAX)
        # flat indices, then divmod: 2-D nonzero took three times as long (0.5 ms a cell of 1,190 x 137)
        q, col = np.divmod(np.flatnonzero(near >= bound[:, None]), near.shape[1])
        if len(q):
            d2 = np.maximum(query_sq[q] - near[q, col], 0)
            self.pending.append((asking[q], d2, rows[col], keys[col]))
            self.held += len(q)
            if self.held >= FLUSH_ENTRIES:
                self.flush()

    def flush(self) -> None:
        """Merge the held candidates into the k best of their queries."""
        if not self.pending:
            return
        query, d2, rows, keys = (np.concatenate(parts) for parts in zip(*self.pending))
        self.pending, self.held = [], 0
        touched = np.unique(query)
        queries = np.concatenate([np.repeat(touched, self.k), query])
        d = np.concatenate([self.d2[touched].ravel(), d2])
        key = np.concatenate([self.keys[touched].ravel(), keys])
        row = np.concatenate([self.rows[touched].ravel(), rows])
        order, rank = ranked_within(queries, d, key, self.k)
        target = (queries[order], rank)
        self.rows[target], self.d2[target], self.keys[target] = row[order], d[order], key[order]

    def found(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        self.flush()
        q, r = np.nonzero(self.rows >= 0)
        return q, self.rows[q, r], self.d2[q, r]


class Similar:
    """Every (query, row) pair with cosine similarity at or above a threshold, for the shard being scored."""

    def __init__(self, threshold: float, query_sq: np.ndarray, row_sq: np.ndarray, base: int) -> None:
        self.threshold, self.query_sq, self.row_sq, self.base = np.float32(threshold), query_sq, row_sq, base
        self.pairs: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def add(
        self, asking: np.ndarray, near: np.ndarray, query_sq: np.ndarray, rows: np.ndarray, keys: np.ndarray
    ) -> None:
        d2 = np.maximum(query_sq[:, None] - near, 0)
        similarity = cosine(query_sq[:, None], self.row_sq[rows - self.base][None, :], d2)
        q, col = np.nonzero(similarity >= self.threshold)
        self.pairs.append((asking[q], rows[col] - self.base, d2[q, col]))

    def flush(self) -> None:
        """Pairs are kept as found: nothing to merge."""

    def found(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not self.pairs:
            return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32)
        return tuple(np.concatenate(parts) for parts in zip(*self.pairs))  # type: ignore[return-value]


@dataclass
class Kept:
    """The id, path, label and squared norm of the rows a running top-k holds, gathered as they enter it: the shard of
    one file is scored with rows numbered (file + 1) * FILE_ROW + position, then the entrants are copied here and
    renumbered, so a top-k over many files holds strings only for its own rows."""

    rows: pa.Table = field(default_factory=lambda: pa.table({c: pa.array([], pa.string()) for c in STRING_COLUMNS}))
    squares: np.ndarray = field(default_factory=lambda: np.empty(0, np.float32))

    def take_in(self, keep: TopK, held: ShardRows, base: int) -> None:
        """Copy the held shard's rows that entered keep, renumber them as kept rows, and drop kept rows pushed out
        since."""
        keep.flush()
        entered = keep.rows >= base
        positions = keep.rows[entered] - base
        unique, inverse = np.unique(positions, return_inverse=True)
        keep.rows[entered] = self.rows.num_rows + inverse.reshape(-1)
        self.rows = pa.concat_tables([self.rows, held.strings(unique)])
        self.squares = np.concatenate([self.squares, held.squares[unique]])
        used = np.unique(keep.rows[keep.rows >= 0])
        if len(used) * 2 < self.rows.num_rows:
            self.rows, self.squares = self.rows.take(pa.array(used)), self.squares[used]
            placed = keep.rows >= 0
            keep.rows[placed] = np.searchsorted(used, keep.rows[placed])

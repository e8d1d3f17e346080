"""Vectorised k-nearest-neighbour kernels in numpy: exact top-k and LSH bucket keys with multi-probe."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# odd 64-bit multipliers that mix a table's hash values into one bucket key (wrap-around arithmetic)
_MIX = np.random.default_rng(20240229).integers(1, 2**62, size=64, dtype=np.int64) * 2 + 1


@dataclass(frozen=True)
class LshParams:
    """Spark ML BucketedRandomProjectionLSH with numHashTables = tables * hashes_per_table.

    Each of our `tables` ANDs `hashes_per_table` consecutive Spark hash functions into one bucket key
    (a plain Spark table, with unit vectors, has two buckets and prunes nothing); a query probes its
    own bucket and the `probes` neighbouring buckets whose boundaries it lies closest to.
    """

    bucket_length: float = 1.0
    tables: int = 32
    hashes_per_table: int = 12
    probes: int = 4  # 2 gave recall@10 0.931-0.936 on GloVe 300k, 3 0.959, 4 0.974 (candidates +48%)

    @property
    def num_hash_tables(self) -> int:
        return self.tables * self.hashes_per_table


def projections(vectors: np.ndarray, rand_unit_vectors: np.ndarray, bucket_length: float) -> np.ndarray:
    """x . r / bucketLength for every Spark hash function: floor() of it is Spark's hash value."""
    return (vectors.astype(np.float32) @ rand_unit_vectors.T.astype(np.float32)) / np.float32(bucket_length)


def bucket_keys(vectors: np.ndarray, rand_unit_vectors: np.ndarray, params: LshParams) -> np.ndarray:
    """(n, tables) int64 bucket keys, the same as combining Spark's hash values for each table."""
    hashes = np.floor(projections(vectors, rand_unit_vectors, params.bucket_length)).astype(np.int64)
    grouped = hashes.reshape(len(vectors), params.tables, params.hashes_per_table)
    return (grouped * _MIX[: params.hashes_per_table]).sum(axis=2)


def probe_keys(vectors: np.ndarray, rand_unit_vectors: np.ndarray, params: LshParams) -> np.ndarray:
    """(n, tables, 1 + probes) keys: the own bucket, then neighbours across the least certain boundaries."""
    proj = projections(vectors, rand_unit_vectors, params.bucket_length).reshape(
        len(vectors), params.tables, params.hashes_per_table
    )
    hashes = np.floor(proj).astype(np.int64)
    frac = proj - hashes
    step = np.where(frac < 0.5, -1, 1)  # the nearer neighbouring bucket of each hash function
    margin = np.minimum(frac, 1 - frac)
    own = (hashes * _MIX[: params.hashes_per_table]).sum(axis=2)
    nearest = np.argsort(margin, axis=2)[:, :, : params.probes]
    moved = np.take_along_axis(step, nearest, axis=2) * _MIX[nearest]
    return np.concatenate([own[:, :, None], own[:, :, None] + moved], axis=2)


def squared_norms(x: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", x, x)


def nearness(queries: np.ndarray, rows: np.ndarray, row_sq: np.ndarray) -> np.ndarray:
    """2 q.r - |r|^2 of every query x row: |q|^2 less their squared distance. The one scoring expression: one matrix
    product and two passes over it."""
    near = queries @ rows.T
    near *= 2
    near -= row_sq
    return near


def squared_distances(queries: np.ndarray, catalog: np.ndarray, catalog_sq: np.ndarray | None = None) -> np.ndarray:
    """(n_queries, n_catalog) squared Euclidean distances (never negative): |q|^2 less the nearness."""
    d2 = nearness(queries, catalog, squared_norms(catalog) if catalog_sq is None else catalog_sq)
    np.subtract(squared_norms(queries)[:, None], d2, out=d2)
    return np.maximum(d2, 0.0, out=d2)


def ranks_in_runs(sorted_values: np.ndarray) -> np.ndarray:
    """Each entry's position within its run of equal values (0 for the first of a run)."""
    if not len(sorted_values):
        return np.empty(0, np.int64)
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    return np.arange(len(sorted_values)) - np.repeat(starts, np.diff(np.r_[starts, len(sorted_values)]))


def ranked_within(groups: np.ndarray, distances: np.ndarray, keys: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The positions of each group's k smallest distances (never negative; ties to the smaller key), by group and
    nearest first, and their ranks 0 .. k-1: the one top-k, of a running search, its merge and the exact answers."""
    if distances.dtype == np.float32 and len(groups) and groups.min() >= 0 and groups.max() < 2**31:
        # one int64 sorts by group, then distance (a non-negative float32's bits ascend with it)
        bits = (distances + np.float32(0)).view(np.uint32).astype(np.int64)
        order = np.lexsort((keys, (groups.astype(np.int64) << 32) | bits))
    else:
        order = np.lexsort((keys, distances, groups))
    rank = ranks_in_runs(groups[order])
    top = rank < k
    return order[top], rank[top]


def nearest(d2: np.ndarray, keys: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Columns and values of the k smallest entries of each row, smallest first, ties broken by keys[column].

    Rows with fewer than k finite entries are padded with column -1 and inf.
    """
    n_rows, n_cols = d2.shape
    columns, values = np.full((n_rows, k), -1, np.int64), np.full((n_rows, k), np.inf, np.float32)
    kk = min(k, n_cols)
    if kk == 0 or n_rows == 0:
        return columns, values
    if kk < n_cols:  # each row's k smallest, and where others tie with the k-th, all of those
        cols = np.argpartition(d2, kk - 1, axis=1)[:, :kk]
        kth = np.take_along_axis(d2, cols, axis=1).max(axis=1, keepdims=True)
        tied = np.flatnonzero((d2 <= kth).sum(axis=1) > kk)
        row, col = np.repeat(np.arange(n_rows), kk), cols.ravel()
        if len(tied):
            more_row, more_col = np.nonzero(d2[tied] <= kth[tied])
            kept = ~np.isin(row, tied)
            row, col = np.concatenate([row[kept], tied[more_row]]), np.concatenate([col[kept], more_col])
    else:
        row, col = np.divmod(np.arange(n_rows * n_cols), n_cols)
    order, rank = ranked_within(row, d2[row, col], keys[col], kk)
    row, col = row[order], col[order]
    values[row, rank] = d2[row, col]
    columns[row, rank] = np.where(np.isfinite(d2[row, col]), col, -1)
    return columns, values


def exact_topk(
    queries: np.ndarray, catalog: np.ndarray, k: int, exclude: np.ndarray | None = None, keys: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(indices, distances) of the k nearest catalog rows per query by Euclidean distance, nearest first.

    Ties are broken by keys (default: the catalog row). exclude: (n_queries, n_catalog) boolean mask of
    pairs never to return (a query itself). Rows beyond the catalog size are -1 / inf.
    """
    d2 = squared_distances(queries, catalog)
    if exclude is not None:
        d2[exclude] = np.inf
    idx, nearest_d2 = nearest(d2, np.arange(catalog.shape[0]) if keys is None else keys, k)
    return idx, np.sqrt(nearest_d2)


class BucketIndex:
    """Catalog rows sorted by bucket key, per table, for fast probe look-ups."""

    def __init__(self, catalog_keys: np.ndarray) -> None:
        self.order = np.argsort(catalog_keys, axis=0, kind="stable")
        self.sorted_keys = np.take_along_axis(catalog_keys, self.order, axis=0)
        self.size = catalog_keys.shape[0]

    def candidate_mask(self, query_probes: np.ndarray) -> np.ndarray:
        """(n_queries, n_catalog) True where a catalog row shares a probed bucket in any table."""
        mask = np.zeros((query_probes.shape[0], self.size), dtype=bool)
        rows = np.arange(query_probes.shape[0])
        for table in range(self.sorted_keys.shape[1]):
            probes = query_probes[:, table, :]
            lo = np.searchsorted(self.sorted_keys[:, table], probes, "left").ravel()
            counts = np.searchsorted(self.sorted_keys[:, table], probes, "right").ravel() - lo
            total = int(counts.sum())
            if total == 0:
                continue
            q = np.repeat(np.repeat(rows, probes.shape[1]), counts)
            offsets = np.repeat(lo - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
            mask[q, self.order[offsets + np.arange(total), table]] = True
        return mask

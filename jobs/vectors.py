"""Vectors in Arrow batches: float32 matrices to and from `binary` columns (the index's storage) and list<float>
columns."""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def values_from_binary(column: pa.Array, dtype: type = np.float32) -> tuple[np.ndarray, np.ndarray]:
    """The values of a binary column of packed 4-byte numbers, flat, and each row's offsets into them (no copy)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    n = len(column)
    if n == 0:
        return np.empty(0, dtype), np.zeros(1, np.int64)
    offset_type = np.int64 if pa.types.is_large_binary(column.type) else np.int32
    offsets = np.frombuffer(column.buffers()[1], offset_type)[column.offset : column.offset + n + 1]
    data = np.frombuffer(column.buffers()[2], np.uint8)[offsets[0] : offsets[-1]]
    return data.view(dtype), (offsets - offsets[0]) // 4


def matrix_from_binary(column: pa.Array, dim: int) -> np.ndarray:
    """(n, dim) float32 rows from a binary column whose every value is dim little-endian float32s (no copy)."""
    values, offsets = values_from_binary(column)
    if len(values) != (len(offsets) - 1) * dim:
        raise ValueError(f"vector column holds {len(values)} floats for {len(offsets) - 1} vectors of {dim}")
    return values.reshape(-1, dim)


def pooled_matrix(rows: int, dim: int) -> np.ndarray:
    """An uninitialised (rows, dim) float32 matrix from pyarrow's pool, which keeps the pages it frees: numpy's large
    arrays are fresh mappings, and their page faults cost more than a copy (1.1 s per 500 MB on a 2-core VM, against
    0.1 s for the copy)."""
    return np.frombuffer(pa.allocate_buffer(rows * dim * 4), np.float32).reshape(rows, dim)


def gather_matrix(
    column: pa.Array | pa.ChunkedArray, dim: int, rows: np.ndarray | None = None, out: np.ndarray | None = None
) -> np.ndarray:
    """(len(rows), dim) float32 rows of a binary vector column (all of them if rows is None), copied at most once
    (into out, given).

    A chunked column is gathered chunk by chunk straight into the result: combining its chunks first and then
    picking rows wrote (and page-faulted) every byte twice, seconds per shard of a large catalog.
    """
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    if rows is None and len(chunks) == 1 and out is None:
        return matrix_from_binary(chunks[0], dim)
    rows = np.arange(sum(len(c) for c in chunks)) if rows is None else np.asarray(rows, np.int64)
    out = pooled_matrix(len(rows), dim) if out is None else out
    starts = np.cumsum([0] + [len(c) for c in chunks])
    ascending = not len(rows) or bool((np.diff(rows) >= 0).all())
    # ascending rows: each chunk's share is one contiguous run of the result, taken in place
    edges = np.searchsorted(rows, starts) if ascending else None
    owner = None if ascending else np.searchsorted(starts, rows, side="right") - 1
    for number, chunk in enumerate(chunks):
        matrix = matrix_from_binary(chunk, dim)
        if ascending:
            first, end = edges[number], edges[number + 1]
            np.take(
                matrix, rows[first:end] - starts[number], axis=0, out=out[first:end], mode="clip"
            )  # "raise" would buffer out
        else:
            mine = np.flatnonzero(owner == number)
            out[mine] = matrix[rows[mine] - starts[number]]
    return out


def binary_from_matrix(matrix: np.ndarray) -> pa.Array:
    """A binary column with one row of float32 bytes per matrix row."""
    matrix = np.ascontiguousarray(matrix, dtype=np.float32)
    n, dim = matrix.shape
    return binary_from_values(matrix.ravel(), np.arange(0, (n + 1) * dim, dim))


def binary_from_values(values: np.ndarray, offsets: np.ndarray) -> pa.Array:
    """A binary column whose row i packs values[offsets[i]:offsets[i + 1]] (4-byte numbers)."""
    data = np.ascontiguousarray(values)
    return pa.Array.from_buffers(
        pa.binary(),
        len(offsets) - 1,
        [None, pa.py_buffer((np.asarray(offsets) * 4).astype(np.int32)), pa.py_buffer(data.tobytes())],
    )


def matrix_from_list(column: pa.Array) -> np.ndarray:
    """(n, dim) float32 rows from a list<float> column of equal-length lists."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    n = len(column)
    values = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return values.reshape(n, -1) if n else np.empty((0, 0), np.float32)


def packed_vectors(column: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """A vector column (float32 bytes or a list of numbers) as float32 bytes, and each row's length."""
    if pa.types.is_binary(column.type):
        _, offsets = values_from_binary(column)
        return column, np.diff(offsets)
    offsets = column.offsets.to_numpy()
    values = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return binary_from_values(values, offsets - offsets[0]), np.diff(offsets)


# Spark's XXH64 (org.apache.spark.sql.catalyst.expressions.XXH64) for 4-byte inputs, seed chained element by element
_PRIME1, _PRIME2, _PRIME3, _PRIME5 = (
    np.uint64(0x9E3779B185EBCA87),
    np.uint64(0xC2B2AE3D27D4EB4F),
    np.uint64(0x165667B19E3779F9),
    np.uint64(0x27D4EB2F165667C5),
)


def spark_fingerprints(vectors: np.ndarray, seed: int = 42) -> np.ndarray:
    """Spark's xxhash64(embedding) of each row of a float32 matrix, as int64: the fingerprint column the embed job
    writes (jobs.tables.fingerprint), for tables written without it and files written before the column."""
    bits = np.ascontiguousarray(vectors, dtype=np.float32).copy()
    bits[bits == 0] = 0  # Spark hashes -0.0 as 0.0
    bits[np.isnan(bits)] = np.float32("nan")  # and every NaN as Java's canonical one
    words = np.asfortranarray(bits.view(np.uint32)).astype(np.uint64)  # a column at a time: contiguous
    hashes = np.full(len(words), seed, np.uint64)
    with np.errstate(over="ignore"):
        for column in words.T:
            h = hashes + _PRIME5 + np.uint64(4)
            h ^= column * _PRIME1
            h = ((h << np.uint64(23)) | (h >> np.uint64(41))) * _PRIME2 + _PRIME3
            h ^= h >> np.uint64(33)
            h *= _PRIME2
            h ^= h >> np.uint64(29)
            h *= _PRIME3
            h ^= h >> np.uint64(32)
            hashes = h
    return hashes.view(np.int64)

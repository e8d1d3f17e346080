"""Vectors in Arrow batches: float32 matrices to and from `binary` columns (the index's storage) and list<float> columns."""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def matrix_from_binary(column: pa.Array, dim: int) -> np.ndarray:
    """(n, dim) float32 rows from a binary column whose every value is dim little-endian float32s (no copy)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    n = len(column)
    if n == 0:
        return np.empty((0, dim), np.float32)
    offset_type = np.int64 if pa.types.is_large_binary(column.type) else np.int32
    offsets = np.frombuffer(column.buffers()[1], offset_type)[column.offset : column.offset + n + 1]
    data = np.frombuffer(column.buffers()[2], np.uint8)[offsets[0] : offsets[-1]]
    if len(data) != n * dim * 4:
        raise ValueError(f"vector column holds {len(data)} bytes for {n} vectors of {dim} floats")
    return data.view(np.float32).reshape(n, dim)


def binary_from_matrix(matrix: np.ndarray) -> pa.Array:
    """A binary column with one row of float32 bytes per matrix row."""
    matrix = np.ascontiguousarray(matrix, dtype=np.float32)
    n, dim = matrix.shape
    offsets = np.arange(0, (n + 1) * dim * 4, dim * 4, dtype=np.int32)
    return pa.Array.from_buffers(pa.binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(matrix.tobytes())])


def matrix_from_list(column: pa.Array) -> np.ndarray:
    """(n, dim) float32 rows from a list<float> column of equal-length lists."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    n = len(column)
    values = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return values.reshape(n, -1) if n else np.empty((0, 0), np.float32)


def list_from_matrix(matrix: np.ndarray) -> pa.Array:
    """A list<float> column with one list per matrix row."""
    n, dim = matrix.shape
    offsets = pa.array(np.arange(0, (n + 1) * dim, dim, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(np.ascontiguousarray(matrix, np.float32).ravel()))

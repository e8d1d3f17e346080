"""Clustered synthetic unit vectors: a stand-in for image embeddings when only volume matters."""

from __future__ import annotations

import numpy as np


def clustered_unit_vectors(
    n: int, dim: int = 512, cluster_size: int = 100, noise: float = 0.8, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """n L2-normalised float32 vectors around n/cluster_size random centres, and their cluster ids.

    noise is the norm of the Gaussian offset from the (unit) centre: 0.8 gives within-cluster cosines
    around 0.6-0.7 and nearest neighbours around 0.75, like photos of one car model.
    """
    rng = np.random.default_rng(seed)
    n_clusters = max(1, n // cluster_size)
    centres = rng.standard_normal((n_clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    cluster = rng.integers(0, n_clusters, size=n)
    vectors = centres[cluster] + rng.standard_normal((n, dim)).astype(np.float32) * (noise / np.sqrt(dim))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors.astype(np.float32), cluster


# Spark's XXH64 (org.apache.spark.sql.catalyst.expressions.XXH64) for 4-byte inputs, seed chained element by element
_PRIME1, _PRIME2, _PRIME3, _PRIME5 = (
    np.uint64(0x9E3779B185EBCA87),
    np.uint64(0xC2B2AE3D27D4EB4F),
    np.uint64(0x165667B19E3779F9),
    np.uint64(0x27D4EB2F165667C5),
)


def spark_fingerprints(vectors: np.ndarray, seed: int = 42) -> np.ndarray:
    """Spark's xxhash64(embedding) of each row of a float32 matrix, as int64: the fingerprint column the embed job
    writes (jobs.index.layout.fingerprint), for tables written without Spark."""
    bits = np.ascontiguousarray(vectors, dtype=np.float32).copy()
    bits[bits == 0] = 0  # Spark hashes -0.0 as 0.0
    bits[np.isnan(bits)] = np.float32("nan")  # and every NaN as Java's canonical one
    words = bits.view(np.uint32).astype(np.uint64)
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

"""LSH hash functions for `search --method lsh`: seeded random unit vectors, kept with the index's cells."""

from __future__ import annotations

import numpy as np

from jobs.knn import LshParams


def random_projections(dim: int, params: LshParams, seed: int) -> np.ndarray:
    """(num_hash_tables, dim) float32 random unit vectors: Spark ML BucketedRandomProjectionLSH's hash functions,
    floor(x . v / bucket_length), drawn here from the seed, so that building them runs no Spark job."""
    drawn = np.random.default_rng(seed).standard_normal((params.num_hash_tables, dim))
    return (drawn / np.linalg.norm(drawn, axis=1, keepdims=True)).astype(np.float32)

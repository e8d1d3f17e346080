"""Exact placement of rows in Spark partitions: a key whose Spark hash lands in the partition we choose."""

from __future__ import annotations

from pyspark.sql import Column
from pyspark.sql import functions as F

_MASK = 0xFFFFFFFF


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (32 - r))) & _MASK


def spark_hash_int(value: int, seed: int = 42) -> int:
    """Spark's `hash()` of an int column value (Murmur3 x86_32, seed 42), as HashPartitioning computes it."""
    k1 = _rotl((value & _MASK) * 0xCC9E2D51 & _MASK, 15) * 0x1B873593 & _MASK
    h1 = (_rotl(seed ^ k1, 13) * 5 + 0xE6546B64) & _MASK
    h1 ^= 4
    h1 = (h1 ^ (h1 >> 16)) * 0x85EBCA6B & _MASK
    h1 = (h1 ^ (h1 >> 13)) * 0xC2B2AE35 & _MASK
    h1 ^= h1 >> 16
    return h1 - (1 << 32) if h1 >= 1 << 31 else h1


def keys_for(partitions: int) -> list[int]:
    """For each partition p, the smallest int whose hash Spark's repartition(partitions, key) sends to p."""
    chosen: dict[int, int] = {}
    candidate = 0
    while len(chosen) < partitions:
        chosen.setdefault(spark_hash_int(candidate) % partitions, candidate)
        candidate += 1
    return [chosen[p] for p in range(partitions)]


def partition_key(column: Column, partitions: int) -> Column:
    """An int key that `repartition(partitions, key)` sends to partition `column` (0..partitions-1), no collisions."""
    return F.array(*[F.lit(k) for k in keys_for(partitions)])[column]

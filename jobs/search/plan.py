"""How a search is cut into tasks: the queries into blocks, the catalog into ranges of cells, one task a (block,
range) tile. Every tile runs the same kernel (stream.py); they differ only in what they are given.

- One range: each block's task reads its own queries, probes them and streams the catalog's probed cells itself;
  its answers are final. Nothing is shuffled, but every block reads the cells its queries probe.
- Several ranges: the queries are probed where they are read and sent to the ranges they probe (routed); each
  tile streams only its range, and each query's per-range top-k are merged. No catalog byte is read by two tiles
  of one block, at the price of moving the queries and their candidates.

The plan is the tiling of least estimated time, from the sizes the driver knows before any job runs (the
queries' count, the catalog's files and cells, nprobe, the cores). The estimate prices catalog bytes as an object
store serves them to one task, a shuffled row and an extra stage as measured here (docs/search.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from jobs.ivf import Index

READ_SECONDS_PER_BYTE = 1 / 100e6  # a task reading the catalog from an object store: ~100 MB/s (S3, GCS)
ROW_SECONDS = 2.5e-6  # a routed query or a candidate row through Spark's shuffle, per core (2M rows of ~300 bytes)
STAGE_SECONDS = 0.3  # each stage that routing adds (a shuffle's write, its read, the scheduling)
FLOP_SECONDS = 1 / 8e9  # a distance's multiply-adds in numpy, small matrices included, per core
TASK_BYTES = 256 << 20  # the query rows one task holds at once: more are answered in further passes over its cells
QUERY_STRING_BYTES = 200  # a query row's id, path and label, about


@dataclass(frozen=True)
class Plan:
    """Blocks of queries x ranges of cells, and what the estimate expects of them."""

    blocks: int
    bounds: np.ndarray  # the first cell of each range, then the number of cells
    passes: int  # passes a tile makes over its cells (its queries in chunks of at most TASK_BYTES)
    expected_read: float  # catalog bytes
    expected_seconds: float

    @property
    def ranges(self) -> int:
        return len(self.bounds) - 1

    @property
    def routed(self) -> bool:
        return self.ranges > 1

    @property
    def tiles(self) -> int:
        return self.blocks * self.ranges

    def describe(self) -> str:
        if not self.routed:
            return f"{self.blocks} task(s), each reading its own queries and the cells they probe"
        return f"queries routed to {self.ranges} ranges of cells x {self.blocks} block(s): {self.tiles} tasks, each streaming its range once"


def covered(queries: float, share: float) -> float:
    """The expected share of cells at least one of `queries` queries probes, each probing a `share` of the cells."""
    return -math.expm1(queries * math.log1p(-min(share, 1 - 1e-12))) if share < 1 else 1.0


def range_bounds(sizes: np.ndarray, ranges: int) -> np.ndarray:
    """Cell numbers cutting the cells into `ranges` runs of about as many rows each."""
    cumulative = np.cumsum(sizes)
    cuts = np.searchsorted(cumulative, np.arange(1, ranges) * cumulative[-1] / ranges, side="right") + 1
    return np.unique(np.concatenate([[0], np.minimum(cuts, len(sizes)), [len(sizes)]])).astype(np.int64)


def estimate(index: Index, queries: int, nprobe: int | None, k: int, cores: int, blocks: int, ranges: int, from_catalog: bool) -> Plan:
    """The plan of blocks x ranges and its estimated catalog bytes read and seconds."""
    share = 1.0 if nprobe is None else min(nprobe, index.cells) / index.cells
    query_bytes = 4 * index.dim + QUERY_STRING_BYTES + (0 if nprobe is None else 4 * min(nprobe, index.cells))
    visits = ranges * covered(index.cells / ranges, share) if ranges > 1 else 1.0
    per_tile = queries / blocks * visits / ranges
    passes = max(1, math.ceil(per_tile * query_bytes / TASK_BYTES))
    if from_catalog and nprobe is not None:  # a block of the catalog's own rows probes its own cells first
        cover = 1 / blocks + (1 - 1 / blocks) * covered(queries / blocks, (min(nprobe, index.cells) - 1) / index.cells)
    else:
        cover = covered(per_tile / passes, share)
    read = blocks * passes * index.catalog_bytes * cover
    routed = queries * visits * (1 + k) if ranges > 1 else 0
    flops = queries * share * index.count * index.dim * 2
    busy = min(blocks * ranges, cores)
    seconds = (read * READ_SECONDS_PER_BYTE + routed * ROW_SECONDS + flops * FLOP_SECONDS) / busy + (2 * STAGE_SECONDS if ranges > 1 else 0)
    return Plan(blocks, range_bounds(index.plan.sizes, ranges) if ranges > 1 else np.array([0, index.cells]), passes, read, seconds)


def choose(index: Index, queries: int, nprobe: int | None, k: int, cores: int, from_catalog: bool = False, routable: bool = True) -> Plan:
    """The plan of least estimated time: one range with 1 .. 2 x cores blocks, or 1 .. 4 x cores ranges of cells
    (never more ranges than cells, never more blocks than queries)."""
    queries = max(queries, 1)
    query_bytes = 4 * index.dim + QUERY_STRING_BYTES
    least_blocks = max(1, math.ceil(queries * query_bytes / TASK_BYTES))
    options = [(blocks, 1) for blocks in sorted({least_blocks, *range(least_blocks, 2 * cores + 1)}) if blocks <= max(queries, least_blocks)]
    if routable and index.cells > 1:
        options += [(least_blocks, ranges) for ranges in (cores, 2 * cores, 4 * cores) if 1 < ranges <= index.cells]
    plans = [estimate(index, queries, nprobe, k, cores, blocks, ranges, from_catalog) for blocks, ranges in options]
    return min(plans, key=lambda p: (round(p.expected_seconds, 3), p.tiles))

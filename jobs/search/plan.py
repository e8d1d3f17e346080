"""How a search is cut into tasks: the queries into blocks, the catalog into ranges of cells, one task a (block,
range) tile. Every tile runs the same kernel (stream.py); they differ only in what they are given.

- One range: each block's task reads its own queries, probes them and streams the catalog's probed cells itself;
  its answers are final. Nothing is shuffled, but every block reads the cells its queries probe.
- Several ranges: the queries are probed where they are read and sent to the ranges they probe (routed); each
  tile streams only its range, and each query's per-range top-k are merged. No catalog byte is read by two tiles
  of one block, at the price of moving the queries and their candidates.

The plan is the tiling of least estimated time, from the sizes the driver knows before any job runs (the
queries' count, the catalog's bytes and cells, nprobe, the cores, where the catalog lives). A task reads the
catalog a file ahead of its scoring, so it costs the longer of the two; routing costs a pass over the queries, a
shuffle of each query to every range it visits, and a merge of its candidates. The constants are measured
(docs/search.md); the bench shows the plan chosen at every point.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from jobs.filesystems import SHIPPED, Location
from jobs.ivf import Index

LOCAL_READ_SECONDS = 1 / 300e6  # a catalog byte read and gathered by a task from local disk (page cache included)
REMOTE_READ_SECONDS = 1 / 100e6  # from an object store (S3, GCS), or a copy Spark ships first
FLOP_SECONDS = 1 / 7e9  # a multiply-add of the distances and the probes, in numpy on one core, cell by cell
BLAS_FLOP_SECONDS = 1 / 40e9  # the same in big matrix products: probing (queries x centroids), exact search
TASK_SECONDS = 0.1  # a task's own cost: its Python worker's set-up, the index's broadcast
ROUTE_SECONDS = 7e-6  # a routed query row leaving its map task
VISIT_SECONDS = 16e-6  # a routed query row read by its tile, and its candidates packed and written
MERGE_SECONDS = 50e-6  # a query's packed candidates from one range, merged and its neighbours written
STAGE_SECONDS = 0.3  # each stage that routing adds
# the share of one task's time the slowest of a wave runs past the mean, where tasks' shares of work follow the cells:
# blocks of the catalog's own rows (GloVe's halves as queries: 18.6 and 28.3 s) and ranges of cells; a query
# file's blocks are equal shares of its rows (GloVe 300k x 100k: 2 blocks 11.2-12.8 s, 4 blocks 11.7-16.1 s)
STRAGGLER = 0.5
TASK_BYTES = 256 << 20  # the query rows one task holds at once: more are answered in further passes over its cells
MERGED_ROWS_PER_TASK = 1 << 18  # candidate rows a merge task holds
QUERY_STRING_BYTES = 200  # a query row's id, path and label, about


@dataclass(frozen=True)
class Tiling:
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
        return (
            f"queries routed to {self.ranges} ranges of cells x {self.blocks} block(s): "
            f"{self.tiles} tasks, each streaming its range once"
        )


def covered(queries: float, share: float) -> float:
    """The expected share of cells at least one of `queries` queries probes, each probing a `share` of the cells."""
    return -math.expm1(queries * math.log1p(-min(share, 1 - 1e-12))) if share < 1 else 1.0


def range_bounds(sizes: np.ndarray, ranges: int) -> np.ndarray:
    """Cell numbers cutting the cells into `ranges` runs of about as many rows each."""
    cumulative = np.cumsum(sizes)
    cuts = np.searchsorted(cumulative, np.arange(1, ranges) * cumulative[-1] / ranges, side="right") + 1
    return np.unique(np.concatenate([[0], np.minimum(cuts, len(sizes)), [len(sizes)]])).astype(np.int64)


def estimate(
    index: Index,
    queries: int,
    nprobe: int | None,
    cores: int,
    blocks: int,
    ranges: int,
    from_catalog: bool = False,
    remote: bool = False,
) -> Tiling:
    """The tiling of blocks x ranges, the catalog bytes it is expected to read and the seconds it should take."""
    share = 1.0 if nprobe is None else min(nprobe, index.cells) / index.cells
    bounds = range_bounds(index.plan.sizes, ranges) if ranges > 1 else np.array([0, index.cells])
    ranges = len(bounds) - 1
    query_bytes = 4 * index.dim + QUERY_STRING_BYTES + (0 if nprobe is None else 4 * min(nprobe, index.cells))
    visits = ranges * covered(index.cells / ranges, share) if ranges > 1 else 1.0
    per_tile = queries / blocks * visits / ranges
    passes = max(1, math.ceil(per_tile * query_bytes / TASK_BYTES))
    if from_catalog and nprobe is not None:  # a block of the catalog's own rows probes its own cells first
        cover = 1 / blocks + (1 - 1 / blocks) * covered(queries / blocks, (min(nprobe, index.cells) - 1) / index.cells)
    else:
        cover = covered(per_tile / passes, share)
    tile_read = index.catalog_bytes / ranges * cover * passes
    probe = 0.0 if nprobe is None else queries * index.cells * index.dim * 2 * BLAS_FLOP_SECONDS
    score = queries * share * index.count * index.dim * 2 * (BLAS_FLOP_SECONDS if nprobe is None else FLOP_SECONDS)
    read_seconds = REMOTE_READ_SECONDS if remote else LOCAL_READ_SECONDS
    tiles = blocks * ranges
    # tasks run in waves of `cores`; where their work follows the cells, the slowest of a wave lags the rest
    uneven = tiles > 1 and (ranges > 1 or from_catalog)
    waves = math.ceil(tiles / cores) + (STRAGGLER if uneven else 0.0)
    if ranges == 1:
        seconds = waves * (max(tile_read * read_seconds, (probe + score) / blocks) + TASK_SECONDS)
    else:
        task = max(tile_read * read_seconds, score / tiles + per_tile * VISIT_SECONDS) + TASK_SECONDS
        routing = (probe + queries * visits * (ROUTE_SECONDS + MERGE_SECONDS)) / cores
        seconds = routing + waves * task + 2 * STAGE_SECONDS
    return Tiling(blocks, bounds, passes, tiles * tile_read, seconds)


def choose(
    index: Index,
    queries: int,
    nprobe: int | None,
    cores: int,
    from_catalog: bool = False,
    routable: bool = True,
    remote: bool = False,
) -> Tiling:
    """Of the tilings expected to take at most 10% longer than the fastest, the one that reads the least catalog bytes:
    one range with as few blocks as hold the queries and up to 2 x cores more, or 1 .. 4 x cores ranges of cells;
    never more blocks than queries."""
    queries = max(queries, 1)
    least_blocks = max(1, math.ceil(queries * (4 * index.dim + QUERY_STRING_BYTES) / TASK_BYTES))
    options = [
        (blocks, 1) for blocks in range(least_blocks, least_blocks + 2 * cores) if blocks <= max(queries, least_blocks)
    ]
    if routable and index.cells > 1:
        options += [(least_blocks, ranges) for ranges in (cores, 2 * cores, 4 * cores) if 1 < ranges <= index.cells]
    plans = [
        estimate(index, queries, nprobe, cores, blocks, ranges, from_catalog, remote) for blocks, ranges in options
    ]
    fastest = min(p.expected_seconds for p in plans)
    return min(
        (p for p in plans if p.expected_seconds <= 1.1 * fastest), key=lambda p: (p.expected_read, p.expected_seconds)
    )


@dataclass(frozen=True)
class Plan:
    """A search, whole, decided before any of it runs: what each query reads (probes: cells each probes; None: every
    cell), the tiling, the query rows a task scores at once, the tasks that read the queries and that merge the
    ranges' candidates, and who reads the queries and the catalog. tiles.py carries it out as it says."""

    method: str
    probes: int | None
    tiling: Tiling
    chunk_rows: int
    map_tasks: int
    merge_tasks: int  # 0: nothing is merged (one range, or a search for pairs)
    topk: bool  # each query's k nearest; else every row past a similarity (pairs)
    queries_read_by: str
    catalog_read_by: str
    answers_written_by: str  # the tasks that answer (pyarrow), Spark's writer, or "" where the caller reads them

    @property
    def answers_by_tasks(self) -> bool:
        return self.answers_written_by.startswith("the tasks")

    @property
    def lsh(self) -> bool:
        return self.method == "lsh"

    def describe(self) -> str:
        probing = f"nprobe {self.probes}" if self.probes is not None else "every cell"
        merged = f", merged by {self.merge_tasks} task(s)" if self.merge_tasks else ""
        return (
            f"{self.method}, {probing}: {self.tiling.describe()}{merged}; {self.chunk_rows} query rows a pass; "
            f"queries read by {self.queries_read_by}, the catalog by {self.catalog_read_by}"
            + (f", answers written by {self.answers_written_by}" if self.answers_written_by else "")
        )


def make(
    index: Index,
    method: str,
    nprobe: int | None,
    queries: int,
    k: int | None,
    cores: int,
    catalog: Location,
    queries_by_tasks: bool,
    from_catalog: bool = False,
    output: Location | None | str = "",
) -> Plan:
    """The plan of a search by `method` of about `queries` queries (k: each wants its k nearest; None: the pairs past
    a similarity) at nprobe (None: the index's), on `cores` cores, the catalog at `catalog`, its answers written to
    output (a Location pyarrow writes; None: Spark's writer only; "": read by the caller). Pairs are deduplicated
    in Spark, which then writes them."""
    wanted = nprobe or index.params.nprobe
    probes = None if method in ("exact", "lsh") or wanted >= index.cells else wanted
    tiling = choose(
        index, queries, probes, cores, from_catalog, routable=method != "lsh", remote=catalog.kind != "local"
    )
    merge = merge_tasks(queries, k, tiling.ranges, 4 * cores) if tiling.routed and k is not None else 0
    return Plan(
        method,
        probes,
        tiling,
        chunk_rows=max(1, TASK_BYTES // (4 * index.dim + QUERY_STRING_BYTES)),
        map_tasks=max(tiling.blocks, cores) if tiling.routed else tiling.blocks,
        merge_tasks=merge,
        topk=k is not None,
        queries_read_by="the tasks (pyarrow)" if queries_by_tasks else "Spark",
        catalog_read_by="copies shipped by Spark" if catalog.kind == SHIPPED else "the tasks (pyarrow)",
        answers_written_by="" if output == "" else "the tasks (pyarrow)" if output and k is not None else "Spark",
    )


def merge_tasks(queries: int, k: int, visits: float, most: int) -> int:
    """Tasks for the merge: enough for its candidate rows at MERGED_ROWS_PER_TASK each, at most `most`."""
    return max(1, min(most, int(queries * k * visits // MERGED_ROWS_PER_TASK) + 1))

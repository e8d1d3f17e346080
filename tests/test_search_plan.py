"""How a search is cut into tasks (plan.py): the least estimated time, read where it is cheapest, never past memory."""

from __future__ import annotations

import numpy as np
import pytest

from jobs.ivf import CellPlan, Index, IvfParams
from jobs.search import plan


def index_of(rows: int, dim: int, cells: int, files: int, row_bytes: int) -> Index:
    """An index's sizes alone (the plan looks at nothing else)."""
    sizes = np.full(cells, rows // cells, np.int64)
    meta = {
        "model": "resnet18",
        "dim": dim,
        "count": rows,
        "files": [
            {
                "name": f"part-{i}",
                "first_group": i,
                "last_group": i,
                "first_cell": i * cells // files,
                "last_cell": (i + 1) * cells // files - 1,
                "rows": rows // files,
                "bytes": rows // files * row_bytes,
            }
            for i in range(files)
        ],
    }
    return Index(
        "mem://index",
        "resnet18",
        dim,
        rows,
        IvfParams(cells, 1, 0, 0, 0),
        np.zeros((cells, dim), np.float32),
        CellPlan.build(sizes, rows),
        meta=meta,
    )


GLOVE = index_of(300_000, 50, 2191, 4, 500)  # ~150 MB, as the bench's GloVe 300k with long ids and paths
LARGE = index_of(1_000_000, 512, 4000, 34, 2200)  # ~2.2 GB


@pytest.mark.parametrize("index,nprobe", [(GLOVE, 105), (LARGE, 4)])
def test_one_query_is_one_task_that_reads_only_its_cells(index, nprobe):
    chosen = plan.choose(index, 1, nprobe, cores=2)
    assert (
        chosen.tiles == 1
        and not chosen.routed
        and chosen.expected_read <= index.catalog_bytes * 2 * nprobe / index.cells
    )


def test_an_exact_search_of_one_query_splits_the_catalog_over_the_cores_and_reads_it_once():
    chosen = plan.choose(LARGE, 1, None, cores=2)
    assert chosen.routed and chosen.tiles >= 2 and chosen.expected_read == pytest.approx(LARGE.catalog_bytes)


def test_many_queries_on_a_small_catalog_are_split_over_the_cores_where_they_are_read():
    """Scoring, not reading, is their cost: each core's block (an even share of the query file) reads the catalog
    beside its scoring, and no more blocks than cores, so the catalog is read once a core."""
    for queries in (10_000, 100_000):
        chosen = plan.choose(GLOVE, queries, 105, cores=2)
        assert not chosen.routed and chosen.blocks == 2 and chosen.expected_read <= 2 * GLOVE.catalog_bytes


@pytest.mark.parametrize("queries", [1000, 10_000])
def test_queries_go_to_the_cells_of_a_large_catalog_in_an_object_store_and_each_byte_is_read_once(queries):
    chosen = plan.choose(LARGE, queries, 1, cores=2, remote=True)
    blocks = plan.estimate(LARGE, queries, 1, 2, 2, 1, remote=True)
    assert (
        chosen.routed
        and chosen.expected_read < blocks.expected_read
        and chosen.expected_read <= 0.5 * LARGE.catalog_bytes
    )


def test_the_catalog_against_itself_reads_it_in_place_rather_than_shuffling_it():
    chosen = plan.choose(GLOVE, GLOVE.count, 105, cores=2, from_catalog=True)
    assert not chosen.routed and chosen.blocks >= 2


def test_queries_beyond_a_tasks_memory_are_split_into_blocks():
    chosen = plan.choose(LARGE, 1_000_000, 1, cores=2, from_catalog=True)
    assert 1_000_000 * (4 * 512 + plan.QUERY_STRING_BYTES) / chosen.blocks <= plan.TASK_BYTES
    assert chosen.expected_read <= 1.1 * LARGE.catalog_bytes  # each block of catalog rows probes mostly its own cells


def test_lsh_is_never_routed_and_no_plan_has_more_blocks_than_queries():
    assert not plan.choose(GLOVE, 100_000, None, cores=2, routable=False).routed
    assert plan.choose(GLOVE, 3, 105, cores=8).blocks <= 3


def test_ranges_hold_about_as_many_rows_each_and_a_big_cell_a_range_of_its_own():
    sizes = np.array([5, 1, 1, 1, 20, 2, 2, 2, 2, 4, 3, 2, 3])
    bounds = plan.range_bounds(sizes, 3)
    rows = [sizes[a:b].sum() for a, b in zip(bounds[:-1], bounds[1:])]
    assert bounds[0] == 0 and bounds[-1] == len(sizes) and sum(rows) == sizes.sum() and len(rows) <= 3
    assert all(
        r <= sizes.sum() / 3 + 1 or b - a == 1 or sizes[a:b].max() > sizes.sum() / 3
        for r, a, b in zip(rows, bounds[:-1], bounds[1:])
    )


@pytest.mark.parametrize("index,nprobe", [(GLOVE, 105), (LARGE, 1), (LARGE, None)])
def test_the_cost_of_the_chosen_plan_grows_smoothly_with_the_queries(index, nprobe):
    """No cliff: where the choice switches from one plan to another, both cost about the same."""
    counts = np.unique(np.geomspace(1, 300_000, 80).astype(int))
    costs = np.array([plan.choose(index, int(n), nprobe, cores=2).expected_seconds for n in counts])
    assert (costs[1:] / costs[:-1]).max() < 1.5


def test_the_whole_plan_is_one_value_the_tasks_only_carry_out():
    from jobs.filesystems import SHIPPED, Location

    local, shipped, out = Location("local", "/idx"), Location(SHIPPED, "catalog"), Location("local", "/out")
    one = plan.make(GLOVE, "ivf", 105, 1, 10, 2, local, True, output=out)
    assert (one.probes, one.tiling.routed, one.map_tasks, one.merge_tasks) == (105, False, 1, 0)
    assert one.chunk_rows == plan.TASK_BYTES // (4 * 50 + plan.QUERY_STRING_BYTES)
    assert one.answers_by_tasks and "answers written by the tasks" in one.describe()
    # an nprobe of every cell, or the exact method, scans; LSH is never routed
    assert plan.make(GLOVE, "ivf", 5000, 1, 10, 2, local, True).probes is None
    assert plan.make(GLOVE, "exact", None, 1, 10, 2, local, True).probes is None
    assert not plan.make(GLOVE, "lsh", None, 100_000, 10, 2, local, True).tiling.routed
    # routed: the queries read by at least a task a core, the ranges' candidates merged
    routed = plan.make(LARGE, "ivf", 1, 10_000, 10, 2, Location("s3", "bucket/idx"), True)
    assert routed.tiling.routed and routed.map_tasks >= 2 and routed.merge_tasks >= 1
    # pairs: nothing merged, written by Spark (deduplicated there); copies Spark ships, a DataFrame of queries
    pairs = plan.make(GLOVE, "ivf", 105, GLOVE.count, None, 2, shipped, False, True, out)
    assert pairs.merge_tasks == 0 and not pairs.answers_by_tasks and not pairs.topk
    assert "queries read by Spark, the catalog by copies shipped by Spark" in pairs.describe()
    assert plan.make(GLOVE, "ivf", 105, 1, 10, 2, local, True, output=None).answers_written_by == "Spark"

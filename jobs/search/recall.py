"""Recall on this search's own queries: a seeded sample's exact answers give its recall@k at every nprobe (a probed
neighbour is always found: jobs/index/calibrate.py), hence the nprobe that reaches the target and the estimate.

Queries unlike the catalog need more cells than the index's calibration on its own rows says; this is how the search
knows, and says so.
"""

from __future__ import annotations

import os
import time
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from pyspark.sql import SparkSession

from jobs.filesystems import SHIPPED, Location
from jobs.index.calibrate import Nearest, exact_neighbours, recall_curve, smallest_nprobe
from jobs.ivf import Index
from jobs.ivf.files import live_batches
from jobs.ivf.manifest import CatalogFile
from jobs.search.queries import QueryFiles, Source, catalog_queries
from jobs.search.scoring import Wanted
from jobs.vectors import matrix_from_binary, packed_vectors

SAMPLE_QUERIES = 400  # standard error of recall ~0.005 where a query's recall varies by ~0.1
FEWEST_SAMPLED = 100  # the default sample shrinks to this where scoring 400 against the catalog costs more than
PASS_FLOPS = 5e10  # this many multiply-adds (~1 s on 2 cores): 1M x 512 catalogs
MIN_QUERIES = 100  # fewer are not measured unless asked: their search reads a few cells, the measure every one
SAMPLE_READ_BYTES = 64 << 20  # of query vectors the driver reads to draw the sample from
SAMPLE_BATCH_ROWS = 8192  # rows the driver holds at once beside the sample as it draws it
DRIVER_PASS_BYTES = 256 << 20  # catalog vectors the driver scores the sample against itself (~1 s on 2 cores)
SEED = 104729
PAIR_DEPTH = 32  # --duplicates: a sampled row's partners are looked for among its PAIR_DEPTH nearest
Z95 = 1.96


@dataclass(frozen=True)
class Estimate:
    """recall@k of the search's sampled queries at the nprobe it runs, its standard error (a finite population: 0
    where every query was sampled), the target and the smallest nprobe reaching it (None: none does), whether the
    nprobe was chosen here, the index's own calibrated figure, and the seconds it took."""

    sample: int
    queries: int
    nprobe: int
    recall: float
    error: float
    target: float
    reaching: int | None
    chosen: bool
    calibrated: float | None
    seconds: float

    @property
    def interval(self) -> tuple[float, float]:
        return max(0.0, self.recall - Z95 * self.error), min(1.0, self.recall + Z95 * self.error)

    def line(self) -> str:
        low, high = self.interval
        shown = f"{self.recall:.3f}" + (f" (95% {low:.3f}-{high:.3f})" if self.error else " (every query)")
        how = "chosen for" if self.chosen else "against"
        calibrated = f"; the index's own rows: {self.calibrated:.3f}" if self.calibrated is not None else ""
        return (
            f"{shown} at nprobe {self.nprobe}, {how} target {self.target:.2f}, on {self.sample} of "
            f"{self.queries} queries in {self.seconds:.1f} s{calibrated}"
        )

    def warning(self) -> str | None:
        if self.recall >= self.target:
            return None
        reach = f"--nprobe {self.reaching} would reach it" if self.reaching else "use --method exact"
        return f"estimated recall@k {self.recall:.3f} is under the target {self.target:.2f}: {reach}"

    def report(self) -> dict:
        low, high = self.interval
        return {
            "recall": round(self.recall, 4),
            "standard_error": round(self.error, 4),
            "interval_95": [round(low, 4), round(high, 4)],
            "sample": self.sample,
            "nprobe": self.nprobe,
            "target": self.target,
            "nprobe_reaching_target": self.reaching,
            "nprobe_chosen_by_estimate": self.chosen,
            "index_calibrated_recall": self.calibrated,
            "seconds": round(self.seconds, 3),
        }


def sample_queries(spark: SparkSession, source: Source, dim: int, size: int) -> tuple[np.ndarray, list[str], int]:
    """Up to `size` of the source's queries, those of smallest seeded hash of their id: their vectors, ids, and how
    many queries there were. Files the tasks would read are sampled here, on the driver (a Spark job would cost more
    than the reading); a DataFrame's rows by a job."""
    if source.files is not None:
        return sample_files(source.files, dim, size)
    return sample_frame(spark, source, dim, size)


def sample_files(files: QueryFiles, dim: int, size: int) -> tuple[np.ndarray, list[str], int]:
    """sample_queries of the table's row groups: all of them where their vectors fit SAMPLE_READ_BYTES, else row groups
    drawn at random until they do (a row group is the least the driver can read)."""
    rng = np.random.default_rng(SEED)
    starts = np.concatenate([[0], np.cumsum([g[2] for g in files.groups])])
    budget, chosen = SAMPLE_READ_BYTES // (4 * dim), []
    for g in rng.permutation(len(files.groups)):
        if chosen and sum(files.groups[c][2] for c in chosen) + files.groups[g][2] > budget:
            break
        chosen.append(int(g))
    run = [(*files.groups[g][:2], 0, files.groups[g][2], int(starts[g]), files.groups[g][3]) for g in sorted(chosen)]
    # batch by batch, keeping the `size` rows of smallest hash: a row group of any size never sits whole in memory
    order, ids, matrix = np.empty(0, np.int64), [], np.empty((0, dim), np.float32)
    for batch in files.read(run, batch_rows=SAMPLE_BATCH_ROWS):
        packed, lengths = packed_vectors(batch.column("vector"))
        keep = np.flatnonzero(lengths == dim)
        batch_ids = batch.column("query_id").take(pa.array(keep)).to_pylist()
        hashes = np.concatenate([order, mixed(batch_ids)])
        kept = np.sort(np.argsort(hashes, kind="stable")[:size])  # in read order, as the queries come
        both = ids + batch_ids
        ids = [both[i] for i in kept]
        matrix = np.concatenate([matrix, matrix_from_binary(packed.take(pa.array(keep)), dim)])[kept]
        order = hashes[kept]
    return matrix, ids, files.rows


def sample_frame(spark: SparkSession, source: Source, dim: int, size: int) -> tuple[np.ndarray, list[str], int]:
    """sample_queries of a DataFrame: each task keeps its `size` rows of smallest hash, so at most tasks x size rows
    reach the driver."""
    frame, read = source.tasks(spark, spark.sparkContext.defaultParallelism)

    def smallest(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        kept, seen = None, 0
        for batch in read(batches):
            vectors, lengths = packed_vectors(batch.column("vector"))
            seen += len(batch)
            rows = pa.table({"qidx": batch.column("qidx"), "query_id": batch.column("query_id"), "vector": vectors})
            rows = rows.filter(pa.array(lengths == dim))  # the search itself says what is wrong with the others
            rows = rows.append_column("h", pa.array(mixed(rows.column("query_id").to_pylist())))
            kept = rows if kept is None else pa.concat_tables([kept, rows])
            kept = kept.take(np.argsort(kept.column("h").to_numpy(), kind="stable")[:size])
        if kept is not None:
            yield from kept.append_column("seen", pa.array(np.full(len(kept), 0, np.int64))).to_batches()
        yield pa.RecordBatch.from_pydict(
            {"qidx": [-1], "query_id": [None], "vector": [None], "h": [0], "seen": [seen]},
            schema=pa.schema(
                [
                    ("qidx", pa.int64()),
                    ("query_id", pa.string()),
                    ("vector", pa.binary()),
                    ("h", pa.int64()),
                    ("seen", pa.int64()),
                ]
            ),
        )

    rows = frame.mapInArrow(
        smallest, "qidx long, query_id string, vector binary, h long, seen long"
    ).collect()  # tasks x size rows
    counted = sum(r["seen"] for r in rows if r["qidx"] < 0)
    picked = sorted((r for r in rows if r["qidx"] >= 0), key=lambda r: r["h"])[:size]
    vectors = (
        matrix_from_binary(pa.array([r["vector"] for r in picked], pa.binary()), dim)
        if picked
        else np.empty((0, dim), np.float32)
    )
    return vectors, [r["query_id"] for r in picked], counted


def mixed(ids: list[str | None]) -> np.ndarray:
    """A seeded mix of each id (crc32, then splitmix64 to 63 bits): an order of the queries that is the same however
    their table is read."""
    z = np.array([zlib.crc32((i or "").encode()) for i in ids], np.uint64)
    with np.errstate(over="ignore"):
        z = z + np.uint64(SEED) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return ((z ^ (z >> np.uint64(31))) >> np.uint64(1)).astype(np.int64)


def catalog_pass(spark: SparkSession, index: Index, files: Location, sample: np.ndarray, ids: list[str], depth: int):
    """The sample's exact `depth` nearest catalog rows (cells, squared distances) in one pass over the catalog: here on
    the driver where the catalog's vectors are few enough that a Spark job's own start (1-2 s) would cost more, else
    by the tasks, a share of the files each (read with pyarrow where they can, as the search reads them)."""
    if files.kind == SHIPPED:
        frame = catalog_queries(spark, index, files).selectExpr("query_id AS image_id", "own_cell AS cell", "vector")
        return exact_neighbours(frame, sample, ids, depth)
    entries = index.manifest.files
    if index.count * index.dim * 4 <= DRIVER_PASS_BYTES:
        return driver_pass(files, entries, sample, ids, depth)
    tasks = min(len(entries), spark.sparkContext.defaultParallelism * 2)

    def read(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for task in (t for batch in batches for t in batch.column("id").to_pylist()):
            yield from live_batches(files, entries[task::tasks], pass_columns(ids))

    return exact_neighbours(spark.range(tasks, numPartitions=tasks), sample, ids, depth, read)


def driver_pass(
    files: Location, entries: Sequence[CatalogFile], sample: np.ndarray, ids: list[str], depth: int
) -> tuple[np.ndarray, np.ndarray]:
    """catalog_pass on the driver: a thread a core, a share of the files each (reading and scoring release the
    GIL), their bests merged."""
    threads = max(1, min(len(entries), os.cpu_count() or 1, 4))
    with ThreadPoolExecutor(threads) as pool:
        parts = list(
            pool.map(
                lambda share: Nearest(sample, ids, depth).add_all(
                    live_batches(files, entries[share::threads], pass_columns(ids))
                ),
                range(threads),
            )
        )
    merged = parts[0]
    for part in parts[1:]:
        merged.merge(part.d2, part.cells)
    return merged.cells, merged.d2


def pass_columns(ids: list[str]) -> list[str]:
    """The catalog columns the exact pass reads: the ids only where the sample's own rows are to be left out."""
    return ["image_id", "cell", "vector"] if ids else ["cell", "vector"]


def default_sample(index: Index) -> int:
    """SAMPLE_QUERIES, fewer (not under FEWEST_SAMPLED) where scoring them against every catalog row would cost more
    than PASS_FLOPS: the pass's reading is the same either way, its scoring follows the sample."""
    return int(np.clip(PASS_FLOPS / max(index.count * index.dim, 1), FEWEST_SAMPLED, SAMPLE_QUERIES))


def estimate(
    spark: SparkSession,
    index: Index,
    source: Source,
    files: Location,
    wanted: Wanted,
    nprobe: int | None,
    target: float,
    size: int | None = None,
    least: int = 0,
) -> Estimate | None:
    """The recall of this search on a sample of `size` of its queries (default_sample where not given): at nprobe where
    given, else at the smallest nprobe that
    reaches target (which the search then runs). None where there are fewer than `least` queries or no sampled one has
    a neighbour."""
    started = time.perf_counter()
    size = size or default_sample(index)
    if source.files is not None and source.files.rows < least:
        return None
    sample, ids, queries = sample_queries(spark, source, index.dim, size)
    if not len(sample) or queries < least:
        return None
    depth = wanted.k if wanted.min_similarity is None else PAIR_DEPTH
    cells, d2 = catalog_pass(spark, index, files, sample, ids if wanted.exclude_self else [], depth)
    if wanted.min_similarity is not None:  # the partners a pair search must find: those similar enough
        similarity = 1 - d2 / 2  # unit vectors
        cells = np.where(similarity >= wanted.min_similarity, cells, -1)
    if not (cells >= 0).any():
        return None
    curve, error = recall_curve(sample, index.centroids, cells, index.plan.sizes, wanted.enough)
    error = error * np.sqrt(max(0.0, (queries - len(sample)) / max(queries - 1, 1)))  # a finite population
    reaching = smallest_nprobe(curve, error, target)
    at = min(nprobe or reaching or index.cells, index.cells)
    calibrated = index.manifest.calibrated_recall
    return Estimate(
        len(sample),
        queries,
        at,
        float(curve[at - 1]),
        float(error[at - 1]),
        target,
        reaching,
        nprobe is None,
        calibrated,
        time.perf_counter() - started,
    )

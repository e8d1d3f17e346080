"""Index updates (--mode incremental) next to full rebuilds of the same tables, in one run.

  python bench/index_update.py                     # GloVe 250k: +10%, +50%, -10%, +50k -10k, ten 1% updates
  python bench/index_update.py --glove 0 --clustered 1000000 --name index_update_clustered  # 1M x 512 + 1%

Each row is one spark-submit (Spark's default 1g driver; the index job's 4g where it builds from scratch, as
bench/search.py builds). The catalog is GloVe 6B 50-d split into a 250k base, up to 149k rows to add and 1,000
held-out queries, written with sha1 ids and long paths as bench/search.py writes them, each vector's fingerprint
beside it as the embed job writes it (and once without, as another tool would write the table). After each update:
the index holds exactly the table's rows (counted), recall@10 of the default search on the held-out queries against
brute force over the table, and whether any dropped row came back. Ten successive 1% updates end with a 1,000-query
search timed against the same search on a fresh rebuild.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "tests")]

from common import print_table, write_json  # noqa: E402
from helpers import build_dist  # noqa: E402
from search import DATA, data_of, recall, row_id, submit, vectors_of, write_embeddings  # noqa: E402


class Catalog:
    """Numbered rows of one data set: any subset written as an embeddings table, and truth for the held-out queries."""

    def __init__(self, kind: str, base: int, extra: int, queries: int) -> None:
        self.vectors, self.queries = vectors_of(kind, base + extra, queries)
        self.ids = [row_id("c", i) for i in range(len(self.vectors))]
        self.base = base

    def write(self, path: Path, rows: np.ndarray, fingerprints: bool = True) -> None:
        write_embeddings(path, self.vectors[rows], "c", rows, fingerprints)

    def check(self, out: Path, rows: np.ndarray, dropped: np.ndarray) -> dict:
        """Recall@10 of a neighbours table against brute force over `rows`, and the dropped rows it returned."""
        import faiss

        flat = faiss.IndexFlatIP(self.vectors.shape[1])
        flat.add(self.vectors[rows])
        truth = rows[flat.search(self.queries, 10)[1]]
        table = pq.read_table(out, columns=["query_id", "neighbor_id"])
        number = {image_id: i for i, image_id in enumerate(self.ids)}
        found: list[set[int]] = [set() for _ in self.queries]
        query_number = {row_id("q", i): i for i in range(len(self.queries))}
        for q, n in zip(table.column("query_id").to_pylist(), table.column("neighbor_id").to_pylist()):
            found[query_number[q]].add(number[n])
        returned = set().union(*found) & set(dropped.tolist())
        return {"recall": recall(found, truth), "dropped_returned": len(returned)}


def index_job(dist, table: Path, index: Path, mode: str) -> dict:
    run = submit(
        dist, ["index", "--embeddings", table, "--output", index, "--mode", mode], "4g" if mode == "overwrite" else "1g"
    )
    summary = json.loads((index / "_summary.json").read_text())
    compared = summary.get("compared") or ""  # an update's: which of the table's rows its diff read
    return {
        "wall_s": run["wall_s"],
        "stages": summary["seconds"],
        "count": summary["counts"].get("indexed"),
        "diff_reads": "appended files" if "appended file(s) alone" in compared else "every row" if compared else "-",
    }


def search_job(dist, index: Path, queries: Path, out: Path) -> dict:
    run = submit(dist, ["search", "--index", index, "--queries", queries, "--output", out, "-k", "10"])
    return {"wall_s": run["wall_s"], "search_s": json.loads((out / "_summary.json").read_text())["seconds"]["search"]}


def table_for(data: Catalog, folder: Path, name: str, rows: np.ndarray) -> tuple[Path, list[Path]]:
    """The table holding `rows`, as the embed job would leave it: where rows were only added, the base table with a
    new file beside its own (the files to remove after); else a table written afresh (embed rewrites a table when
    photos go), without the fingerprint column where the name ends in OTHER_TOOLS."""
    if name.endswith(OTHER_TOOLS) or not np.array_equal(rows[: data.base], np.arange(data.base)):
        data.write(folder / f"table_{name}", rows, fingerprints=not name.endswith(OTHER_TOOLS))
        return folder / f"table_{name}", []
    data.write(folder / "added", rows[data.base :])
    moved = [folder / "table_base" / f"appended-{part.name}" for part in sorted((folder / "added").glob("*.parquet"))]
    for part, target in zip(sorted((folder / "added").glob("*.parquet")), moved):
        shutil.move(part, target)
    return folder / "table_base", moved


def scenario(dist, data: Catalog, folder: Path, name: str, rows: np.ndarray, queries: Path) -> list[dict]:
    """The base index updated to `rows`, next to a rebuild of `rows`: wall, count, recall, dropped rows returned."""
    base = np.arange(data.base)
    table, appended = table_for(data, folder, name, rows)
    index = folder / f"index_{name}"
    shutil.rmtree(index, ignore_errors=True)
    shutil.copytree(folder / "index_base", index)
    dropped = np.setdiff1d(base, rows)
    found = []
    for mode in ("incremental", "overwrite"):
        job = index_job(dist, table, index, mode)
        searched = search_job(dist, index, queries, folder / f"nb_{name}_{mode}")
        checked = data.check(folder / f"nb_{name}_{mode}", rows, dropped)
        found.append(
            {
                "update": name,
                "mode": mode,
                "diff_reads": job["diff_reads"],
                "rows": len(rows),
                "index_wall_s": job["wall_s"],
                "index_stages_s": job["stages"],
                "holds": job["count"],
                "exact_rows": job["count"] == len(rows),
                **checked,
                "search_s": searched["search_s"],
            }
        )
    found[0]["x_rebuild"] = found[0]["index_wall_s"] / found[1]["index_wall_s"]
    for part in appended:
        part.unlink()
    return found


def successive(dist, data: Catalog, folder: Path, queries: Path, steps: int = 10) -> list[dict]:
    """Ten 1% updates of the base, then a 1,000-query search against the same search on a fresh rebuild."""
    index = folder / "index_steps"
    shutil.rmtree(index, ignore_errors=True)
    shutil.copytree(folder / "index_base", index)
    rows, step = np.arange(data.base), data.base // 100
    walls = []
    for n in range(steps):
        rows = np.concatenate([rows[step // 2 :], np.arange(data.base + n * step, data.base + n * step + step)])
        data.write(folder / "table_steps", rows)
        walls.append(index_job(dist, folder / "table_steps", index, "incremental")["wall_s"])
    files = len(json.loads((index / "index.json").read_text())["files"])
    fresh_index = folder / "index_steps_fresh"
    index_job(dist, folder / "table_steps", fresh_index, "overwrite")
    updated, fresh = [], []
    for turn in range(3):  # side by side, each first in turn: this machine's speed drifts over a minute
        pair = [(index, "nb_steps", updated), (fresh_index, "nb_fresh", fresh)]
        for searched, out, times in pair if turn % 2 == 0 else pair[::-1]:
            times.append(search_job(dist, searched, queries, folder / out)["search_s"])
    return [
        {
            "update": f"{steps} successive 1% updates",
            "mode": "incremental",
            "rows": len(rows),
            "index_wall_s": float(np.median(walls)),
            "files": files,
            "search_s": float(np.median(updated)),
            "fresh_search_s": float(np.median(fresh)),
            "x_fresh_search": float(np.median(updated) / np.median(fresh)),
        }
    ]


OTHER_TOOLS = ", no fingerprints"  # a table another tool wrote: the update reads and fingerprints every vector
HEADERS = [
    "update",
    "mode",
    "diff_reads",
    "rows",
    "holds",
    "exact_rows",
    "index_wall_s",
    "x_rebuild",
    "recall",
    "dropped_returned",
    "search_s",
    "fresh_search_s",
    "x_fresh_search",
    "files",
]


COLUMNS = {
    "update": "how the table changed from the indexed base (rows added, dropped), or ten successive 1% updates "
    f"(half a percent dropped, one added each); '{OTHER_TOOLS.strip(', ')}': the table has no fingerprint column",
    "mode": "incremental: index --mode incremental of the base index; overwrite: a rebuild of the changed table",
    "diff_reads": "which rows the update compared: the appended files' (the table only grew: the added rows are a "
    "new file beside the base table's, as the embed job adds photos) or every row (the table was rewritten, as "
    "embed rewrites it when photos go)",
    "rows": "rows in the changed table",
    "holds": "rows the index holds afterwards (its summary's count); equal to rows is right",
    "exact_rows": "holds == rows",
    "index_wall_s": "seconds of the index job through spark-submit, JVM start included (successive: the median of "
    "the ten updates); lower is better",
    "x_rebuild": "index_wall_s / the rebuild's on the same table in the same run; lower is better",
    "recall": "recall@10 of the default search of 1,000 held-out queries against brute force over the table; "
    "higher is better",
    "dropped_returned": "dropped rows found among the answers; 0 is right",
    "search_s": "seconds of the search stage of that search (successive: median of 3); lower is better",
    "fresh_search_s": "the same search on a fresh rebuild of the table (median of 3, interleaved); lower is better",
    "x_fresh_search": "search_s / fresh_search_s: what ten updates cost later searches; lower is better",
    "files": "catalog files of the index after the ten updates",
}


def run_catalog(dist, kind: str, base: int, extra: int, quick: bool) -> list[dict]:
    data = Catalog(kind, base, extra, 1000)
    folder = DATA / f"update_{kind}_{base}"
    folder.mkdir(parents=True, exist_ok=True)
    queries = folder / "queries"
    write_embeddings(queries, data.queries, "q")
    data.write(folder / "table_base", np.arange(base))
    index_job(dist, folder / "table_base", folder / "index_base", "overwrite")
    tenth, rng = base // 10, np.random.default_rng(3)
    plans = {"+1%": np.arange(base + base // 100)}
    if not quick:
        kept = np.sort(rng.choice(base, base - 10_000, replace=False))
        mixed = np.concatenate([kept, np.arange(base, base + 50_000)])
        plans = {
            "+10%": np.arange(base + tenth),
            "+50%": np.arange(min(base + base // 2, base + extra)),
            "-10%": np.sort(rng.choice(base, base - tenth, replace=False)),
            "+50k -10k": mixed,
            f"+50k -10k{OTHER_TOOLS}": mixed,
        }
    rows = [r for name, chosen in plans.items() for r in scenario(dist, data, folder, name, chosen, queries)]
    return rows + ([] if quick else successive(dist, data, folder, queries))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--glove", type=int, default=250_000, help="the GloVe base (0: none)")
    parser.add_argument(
        "--clustered", type=int, default=0, help="also a clustered 512-d base of this size, updated by +1%%"
    )
    parser.add_argument("--name", default="index_update", help="the JSON's name under bench/results/")
    args = parser.parse_args()
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    dist = build_dist(DATA / "dist")
    rows = []
    if args.glove:
        rows += run_catalog(dist, "glove", args.glove, 400_000 - args.glove - 1000, quick=False)
        table = [[r.get(h, "-") if not isinstance(r.get(h), float) else round(r[h], 3) for h in HEADERS] for r in rows]
        print_table(f"GloVe {args.glove:,}: updates against rebuilds of the same table", HEADERS, table, COLUMNS)
    if args.clustered:
        found = run_catalog(dist, "clustered", args.clustered, args.clustered // 100, quick=True)
        table = [[r.get(h, "-") if not isinstance(r.get(h), float) else round(r[h], 3) for h in HEADERS] for r in found]
        print_table(f"clustered {args.clustered:,} x 512: +1% against a rebuild", HEADERS, table, COLUMNS)
        rows += found
    data = [data_of("glove", args.glove, 50)] if args.glove else []
    data += [data_of("clustered", args.clustered, 512)] if args.clustered else []
    write_json(args.name, {"parameters": vars(args), "data": data, "results": rows})


if __name__ == "__main__":
    main()

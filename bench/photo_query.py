"""One photo against a 100k-vector index: `search --images` next to the sum of its parts, in one run.

  python bench/photo_query.py [--catalog 100000] [--repeat 2]

The whole command is one spark-submit of `search --images photo.jpg`, JVM start included. Its parts,
each measured alone in the same run:
1. JVM + session start: a spark-submit that starts a session and stops it;
2. model load: a fresh Python that imports torch and builds the model from the checkpoint;
3. one image's embedding: in that same process, the photo decoded, preprocessed and embedded (first call);
4. the search itself: the search stage of `search --queries` with that one vector as a table.
Weights are random but torchvision-shaped ResNet-18 (speed does not depend on their values); the
catalog is the clustered 512-d generator, indexed once (kept with --reuse).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "tests")]

from common import described, print_table, write_json  # noqa: E402
from helpers import build_dist  # noqa: E402
from search import submit, write_embeddings  # noqa: E402

from scripts.vectors import clustered_unit_vectors  # noqa: E402

DATA = ROOT / "bench" / "data" / "photo_query"
SESSION_SCRIPT = "from pyspark.sql import SparkSession; SparkSession.builder.getOrCreate().stop()"
MODEL_SCRIPT = """
import sys, time, json
start = time.perf_counter()
import numpy as np
from jobs.weights import load_weights
from jobs.embed.network import eager_runner
from jobs.imaging import preprocess
weights = load_weights("resnet18", sys.argv[1])
run = eager_runner("resnet18", weights.data)
loaded = time.perf_counter()
crop, _, _ = preprocess(open(sys.argv[2], "rb").read())
vector = run(crop[np.newaxis])
print(json.dumps({"model_load_s": loaded - start, "one_image_s": time.perf_counter() - loaded}))
"""


COLUMNS = {
    "what": "the whole command, or one of its parts measured alone in the same run",
    "seconds": "best of --repeat runs; lower is better (the ratio: whole / sum of parts, lower is better)",
}


def data_description(catalog: int) -> dict:
    return described(
        "synthetic unit vectors around random centres, 100 a centre, noise 0.6, with sha1 ids and long s3:// paths; "
        "the query: one synthetic photo-like JPEG",
        catalog,
        512,
        2048 + 40 + 100,
        "scripts/vectors.py clustered_unit_vectors, seed 5; scripts/sample_data.py synthetic_photos, seed 3",
    )


def make_inputs(folder: Path, catalog: int) -> tuple[Path, Path]:
    """The checkpoint (random ResNet-18) and the one photo."""
    import torch

    from jobs.backbones import build_backbone
    from scripts.sample_data import synthetic_photos

    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / "resnet18-random.pth"
    if not weights.exists():
        torch.save(build_backbone("resnet18").state_dict(), weights)
    photo = synthetic_photos(folder / "photo", 1, seed=3)[0]
    return weights, photo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--catalog", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=2, help="runs of each; the best is kept")
    parser.add_argument("--reuse", action="store_true", help="keep the catalog and index of an earlier run")
    args = parser.parse_args()
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    folder = DATA / str(args.catalog)
    weights, photo = make_inputs(folder, args.catalog)
    sha256 = hashlib.sha256(weights.read_bytes()).hexdigest()
    dist = build_dist(DATA / "dist")
    if not (args.reuse and (folder / "index" / "index.json").exists()):
        vectors, _ = clustered_unit_vectors(args.catalog, noise=0.6, seed=5)
        write_embeddings(folder / "emb", vectors, "c")
        (folder / "emb" / "_summary.json").write_text(
            json.dumps({"weights": {"source": str(weights), "sha256": sha256}})
        )
        submit(dist, ["index", "--embeddings", folder / "emb", "--output", folder / "index"], "4g")
    write_embeddings(folder / "q1", clustered_unit_vectors(1, noise=0.6, seed=6)[0], "q")
    session_py = DATA / "session.py"
    session_py.write_text(SESSION_SCRIPT)

    best: dict[str, float] = {}

    def keep(name: str, seconds: float) -> None:
        best[name] = min(best.get(name, float("inf")), seconds)

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for _ in range(args.repeat):
        keep(
            "whole: search --images (wall)",
            submit(
                dist,
                ["search", "--index", folder / "index", "--images", photo, "--output", folder / "nb_photo", "-k", "10"],
                "1g",
            )["wall_s"],
        )
        keep("1. JVM + session start", submit((dist[0], session_py), [], "1g")["wall_s"])
        model = json.loads(
            subprocess.run(
                [sys.executable, "-c", MODEL_SCRIPT, str(weights), str(photo)],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            ).stdout.splitlines()[-1]
        )
        keep("2. model load (import torch, build, load weights)", model["model_load_s"])
        keep("3. one image's embedding (decode, preprocess, forward)", model["one_image_s"])
        submit(
            dist,
            [
                "search",
                "--index",
                folder / "index",
                "--queries",
                folder / "q1",
                "--output",
                folder / "nb_vector",
                "-k",
                "10",
            ],
            "1g",
        )
        keep(
            "4. the search itself (search stage, one vector)",
            json.loads((folder / "nb_vector" / "_summary.json").read_text())["seconds"]["search"],
        )
    parts = sum(v for k, v in best.items() if not k.startswith("whole"))
    whole = best["whole: search --images (wall)"]
    rows = [[k, round(v, 2)] for k, v in best.items()] + [
        ["sum of parts 1-4", round(parts, 2)],
        ["ratio whole / sum of parts (target <= 1.5)", round(whole / parts, 3)],
    ]
    print_table(
        f"one photo against a {args.catalog}-vector index, local[2], best of {args.repeat}",
        ["what", "seconds"],
        rows,
        COLUMNS,
    )
    write_json(
        f"photo_query_{args.catalog}",
        {
            "parameters": vars(args),
            "data": data_description(args.catalog),
            "seconds": best,
            "sum_of_parts_s": parts,
            "ratio": whole / parts,
            "measured_at": time.strftime("%H:%M:%S"),
        },
    )


if __name__ == "__main__":
    main()

"""Embedding throughput, side by side in one run: model-only ceiling, the seed's way, and our job.

  python bench/embed.py [--images 320] [--small 80] [--batch-size 32]

1. model-only: ResNet-18 forward passes on pre-made tensors (fp32, bf16), batch 32, channels_last,
   inference mode, all cores: the ceiling.
2. the seed's way: one image at a time, no batching, no inference mode, squashing resize to 224x224.
3. our embed job through `spark-submit --master local[2]` of the built zip (fp32, bf16). Steady-state
   throughput is marginal: (N - n) / (t(N) - t(n)) over two runs of different sizes, so JVM start,
   Python worker start and model loading cancel out; JVM start is reported separately.
Weights are random but torchvision-shaped (speed does not depend on their values).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "tests")]

from common import print_table, write_json  # noqa: E402
from helpers import build_dist, spark_submit  # noqa: E402

from jobs.backbones import build_backbone  # noqa: E402
from jobs.imaging import preprocess, to_batch  # noqa: E402
from scripts.sample_data import synthetic_photos  # noqa: E402

DATA = ROOT / "bench" / "data"


def model_only(precision: str, batch_size: int, seconds: float = 12.0) -> float:
    net = build_backbone("resnet18").to(memory_format=torch.channels_last)
    batch = torch.randn(batch_size, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    done, start = 0, None
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
        net.embed(batch)  # warm-up
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            net.embed(batch)
            done += batch_size
    return done / (time.perf_counter() - start)


def seed_way(paths: list[Path], limit: int = 60) -> float:
    """The notebook's loop: open, squash to 224x224, normalise, forward one image with autograd on."""
    net = build_backbone("resnet18")
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    start = time.perf_counter()
    for path in paths[:limit]:
        img = Image.open(path).convert("RGB").resize((224, 224))
        tensor = (torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1) - mean) / std
        net.embed(tensor.unsqueeze(0)).detach().numpy()
    return min(limit, len(paths)) / (time.perf_counter() - start)


def decode_only(paths: list[Path], limit: int = 100) -> float:
    start = time.perf_counter()
    crops = [preprocess(p.read_bytes())[0] for p in paths[:limit]]
    to_batch(crops)
    return len(crops) / (time.perf_counter() - start)


def job_run(dist, folder: Path, out: Path, weights: Path, precision: str, batch_size: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    result = spark_submit(dist, ["embed", "--input", folder, "--output", out, "--model", "resnet18", "--weights", weights,
                                 "--precision", precision, "--batch-size", batch_size, "--mode", "overwrite", "--log-every", "0"],
                          conf={"spark.python.worker.reuse": "true"})
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(result.stdout[-3000:] + result.stderr[-3000:])
    summary = json.loads((out / "_summary.json").read_text())
    rss = [float(m) for m in re.findall(r"peak RSS (\d+) MB", result.stdout + result.stderr)]
    return {"wall_s": wall, "embed_s": summary["seconds"]["embed"], "embedded": summary["counts"]["embedded"], "peak_rss_mb": max(rss, default=None)}


def jvm_start(dist) -> float:
    start = time.perf_counter()
    spark_submit(dist, ["embed", "--help"])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=320)
    parser.add_argument("--small", type=int, default=80)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(2)
    big, small = DATA / f"photos_{args.images}", DATA / f"photos_{args.small}"
    if not big.exists():
        synthetic_photos(big, args.images, seed=0)
    if not small.exists():
        small.mkdir(parents=True)
        for p in sorted(big.glob("*.jpg"))[: args.small]:
            shutil.copy(p, small / p.name)
    weights = DATA / "resnet18-bench.pth"
    torch.save(build_backbone("resnet18").state_dict(), weights)
    dist = build_dist(DATA / "dist")
    paths = sorted(big.glob("*.jpg"))

    results: dict[str, float | dict] = {}
    results["model_only_fp32"] = model_only("fp32", args.batch_size)
    results["model_only_bf16"] = model_only("bf16", args.batch_size)
    results["seed_way"] = seed_way(paths)
    results["decode_preprocess_one_core"] = decode_only(paths)
    results["jvm_start_s"] = jvm_start(dist)
    jobs = {}
    for precision in ("fp32", "bf16"):
        runs = {n: job_run(dist, folder, DATA / f"out_{precision}_{n}", weights, precision, args.batch_size) for n, folder in ((args.small, small), (args.images, big))}
        marginal = (args.images - args.small) / (runs[args.images]["embed_s"] - runs[args.small]["embed_s"])
        jobs[precision] = {"runs": runs, "steady_images_per_s": marginal, "end_to_end_images_per_s": args.images / runs[args.images]["wall_s"]}
    results["job"] = jobs

    rows = []
    for name, rate, ceiling in (
        ("model-only fp32 (ceiling)", results["model_only_fp32"], results["model_only_fp32"]),
        ("model-only bf16 (ceiling)", results["model_only_bf16"], results["model_only_bf16"]),
        ("seed's way (1 image, autograd, squash)", results["seed_way"], results["model_only_fp32"]),
        ("job fp32, steady state", jobs["fp32"]["steady_images_per_s"], results["model_only_fp32"]),
        ("job bf16, steady state", jobs["bf16"]["steady_images_per_s"], results["model_only_bf16"]),
        (f"job fp32, end to end incl. JVM ({args.images} images)", jobs["fp32"]["end_to_end_images_per_s"], results["model_only_fp32"]),
    ):
        rows.append([name, rate, rate / ceiling, rate / results["seed_way"]])
    print_table("ResNet-18 embedding throughput (images/s), ratios measured in this run", ["what", "images/s", "x ceiling", "x seed"], rows)
    print(f"\ndecode+preprocess alone, one core: {results['decode_preprocess_one_core']:.1f} images/s;"
          f" JVM + spark-submit start: {results['jvm_start_s']:.1f} s;"
          f" peak worker RSS: {max(r['peak_rss_mb'] or 0 for j in jobs.values() for r in j['runs'].values()):.0f} MB")
    write_json("embed", {"parameters": vars(args), "results": results})


if __name__ == "__main__":
    main()

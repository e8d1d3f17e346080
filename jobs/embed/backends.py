"""embed, on the driver: the backend (runtime x precision) the executors run, chosen by timing each candidate on the
job's first photos and keeping the fastest that gives fp32's vectors."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from jobs.embed import cache as measured
from jobs.embed.network import device, eager_runner, export_onnx
from jobs.embed.runtimes import PRECISIONS, Backend, Runner, load, native_bf16
from jobs.errors import UsageError
from jobs.runlog import get_logger
from jobs.weights import Weights

log = get_logger("jobs.embed")

FIDELITY = {"fp32": 0.9999, "bf16": 0.99}  # least cosine to eager fp32 a candidate may give on the job's crops
AUTO_MIN_IMAGES = 500  # below this, timing the candidates costs more than the fastest one saves: take PREFERRED
TIMED_RUNS = 2  # runs of one batch per candidate, after a first run that also checks its vectors
TIMED_BATCH = 8
# what a job too small to time takes (the first that passes the fidelity check): bf16 where native, then fp32; ONNX
# Runtime before OpenVINO in fp32 (MobileNetV2 1.09x, ResNet-18 1.0x, bench/embed.py)
PREFERENCE = (
    ("openvino", "bf16"),
    ("eager", "bf16"),
    ("onnxruntime", "fp32"),
    ("openvino", "fp32"),
    ("eager", "fp32"),
)


def candidates(runtime: str, precision: str) -> list[Backend]:
    """What --backend and --precision leave to choose from, in PREFERENCE order; auto precision leaves out bf16 where
    the CPU only emulates it, and auto leaves out eager fp32 (never ahead of ONNX Runtime fp32)."""
    found = [
        Backend(r, p)
        for r, p in PREFERENCE
        if runtime in ("auto", r)
        and precision in ("auto", p)
        and not (precision == "auto" and p == "bf16" and not native_bf16())
        and not (runtime == precision == "auto" and (r, p) == ("eager", "fp32"))
    ]
    if not found:
        raise UsageError(f"--backend {runtime} has no {precision} ({', '.join(PRECISIONS.get(runtime, ()))} only)")
    return found


@dataclass
class Choice:
    """The backend the executors run, and what the driver saw: images/s per candidate (one thread), or why not."""

    backend: Backend
    how: str  # measured, remembered from an earlier run on this machine, or preferred (too few images to time)
    seen: dict[str, str] = field(default_factory=dict)

    def line(self) -> str:
        return f"{self.backend.name} ({self.how}: {', '.join(f'{k} {v}' for k, v in self.seen.items())})"


def _rate(run: Runner, crops: np.ndarray) -> float:
    batch = np.ascontiguousarray(crops[:TIMED_BATCH])
    best = float("inf")
    for _ in range(TIMED_RUNS):
        started = time.perf_counter()
        run(batch)
        best = min(best, time.perf_counter() - started)
    return len(batch) / best


def choose_backend(
    runtime: str,
    precision: str,
    model: str,
    weights: Weights,
    crops: Callable[[], np.ndarray],
    images: int,
    threads: int = 1,
) -> Choice:
    """The fastest candidate whose vectors on crops() (the job's first photos and the probe) are eager fp32's to
    FIDELITY; timed with the executors' threads per task. Fewer than AUTO_MIN_IMAGES images, or a choice already
    timed on this machine, skip the timing."""
    if device().type == "cuda":
        chosen = "bf16" if precision != "fp32" and native_bf16() else "fp32"
        return Choice(Backend("eager", chosen), "CUDA: eager only")
    options = candidates(runtime, precision)
    key = measured.key(model, weights.sha256, [b.name for b in options], threads)
    remembered = measured.recall(key)
    timing = remembered is None and len(options) > 1 and images >= AUTO_MIN_IMAGES
    checked = crops()
    torch_threads = torch.get_num_threads()
    reference = eager_runner(model, weights.data)(checked)
    onnx = measured.onnx(model, weights.sha256, lambda: export_onnx(model, weights.data))
    order = sorted(options, key=lambda b: -remembered.get(b.name, 0.0)) if remembered else options
    seen: dict[str, str] = {}
    rates: dict[str, float] = {}
    try:
        for option in order:
            # eager carries the export too: an executor without torch runs it on OpenVINO, in one line
            backend = Backend(option.runtime, option.precision, onnx)
            try:
                run = load(backend, threads, lambda: weights.data, model)
                cosine = float((run(checked) * reference).sum(axis=1).min())
            except Exception as e:  # not installed, or cannot run here: the next one will do
                seen[backend.name] = f"unavailable ({type(e).__name__})"
                log.warning("backend %s unavailable: %s", backend.name, f"{type(e).__name__}: {e}"[:200])
                continue
            if cosine < FIDELITY[backend.precision]:
                seen[backend.name] = f"cosine {cosine:.4f} < {FIDELITY[backend.precision]}"
                continue
            if not timing:
                how = "remembered" if remembered else "preferred" if len(options) > 1 else "requested"
                seen[backend.name] = f"cosine {cosine:.4f}"
                return Choice(backend, how, seen)
            rates[backend.name] = _rate(run, checked)
            seen[backend.name] = f"{rates[backend.name]:.1f} img/s"
    finally:
        torch.set_num_threads(torch_threads)
    if not rates:
        raise RuntimeError(f"no backend gives fp32's vectors on this machine: {seen}")
    measured.remember(key, rates)
    best = max(rates, key=rates.__getitem__)
    winner = next(b for b in options if b.name == best)
    return Choice(Backend(winner.runtime, winner.precision, onnx), "measured", seen)

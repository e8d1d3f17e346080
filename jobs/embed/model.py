"""embed, stage 2 (executors): decode each Arrow batch, run it through the chosen backend, L2-normalise."""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from jobs.embed.plan import EMBEDDINGS_COLUMNS, EMBEDDINGS_SCHEMA
from jobs.imaging import CROP, ImageError, normalize, preprocess
from jobs.runlog import get_logger
from jobs.weights import Weights, build_model

log = get_logger("jobs.embed")

# what the executors return; modification time travels as microseconds so no timezone can shift it
_EMBEDDED_SCHEMA = T.StructType(
    [f for f in EMBEDDINGS_SCHEMA.fields if f.name not in ("modification_time", "weights_sha256")]
    + [T.StructField("modification_us", T.LongType(), False)]
)
BACKENDS = ("onnxruntime", "torchscript", "eager")
# auto tries these in order; each must be importable and faithful (FIDELITY) on the driver's probe.
# Measured model-only on one core (bench/README.md): ONNX Runtime leads on both models.
AUTO_ORDER = ("onnxruntime", "torchscript", "eager")
# the driver's export and probe cost ~3 s on 2 AVX2 cores; ONNX Runtime saves ~7 ms per image there (bench/embed.py)
AUTO_MIN_IMAGES = 500
FIDELITY = 0.9999  # least cosine to eager a backend may give on the probe batch
Runner = Callable[[np.ndarray], np.ndarray]  # NHWC uint8 crops -> L2-normalised float32 vectors


@dataclass(frozen=True)
class EmbedConfig:
    """What every executor needs to embed: serialisable, small; weights and backend travel in broadcasts."""

    model: str
    precision: str
    batch_size: int
    max_pixels: int
    log_every: int
    backend: str = "eager"


@dataclass(frozen=True)
class Backend:
    """The backend chosen on the driver, and what the executors load: an ONNX model or saved TorchScript."""

    name: str
    artifact: bytes | None = None


class EmbeddingNet(torch.nn.Module):
    """Crops (NHWC uint8) to L2-normalised vectors: normalisation inside, so every backend runs all of it."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(self.net.embed(normalize(crops)).float(), dim=1)


def supports_bf16() -> bool:
    """True on CUDA GPUs with bf16 and CPUs with AVX512-BF16 or AMX (where autocast pays off)."""
    if torch.cuda.is_available():
        return bool(torch.cuda.is_bf16_supported())
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_precision(precision: str) -> str:
    """auto is fp32: bf16 autocast failed the fidelity bar (cosine >= 0.999 to fp32) in bench/bf16_fidelity.py."""
    if precision == "bf16" and not supports_bf16():
        log.warning("bf16 requested on a device without native bf16: it is emulated and much slower than fp32")
    return "fp32" if precision == "auto" else precision


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def eager_runner(model: str, weights: bytes, precision: str = "fp32") -> Runner:
    device = _device()
    net = EmbeddingNet(build_model(model, weights)).to(device).to(memory_format=torch.channels_last).eval()

    def run(crops: np.ndarray) -> np.ndarray:
        with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16"):
            return net(torch.from_numpy(crops).to(device, non_blocking=True)).cpu().numpy()

    return run


def _probe(n: int = 2) -> np.ndarray:
    """Deterministic photo-like crops (smooth colour fields plus grain) for the driver's fidelity check."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:CROP, 0:CROP] / CROP
    fields = [np.stack([np.sin(6 * xx + k) , np.cos(5 * yy - k), np.sin(4 * (xx + yy) + 2 * k)], -1) for k in range(n)]
    return np.clip(np.stack(fields) * 90 + 128 + rng.normal(0, 12, (n, CROP, CROP, 3)), 0, 255).astype(np.uint8)


def export(name: str, model: str, weights: bytes) -> bytes:
    """The backend's artifact, built once on the driver: what the executors load is what was checked."""
    net = EmbeddingNet(build_model(model, weights)).to(memory_format=torch.channels_last).eval()
    example = torch.from_numpy(_probe())
    buffer = io.BytesIO()
    if name == "torchscript":
        with torch.inference_mode():
            torch.jit.save(torch.jit.freeze(torch.jit.trace(net, example, check_trace=False)), buffer)
    elif name == "onnxruntime":
        import onnxruntime  # noqa: F401 - fail here, before exporting, where it is not installed

        torch.onnx.export(net, (example,), buffer, dynamo=False, input_names=["crops"], output_names=["vectors"],
                          dynamic_axes={"crops": {0: "batch"}, "vectors": {0: "batch"}}, opset_version=17)
    else:
        raise ValueError(f"unknown backend {name}")
    return buffer.getvalue()


def load_runner(backend: Backend, threads: int) -> Runner:
    """A runner for an exported backend, using this many threads."""
    if backend.name == "torchscript":
        net = torch.jit.load(io.BytesIO(backend.artifact or b""), map_location="cpu")

        def run_script(crops: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return net(torch.from_numpy(crops)).numpy()

        return run_script
    if backend.name == "onnxruntime":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        session = ort.InferenceSession(backend.artifact or b"", options, providers=["CPUExecutionProvider"])
        return lambda crops: session.run(None, {"crops": crops})[0]
    raise ValueError(f"unknown backend {backend.name}")


_chosen: dict[tuple[str, str, str, str], Backend] = {}


def choose_backend(requested: str, model: str, weights: Weights, precision: str, images: int | None = None) -> Backend:
    """On the driver: the first backend of `requested` (or auto's order) that loads and matches eager on the probe.

    auto runs eager for fewer than AUTO_MIN_IMAGES images, where exporting costs more than it saves.
    Remembered per driver process: jobs run in one session (tests, notebooks) export once.
    """
    if requested == "auto" and images is not None and images < AUTO_MIN_IMAGES:
        log.info("auto backend: eager for %d image(s) (exporting pays off from %d)", images, AUTO_MIN_IMAGES)
        return Backend("eager")
    key = (requested, model, weights.sha256, precision)
    if key not in _chosen:
        _chosen[key] = pick_backend(requested, model, weights.data, precision)
    return _chosen[key]


def pick_backend(requested: str, model: str, weights: bytes, precision: str) -> Backend:
    """choose_backend without the memory."""
    if precision == "bf16" or _device().type == "cuda":
        if requested not in ("auto", "eager"):
            log.warning("backend %s runs fp32 on CPU only; using eager for %s on %s", requested, precision, _device().type)
        return Backend("eager")
    candidates = AUTO_ORDER if requested == "auto" else (requested,)
    if candidates[0] == "eager":
        return Backend("eager")
    probe = _probe()
    reference = eager_runner(model, weights)(probe)
    for name in candidates:
        if name == "eager":
            return Backend("eager")
        try:
            backend = Backend(name, export(name, model, weights))
            cosine = float((load_runner(backend, torch.get_num_threads())(probe) * reference).sum(axis=1).min())
        except Exception as e:  # not installed, or export failed: the next one will do
            log.warning("backend %s unavailable (%s); falling back", name, f"{type(e).__name__}: {e}"[:200])
            continue
        if cosine >= FIDELITY:
            return backend
        log.warning("backend %s gave cosine %.6f to eager on the probe (< %g); falling back", name, cosine, FIDELITY)
    return Backend("eager")


def runner_for(config: EmbedConfig, backend: Backend, weights: Callable[[], bytes], threads: int) -> Runner:
    """The driver's chosen backend, or eager (one log line) where it cannot load in this Python."""
    if config.backend != "eager":
        try:
            return load_runner(backend, threads)
        except Exception as e:  # e.g. onnxruntime missing from this executor's Python
            log.warning("backend %s unavailable on this executor (%s); using eager", config.backend, f"{type(e).__name__}: {e}"[:200])
    return eager_runner(config.model, weights(), config.precision)


class Embedder:
    """One runner per Python worker process, reused by every task and batch that process runs."""

    _cache: dict[tuple[str, str, str, str, int], Runner] = {}

    @classmethod
    def get(cls, config: EmbedConfig, sha256: str, weights: Any, backend: Any) -> Runner:
        threads = torch.get_num_threads()
        key = (config.model, sha256, config.precision, config.backend, threads)
        if key not in cls._cache:
            # broadcasts load on first .value: the weights only when eager runs
            cls._cache[key] = runner_for(config, backend.value, lambda: weights.value, threads)
        return cls._cache[key]


def _set_torch_threads() -> None:
    from pyspark import TaskContext

    context = TaskContext.get()
    threads = max(1, context.cpus() if context is not None else 1)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)  # one thread per task core: two tasks never fight over a core


def embed_partition(batches: Iterator[pd.DataFrame], config: EmbedConfig, sha256: str, weights: Any, backend: Any) -> Iterator[pd.DataFrame]:
    """Executor side: decode, preprocess and embed each Arrow batch; a bad file becomes an error row."""
    _set_torch_threads()
    embed = Embedder.get(config, sha256, weights, backend)
    task_log = get_logger("jobs.embed.task")
    started, images, n_batches = time.perf_counter(), 0, 0
    crops = np.empty((config.batch_size, CROP, CROP, 3), dtype=np.uint8)  # decoded straight into one buffer
    for batch in batches:
        n = len(batch)
        if n > len(crops):
            crops = np.empty((n, CROP, CROP, 3), dtype=np.uint8)
        ok_rows: list[int] = []
        widths, heights, errors = [None] * n, [None] * n, [None] * n
        boxes = batch[["x1", "y1", "x2", "y2"]].to_numpy()
        for i, content in enumerate(batch["content"]):
            box = None if pd.isna(boxes[i, 0]) else tuple(float(v) for v in boxes[i])
            try:
                crops[len(ok_rows)], widths[i], heights[i] = preprocess(content, box, config.max_pixels)
            except ImageError as e:
                errors[i] = str(e)
                continue
            except Exception as e:  # never let one odd file kill the task
                errors[i] = f"{type(e).__name__}: {e}"[:200]
                continue
            ok_rows.append(i)
        vectors: list[Any] = [None] * n
        if ok_rows:
            for i, vector in zip(ok_rows, embed(crops[: len(ok_rows)])):
                vectors[i] = vector
        images += n
        n_batches += 1
        if config.log_every and n_batches % config.log_every == 0:
            task_log.info("task %s: %d images, %.1f images/s", _task_id(), images, images / (time.perf_counter() - started))
        yield _rows(batch, widths, heights, vectors, errors, config.model)
    if images:
        rate = images / (time.perf_counter() - started)
        task_log.info("task %s done: %d images, %.1f images/s, backend %s, peak RSS %.0f MB", _task_id(), images, rate, config.backend, _peak_rss_mb())


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rows(batch: pd.DataFrame, widths: list, heights: list, vectors: list, errors: list, model: str) -> pd.DataFrame:
    """One output frame in the executors' schema."""
    return pd.DataFrame({
        "image_id": batch["image_id"],
        "path": batch["path"],
        "label": batch["label"],
        "width": pd.array(widths, dtype="Int32"),
        "height": pd.array(heights, dtype="Int32"),
        "model": model,
        "embedding": vectors,
        "error": errors,
        "length": batch["length"],
        "modification_us": batch["modification_us"],
    })


def _task_id() -> str:
    from pyspark import TaskContext

    context = TaskContext.get()
    return f"{context.stageId()}.{context.partitionId()}" if context else "-"


def embed_images(files: DataFrame, config: EmbedConfig, sha256: str, weights: Any, backend: Any) -> DataFrame:
    """Files (path, content, plan columns) to rows of the embeddings contract; weights and backend are broadcasts."""
    with_ids = files.withColumn("image_id", F.sha1(F.col("path")))
    embedded = with_ids.mapInPandas(lambda it: embed_partition(it, config, sha256, weights, backend), _EMBEDDED_SCHEMA)
    return (embedded.withColumn("modification_time", F.timestamp_micros("modification_us"))
            .withColumn("weights_sha256", F.lit(sha256)).select(EMBEDDINGS_COLUMNS))

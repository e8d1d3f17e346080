"""embed, how the model runs: eager PyTorch, TorchScript or ONNX Runtime, chosen once on the driver by fidelity to
eager."""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from jobs.imaging import CROP, normalize
from jobs.runlog import get_logger
from jobs.weights import Weights, build_model

log = get_logger("jobs.embed")

BACKENDS = ("onnxruntime", "torchscript", "eager")
# auto tries these in order; each must be importable and faithful (FIDELITY) on the driver's probe.
# Measured model-only on one core (bench/README.md): ONNX Runtime leads on both models.
AUTO_ORDER = ("onnxruntime", "torchscript", "eager")
# the driver's export and probe cost ~3 s on 2 AVX2 cores; ONNX Runtime saves ~7 ms per image there (bench/embed.py)
AUTO_MIN_IMAGES = 500
FIDELITY = 0.9999  # least cosine to eager a backend may give on the probe batch
BF16_FIDELITY = 0.99  # least cosine to fp32 that bf16 must give on the driver's crops for auto to choose it
Runner = Callable[[np.ndarray], np.ndarray]  # NHWC uint8 crops -> L2-normalised float32 vectors


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


def fold_batchnorm(net: torch.nn.Module) -> torch.nn.Module:
    """The net with every BatchNorm folded into the convolution before it: the same function in fp32 (to 1e-7), and in
    bf16 far closer to fp32 than BatchNorm run in bf16 (MobileNetV2 on real photos: cosine min 0.995 against 0.967)."""
    from torch.fx.experimental.optimization import fuse

    return fuse(net.eval())


def bf16_fidelity(model: str, weights: bytes, crops: np.ndarray) -> float:
    """The least cosine between bf16 and fp32 vectors of these crops."""
    return float((eager_runner(model, weights, "bf16")(crops) * eager_runner(model, weights)(crops)).sum(axis=1).min())


def resolve_precision(requested: str, model: str, weights: bytes, crops: Callable[[], np.ndarray]) -> str:
    """fp32 or bf16. auto is bf16 where the CPU computes it natively and bf16 gives fp32's vectors on crops() (the
    job's first photos and the probe) to cosine BF16_FIDELITY; fp32 elsewhere, with one line saying why."""
    native = supports_bf16()
    if requested == "bf16" and not native:
        log.warning("bf16 requested on a device without native bf16: it is emulated and much slower than fp32")
    if requested != "auto":
        return requested
    if not native:
        log.info("precision auto: fp32 (this CPU has no native bf16)")
        return "fp32"
    checked = crops()
    cosine = bf16_fidelity(model, weights, checked)
    if cosine < BF16_FIDELITY:
        log.warning(
            "precision auto: fp32 (bf16 gave cosine %.4f to fp32 on %d crops, < %g)",
            cosine,
            len(checked),
            BF16_FIDELITY,
        )
        return "fp32"
    log.info("precision auto: bf16, native on this CPU (cosine %.4f to fp32 on %d crops)", cosine, len(checked))
    return "bf16"


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def eager_runner(model: str, weights: bytes, precision: str = "fp32") -> Runner:
    """PyTorch as written; bf16 autocast with BatchNorm folded (fp32 stays exactly the model as trained)."""
    device = _device()
    net = EmbeddingNet(build_model(model, weights)).eval()
    net = (fold_batchnorm(net) if precision == "bf16" else net).to(device).to(memory_format=torch.channels_last)

    def run(crops: np.ndarray) -> np.ndarray:
        with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16"):
            return net(torch.from_numpy(crops).to(device, non_blocking=True)).cpu().numpy()

    return run


def probe_crops(n: int = 2) -> np.ndarray:
    """Deterministic photo-like crops (smooth colour fields plus grain) for the driver's fidelity check."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:CROP, 0:CROP] / CROP
    fields = [np.stack([np.sin(6 * xx + k), np.cos(5 * yy - k), np.sin(4 * (xx + yy) + 2 * k)], -1) for k in range(n)]
    return np.clip(np.stack(fields) * 90 + 128 + rng.normal(0, 12, (n, CROP, CROP, 3)), 0, 255).astype(np.uint8)


def export(name: str, model: str, weights: bytes) -> bytes:
    """The backend's artifact, built once on the driver: what the executors load is what was checked."""
    net = EmbeddingNet(build_model(model, weights)).to(memory_format=torch.channels_last).eval()
    example = torch.from_numpy(probe_crops())
    buffer = io.BytesIO()
    if name == "torchscript":
        with torch.inference_mode():
            torch.jit.save(torch.jit.freeze(torch.jit.trace(net, example, check_trace=False)), buffer)
    elif name == "onnxruntime":
        import onnxruntime  # noqa: F401 - fail here, before exporting, where it is not installed

        torch.onnx.export(
            net,
            (example,),
            buffer,
            dynamo=False,
            input_names=["crops"],
            output_names=["vectors"],
            dynamic_axes={"crops": {0: "batch"}, "vectors": {0: "batch"}},
            opset_version=17,
        )
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
            log.warning(
                "backend %s runs fp32 on CPU only; using eager for %s on %s", requested, precision, _device().type
            )
        return Backend("eager")
    candidates = AUTO_ORDER if requested == "auto" else (requested,)
    if candidates[0] == "eager":
        return Backend("eager")
    probe = probe_crops()
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

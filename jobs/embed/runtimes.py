"""embed, what the executors load: the driver's exported ONNX model on OpenVINO or ONNX Runtime (no torch needed), or
eager PyTorch where torch is installed; one line and the next runtime where the chosen one cannot run here."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from jobs.errors import UsageError
from jobs.runlog import get_logger

log = get_logger("jobs.embed")

RUNTIMES = ("openvino", "onnxruntime", "eager")
PRECISIONS = {"openvino": ("fp32", "bf16"), "onnxruntime": ("fp32",), "eager": ("fp32", "bf16")}
Runner = Callable[[np.ndarray], np.ndarray]  # NHWC uint8 crops -> L2-normalised float32 vectors


@dataclass(frozen=True)
class Backend:
    """How the executors run the model: a runtime at a precision, and the ONNX model the exported runtimes load."""

    runtime: str
    precision: str = "fp32"
    onnx: bytes | None = None

    @property
    def name(self) -> str:
        return f"{self.runtime} {self.precision}"

    def __repr__(self) -> str:  # the ONNX bytes would fill a log line
        return f"Backend({self.name})"


@functools.cache
def cpu() -> tuple[str, frozenset[str]]:
    """This CPU's model name and flags, from /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = dict(
                (key.strip(), value.strip()) for key, value in (line.split(":", 1) for line in f if ":" in line)
            )
    except OSError:
        return "", frozenset()
    return lines.get("model name", ""), frozenset(lines.get("flags", "").split())


def native_bf16() -> bool:
    """True on CPUs with AVX512-BF16 or AMX, and on CUDA GPUs with bf16 where torch is already loaded."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        return bool(torch.cuda.is_bf16_supported())
    return bool(cpu()[1] & {"avx512_bf16", "amx_bf16"})


def load_exported(backend: Backend, threads: int) -> Runner:
    """A runner for the ONNX model on OpenVINO or ONNX Runtime, with this many threads; raises where it cannot load."""
    if backend.onnx is None:
        raise ValueError(f"{backend.name} needs the driver's ONNX export")
    if backend.runtime == "openvino":
        import openvino as ov

        core = ov.Core()
        compiled = core.compile_model(
            core.read_model(backend.onnx),
            "CPU",
            {
                "INFERENCE_PRECISION_HINT": "bf16" if backend.precision == "bf16" else "f32",
                "INFERENCE_NUM_THREADS": threads,
                "NUM_STREAMS": 1,
                "PERFORMANCE_HINT": "LATENCY",
                # pinned, every task's thread would sit on the first core: two tasks ran at half speed (bench/embed.py)
                "ENABLE_CPU_PINNING": False,
            },
        )
        request = compiled.create_infer_request()
        return lambda crops: np.array(request.infer({0: crops})[0], dtype=np.float32)
    if backend.runtime == "onnxruntime":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        session = ort.InferenceSession(backend.onnx, options, providers=["CPUExecutionProvider"])
        return lambda crops: session.run(None, {"crops": crops})[0]
    raise ValueError(f"{backend.runtime} does not run an exported model")


def load(backend: Backend, threads: int, weights: Callable[[], bytes], model: str) -> Runner:
    """A runner for this backend with this many threads: eager builds the model from the weights (torch needed)."""
    if backend.runtime == "eager":
        from jobs.embed.network import eager_runner  # needs torch: only where it is installed

        return eager_runner(model, weights(), backend.precision, threads)
    return load_exported(backend, threads)


def fallbacks(backend: Backend) -> list[Backend]:
    """What an executor tries, in order: the chosen backend at a precision this CPU runs natively, then the other
    exported runtime, then eager (which needs torch and the weights)."""
    precision = backend.precision if backend.precision == "fp32" or native_bf16() else "fp32"
    chosen = replace(backend, precision=precision)
    others = [
        Backend(runtime, precision if precision in PRECISIONS[runtime] else "fp32", backend.onnx)
        for runtime in RUNTIMES
        if runtime != backend.runtime and (runtime == "eager" or backend.onnx is not None)
    ]
    return [chosen, *others]


def load_on_executor(backend: Backend, threads: int, weights: Callable[[], bytes], model: str) -> tuple[Runner, str]:
    """The first of fallbacks(backend) that loads in this Python, with its name; one warning line for each step down."""
    tried: list[str] = []
    for candidate in fallbacks(backend):
        try:
            runner = load(candidate, threads, weights, model)
        except Exception as e:  # a runtime missing from this Python, or a CPU it cannot run on
            tried.append(f"{candidate.name}: {type(e).__name__}: {e}"[:160])
            continue
        if candidate != backend:
            log.warning(
                "backend %s chosen on the driver; this executor runs %s (%s)",
                backend.name,
                candidate.name,
                "; ".join(tried) or "no native bf16 here",
            )
        return runner, candidate.name
    raise UsageError(  # raised in a task: the driver shows it as one line, exit 2
        f"no runtime can run the model on this executor ({'; '.join(tried)}): pack the executors' environment with "
        "`make pack-env` (OpenVINO and ONNX Runtime), or with torch for --backend eager"
    )

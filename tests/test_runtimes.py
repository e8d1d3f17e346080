"""Runtimes: OpenVINO and ONNX Runtime give eager's vectors (bf16: fp32's neighbours, on real photos and weights), auto
times the candidates and keeps the fastest faithful one, and executors step down in one line (no native bf16, a
runtime missing, no torch at all)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from jobs.embed import backends, network
from jobs.embed.backends import candidates, choose_backend
from jobs.embed.network import eager_runner, export_onnx
from jobs.embed.runtimes import Backend, fallbacks, load_exported
from jobs.errors import UsageError
from jobs.imaging import preprocess
from jobs.weights import Weights, build_model, load_weights

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def weights(mobilenet_weights) -> Weights:
    return load_weights("mobilenet_v2", mobilenet_weights)


@pytest.fixture(scope="module")
def crops(demo_dir) -> np.ndarray:
    """Real photos, each in several variants: 16 subjects, 96 crops."""
    paths = sorted((demo_dir / "catalog").rglob("*.jpg"))
    return np.stack([preprocess(path.read_bytes())[0] for path in paths])


@pytest.fixture(scope="module")
def onnx(weights) -> bytes:
    return export_onnx("mobilenet_v2", weights.data)


@pytest.fixture(scope="module")
def fp32(weights, crops) -> np.ndarray:
    return eager_runner("mobilenet_v2", weights.data)(crops)


def neighbours(vectors: np.ndarray, k: int = 10) -> np.ndarray:
    similarity = vectors @ vectors.T
    np.fill_diagonal(similarity, -np.inf)
    return np.argsort(-similarity, axis=1)[:, :k]


def overlap(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([len(set(x) & set(y)) / len(x) for x, y in zip(neighbours(a), neighbours(b))]))


def test_folding_batchnorm_keeps_the_fp32_vectors(weights, crops):
    net = network.EmbeddingNet(build_model("mobilenet_v2", weights.data)).eval()
    folded = network.fold_batchnorm(network.EmbeddingNet(build_model("mobilenet_v2", weights.data)))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    with torch.inference_mode():
        exact, fused = net(torch.from_numpy(crops[:4])), folded(torch.from_numpy(crops[:4]))
    assert float((exact - fused).abs().max()) < 1e-5


@pytest.mark.parametrize("runtime", ["openvino", "onnxruntime"])
def test_exported_model_in_fp32_gives_eager_vectors(runtime, onnx, crops, fp32):
    vectors = load_exported(Backend(runtime, "fp32", onnx), 1)(crops)
    assert vectors.shape == (len(crops), 1280) and vectors.dtype == np.float32
    assert (vectors * fp32).sum(axis=1).min() >= 0.9999


@pytest.mark.parametrize("runtime", ["openvino", "eager"])
def test_bf16_keeps_fp32_vectors_and_neighbours_on_real_photos(runtime, weights, onnx, crops, fp32):
    # where the CPU has no native bf16, OpenVINO runs f32 and this holds trivially; CI's bf16 machines check it
    if runtime == "eager":
        bf16 = eager_runner("mobilenet_v2", weights.data, "bf16")(crops)
    else:
        bf16 = load_exported(Backend(runtime, "bf16", onnx), 1)(crops)
    cosine = (bf16 * fp32).sum(axis=1)
    assert cosine.min() >= 0.99 and cosine.mean() >= 0.998
    assert overlap(bf16, fp32) >= 0.95


def test_candidates_follow_the_request_and_the_cpu(monkeypatch):
    def names(runtime: str, precision: str) -> list[str]:
        return [b.name for b in candidates(runtime, precision)]

    monkeypatch.setattr(backends, "native_bf16", lambda: False)
    assert names("auto", "auto") == ["onnxruntime fp32", "openvino fp32"]
    assert names("auto", "bf16") == ["openvino bf16", "eager bf16"]  # asked for: emulated, but as asked
    monkeypatch.setattr(backends, "native_bf16", lambda: True)
    assert names("auto", "auto") == ["openvino bf16", "eager bf16", "onnxruntime fp32", "openvino fp32"]
    assert names("auto", "fp32") == ["onnxruntime fp32", "openvino fp32", "eager fp32"]
    assert names("eager", "auto") == ["eager bf16", "eager fp32"]
    with pytest.raises(UsageError, match="onnxruntime has no bf16"):
        candidates("onnxruntime", "bf16")


def test_auto_times_every_candidate_keeps_the_fastest_and_remembers_it(weights, crops, monkeypatch, tmp_path):
    monkeypatch.setenv("VEHICLE_SEARCH_CACHE", str(tmp_path))
    first = choose_backend("auto", "auto", "mobilenet_v2", weights, lambda: crops[:8], 10_000)
    rates = {name: float(seen.split()[0]) for name, seen in first.seen.items()}
    assert first.how == "measured" and set(rates) == {b.name for b in candidates("auto", "auto")}
    assert first.backend.name == max(rates, key=rates.__getitem__)
    assert first.backend.onnx == (tmp_path / "onnx").glob("mobilenet_v2-*.onnx").__next__().read_bytes()

    monkeypatch.setattr(backends, "_rate", lambda *_: pytest.fail("a remembered choice is not timed again"))
    again = choose_backend("auto", "auto", "mobilenet_v2", weights, lambda: crops[:8], 10_000)
    assert (again.how, again.backend.name) == ("remembered", first.backend.name)
    monkeypatch.setenv("VEHICLE_SEARCH_CACHE", str(tmp_path / "elsewhere"))
    small = choose_backend("auto", "auto", "mobilenet_v2", weights, lambda: crops[:8], 10)
    assert (small.how, small.backend.name) == ("preferred", candidates("auto", "auto")[0].name)


def test_a_candidate_unfaithful_on_the_job_photos_is_never_chosen(weights, crops, monkeypatch, tmp_path):
    monkeypatch.setenv("VEHICLE_SEARCH_CACHE", str(tmp_path))
    monkeypatch.setattr(backends, "native_bf16", lambda: True)
    monkeypatch.setitem(backends.FIDELITY, "bf16", 1.01)
    choice = choose_backend("auto", "auto", "mobilenet_v2", weights, lambda: crops[:8], 10_000)
    assert choice.backend.precision == "fp32"
    assert choice.seen["openvino bf16"].startswith("cosine") and choice.seen["eager bf16"].startswith("cosine")


def test_an_executor_without_native_bf16_steps_down_to_fp32(monkeypatch):
    from jobs.embed import runtimes

    monkeypatch.setattr(runtimes, "native_bf16", lambda: False)
    assert [b.name for b in fallbacks(Backend("openvino", "bf16", b"onnx"))] == [
        "openvino fp32",
        "onnxruntime fp32",
        "eager fp32",
    ]
    assert [b.name for b in fallbacks(Backend("eager", "bf16"))] == ["eager fp32"]  # nothing exported to fall to
    monkeypatch.setattr(runtimes, "native_bf16", lambda: True)
    assert fallbacks(Backend("eager", "bf16", b"onnx"))[1].name == "openvino bf16"


# An executor's Python, with the named packages missing: it imports every module the tasks may import, embeds the photos
# with the driver's export, and says which runtime ran and whether torch was loaded.
EXECUTOR = """
import importlib, pkgutil, sys
import numpy as np
for name in sys.argv[1].split(","):
    sys.modules[name] = None  # as on a Python without it: importing it fails
import jobs
driver_only = {"jobs.embed.backends", "jobs.embed.network", "jobs.backbones"}
for module in pkgutil.walk_packages(jobs.__path__, "jobs."):
    if module.name not in driver_only:
        importlib.import_module(module.name)
from jobs.embed.runtimes import Backend, load_on_executor
from jobs.imaging import preprocess
crops = np.stack([preprocess(open(p, "rb").read())[0] for p in sys.argv[5:]])
backend = Backend(sys.argv[2], "fp32", open(sys.argv[3], "rb").read())
runner, running = load_on_executor(backend, 1, lambda: open(sys.argv[4], "rb").read(), "mobilenet_v2")
np.save("vectors.npy", runner(crops))
print("ran", running, "torch loaded" if sys.modules.get("torch") else "no torch")
"""


@pytest.mark.parametrize(
    ("missing", "chosen", "runs"),
    [
        ("torch", "openvino", "openvino fp32"),
        ("torch", "eager", "openvino fp32"),
        ("torch,openvino", "openvino", "onnxruntime fp32"),
        ("torch,openvino,onnxruntime", "openvino", None),
    ],
)
def test_an_executor_runs_what_its_python_has(
    missing, chosen, runs, onnx, weights, photos, mobilenet_weights, tmp_path
):
    model = tmp_path / "model.onnx"
    model.write_bytes(onnx)
    paths = [str(paths[0]) for paths in photos.values()]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", EXECUTOR, missing, chosen, str(model), mobilenet_weights, *paths],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    if runs is None:
        assert done.returncode != 0
        assert "no runtime can run the model on this executor" in done.stderr and "make pack-env" in done.stderr
        return
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[-2] == f"ran {runs} no torch"
    warnings = [line for line in done.stderr.splitlines() if "this executor runs" in line]
    if runs == f"{chosen} fp32":
        assert warnings == []
    else:
        assert len(warnings) == 1 and f"chosen on the driver; this executor runs {runs}" in warnings[0]
    # no torch there: Pillow resizes; the vectors are still the driver's eager fp32 vectors of the same photos
    reference = eager_runner("mobilenet_v2", weights.data)(
        np.stack([preprocess(Path(p).read_bytes())[0] for p in paths])
    )
    assert (np.load(tmp_path / "vectors.npy") * reference).sum(axis=1).min() >= 0.999

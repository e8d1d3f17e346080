"""Backbones match torchvision: real MobileNetV2 weights classify a real motorcycle; ResNet-18 loads strictly."""

from __future__ import annotations

import hashlib
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import serve_files

from jobs.embed.backends import AUTO_ORDER, FIDELITY, choose_backend, eager_runner, pick_backend
from jobs.embed.model import EmbedConfig, runner_for
from jobs.errors import UsageError
from jobs.imaging import preprocess, to_batch
from jobs.weights import build_model, load_weights

# ImageNet classes a motorcycle photo may fairly be given
MOTORCYCLE_CLASSES = {665: "moped", 670: "motor scooter", 671: "mountain bike", 535: "disc brake", 518: "crash helmet"}


def torchvision_resnet18_spec() -> dict[str, tuple[int, ...]]:
    """Every key and shape of torchvision's resnet18-f37072fd.pth, written out from its architecture."""
    spec: dict[str, tuple[int, ...]] = {"conv1.weight": (64, 3, 7, 7)}

    def bn(prefix: str, n: int) -> None:
        for name in ("weight", "bias", "running_mean", "running_var"):
            spec[f"{prefix}.{name}"] = (n,)

    bn("bn1", 64)
    in_planes = 64
    for layer, planes in enumerate((64, 128, 256, 512), 1):
        for block in (0, 1):
            p = f"layer{layer}.{block}"
            spec[f"{p}.conv1.weight"] = (planes, in_planes if block == 0 else planes, 3, 3)
            bn(f"{p}.bn1", planes)
            spec[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
            bn(f"{p}.bn2", planes)
            if block == 0 and layer > 1:
                spec[f"{p}.downsample.0.weight"] = (planes, in_planes, 1, 1)
                bn(f"{p}.downsample.1", planes)
        in_planes = planes
    spec["fc.weight"], spec["fc.bias"] = (1000, 512), (1000,)
    return spec


def save_named_checkpoint(state: dict, folder: Path, stem: str = "resnet18") -> Path:
    """Save like torchvision names files: STEM-<first 8 hex of sha256>.pth."""
    tmp = folder / "tmp.pth"
    torch.save(state, tmp)
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    return Path(tmp.rename(folder / f"{stem}-{digest[:8]}.pth"))


@pytest.fixture(scope="module")
def resnet18_checkpoint(tmp_path_factory) -> Path:
    generator = torch.Generator().manual_seed(0)
    state = {}
    for key, shape in torchvision_resnet18_spec().items():
        tensor = torch.randn(shape, generator=generator) * 0.05
        state[key] = tensor.abs() + 0.5 if key.endswith("running_var") else tensor
    return save_named_checkpoint(state, tmp_path_factory.mktemp("weights"))


def test_mobilenet_v2_real_weights_classify_the_motorcycle(mobilenet_weights, photos):
    weights = load_weights("mobilenet_v2", mobilenet_weights)
    assert weights.sha256.startswith("b03531047ffacf1e")
    net = build_model("mobilenet_v2", weights.data)
    crop, width, height = preprocess(photos["motorcycle"][0].read_bytes())
    assert (width, height) == (741, 500)
    with torch.inference_mode():
        probabilities = net(to_batch([crop])).softmax(1)[0]
    top = int(probabilities.argmax())
    assert top in MOTORCYCLE_CLASSES, f"top class {top} is not motorcycle-like"
    assert float(probabilities[[665, 670]].sum()) > 0.5


def test_resnet18_torchvision_keys_load_strictly_and_embed_unit_vectors(resnet18_checkpoint, photos):
    weights = load_weights("resnet18", str(resnet18_checkpoint))
    net = build_model("resnet18", weights.data)
    crops = [preprocess(paths[0].read_bytes())[0] for paths in list(photos.values())[:3]]
    with torch.inference_mode():
        vectors = torch.nn.functional.normalize(net.embed(to_batch(crops)), dim=1).numpy()
    assert vectors.shape == (3, 512)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_missing_key_in_checkpoint_is_a_clear_error(resnet18_checkpoint, tmp_path):
    state = torch.load(resnet18_checkpoint, weights_only=True)
    del state["layer3.1.bn2.running_mean"]
    broken = save_named_checkpoint(state, tmp_path)
    with pytest.raises(UsageError, match="--weights.*layer3.1.bn2.running_mean|layer3.1.bn2.running_mean.*--weights"):
        load_weights("resnet18", str(broken))


def test_truncated_file_and_wrong_model_give_clear_errors(resnet18_checkpoint, mobilenet_weights, tmp_path):
    truncated = tmp_path / "resnet18-trunc.pth"
    truncated.write_bytes(resnet18_checkpoint.read_bytes()[:5000])
    with pytest.raises(UsageError, match="not a usable resnet18 checkpoint.*--weights"):
        load_weights("resnet18", str(truncated))
    with pytest.raises(UsageError, match="not a usable resnet18 checkpoint"):
        load_weights("resnet18", mobilenet_weights)
    with pytest.raises(UsageError, match="cannot get resnet18 weights.*--weights"):
        load_weights("resnet18", str(tmp_path / "nowhere.pth"))


def test_hash_prefix_in_file_name_is_verified(resnet18_checkpoint, tmp_path):
    renamed = tmp_path / "resnet18-deadbeef.pth"
    renamed.write_bytes(resnet18_checkpoint.read_bytes())
    with pytest.raises(UsageError, match="does not start with deadbeef"):
        load_weights("resnet18", str(renamed))


def test_pickled_code_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp_path / "evil.pth"
    torch.save({"conv1.weight": Payload()}, evil)
    with pytest.raises(UsageError, match="not a usable"):
        load_weights("resnet18", str(evil))


def test_https_weights_are_downloaded_once_into_the_torch_cache(resnet18_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    served = tmp_path / "served"
    served.mkdir()
    (served / resnet18_checkpoint.name).write_bytes(resnet18_checkpoint.read_bytes())
    with serve_files(served) as (base, requests):
        url = f"{base}/{resnet18_checkpoint.name}"
        first = load_weights("resnet18", url)
        second = load_weights("resnet18", url)
        assert first.sha256 == second.sha256
        assert Path(first.source) == tmp_path / "torch_home" / "hub" / "checkpoints" / resnet18_checkpoint.name
        assert len([r for r in requests if "GET" in r or r]) == 1  # the second load came from the cache
        with pytest.raises(UsageError, match="cannot get resnet18 weights.*--weights"):
            load_weights("resnet18", f"{base}/resnet18-f37072fd.pth")


@pytest.fixture(scope="module")
def real_crops(photos) -> np.ndarray:
    return np.stack([preprocess(photos[name][0].read_bytes())[0] for name in ("motorcycle", "grace_hopper", "rocket")])


def test_onnxruntime_backend_gives_eager_vectors_on_real_photos(mobilenet_weights, real_crops):
    weights = load_weights("mobilenet_v2", mobilenet_weights)
    backend = choose_backend("auto", "mobilenet_v2", weights, "fp32")
    assert backend.name == AUTO_ORDER[0] == "onnxruntime"  # installed here: auto must pick it
    config = EmbedConfig("mobilenet_v2", "fp32", 4, 10**8, 0, backend.name)
    vectors = runner_for(config, backend, lambda: weights.data, 1)(real_crops)
    reference = eager_runner("mobilenet_v2", weights.data)(real_crops)
    assert vectors.shape == (3, 1280)
    assert (vectors * reference).sum(axis=1).min() >= FIDELITY


def test_unavailable_backend_falls_back_to_eager_with_the_same_vectors(
    mobilenet_weights, real_crops, monkeypatch, caplog
):
    weights = load_weights("mobilenet_v2", mobilenet_weights)
    onnx_backend = choose_backend("onnxruntime", "mobilenet_v2", weights, "fp32")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as on a Python without it: import fails
    # the driver skips it ...
    assert pick_backend("onnxruntime", "mobilenet_v2", weights.data, "fp32").name == "eager"
    # ... and an executor without it runs eager from the weights, logging one line
    config = EmbedConfig("mobilenet_v2", "fp32", 4, 10**8, 0, "onnxruntime")
    with caplog.at_level(logging.WARNING, logger="jobs.embed"):
        vectors = runner_for(config, onnx_backend, lambda: weights.data, 1)(real_crops)
    assert [r.message for r in caplog.records if "unavailable" in r.message][0].startswith(
        "backend onnxruntime unavailable"
    )
    np.testing.assert_allclose(vectors, eager_runner("mobilenet_v2", weights.data)(real_crops), atol=1e-6)

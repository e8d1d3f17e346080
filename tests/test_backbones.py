"""Backbones match torchvision: real MobileNetV2 weights classify a real motorcycle; ResNet-18 loads strictly."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import serve_files

from jobs.embed.network import normalize
from jobs.errors import UsageError
from jobs.imaging import preprocess
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
        probabilities = net(normalize(torch.from_numpy(crop[None]))).softmax(1)[0]
    top = int(probabilities.argmax())
    assert top in MOTORCYCLE_CLASSES, f"top class {top} is not motorcycle-like"
    assert float(probabilities[[665, 670]].sum()) > 0.5


def test_resnet18_torchvision_keys_load_strictly_and_embed_unit_vectors(resnet18_checkpoint, photos):
    weights = load_weights("resnet18", str(resnet18_checkpoint))
    net = build_model("resnet18", weights.data)
    crops = [preprocess(paths[0].read_bytes())[0] for paths in list(photos.values())[:3]]
    with torch.inference_mode():
        vectors = torch.nn.functional.normalize(net.embed(normalize(torch.from_numpy(np.stack(crops)))), dim=1).numpy()
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

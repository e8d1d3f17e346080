"""Decoding and preprocessing: torchvision-equivalent geometry, every odd format handled, errors named."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from jobs.embed.network import normalize
from jobs.imaging import (
    ImageError,
    _pillow_resize_center_crop,
    _rgbx_pixels,
    decode,
    extension_glob,
    preprocess,
    resize_center_crop,
)
from jobs.weights import build_model


def to_batch(crops) -> torch.Tensor:
    return normalize(torch.from_numpy(np.stack(crops)))


def jpeg(img: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", **kwargs)
    return buffer.getvalue()


def test_resize_keeps_aspect_ratio_then_center_crops():
    # a wide image whose left and right thirds are black and the middle white: a squashing resize
    # (the seed's) would keep black in the crop; shorter-side-256 + center 224 sees only the middle
    img = Image.new("RGB", (768, 256), "black")
    img.paste((255, 255, 255), (256, 0, 512, 256))
    crop = resize_center_crop(img)
    assert crop.shape == (224, 224, 3)
    assert crop.min() == 255


def test_batch_is_normalised_channels_last():
    crop = np.full((224, 224, 3), (124, 116, 104), dtype=np.uint8)  # ImageNet mean in 0-255
    batch = to_batch([crop, crop])
    assert batch.shape == (2, 3, 224, 224)
    assert batch.is_contiguous(memory_format=torch.channels_last)
    assert float(batch.abs().max()) < 0.01


def test_large_jpeg_uses_draft_mode_but_keeps_original_size():
    big = Image.new("RGB", (4000, 3000), (10, 200, 30))
    img, width, height = decode(jpeg(big))
    assert (width, height) == (4000, 3000)
    assert min(img.size) >= 512 and img.size[0] < 4000  # decoded reduced, still twice the resize to 256


def test_crop_to_box_uses_only_the_box():
    img = Image.new("RGB", (1200, 800), "white")
    img.paste((255, 0, 0), (100, 100, 500, 400))
    crop, _, _ = preprocess(jpeg(img, quality=95), box=(100, 100, 500, 400))
    assert crop[..., 0].mean() > 200 and crop[..., 1].mean() < 40


def test_exif_orientation_is_applied():
    upright = Image.new("RGB", (300, 600), "white")
    upright.paste((0, 0, 0), (0, 0, 300, 300))  # black top half when upright
    exif = Image.Exif()
    exif[0x0112] = 6
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what a camera held sideways writes
    img, width, height = decode(jpeg(stored, exif=exif, quality=95))
    arr = np.asarray(img)
    assert img.size == (300, 600)
    assert arr[:150].mean() < 30 and arr[450:].mean() > 225


def test_sixteen_bit_is_scaled_not_clipped():
    buffer = io.BytesIO()
    Image.fromarray(np.full((300, 300), 32768, dtype=np.uint16)).save(buffer, format="PNG")
    img, _, _ = decode(buffer.getvalue())
    assert img.mode == "RGB" and abs(int(np.asarray(img)[0, 0, 0]) - 128) <= 1


def test_nasty_corpus_embeds_or_names_the_error(nasty_dir):
    folder, expected = nasty_dir
    for name, error in expected.items():
        content = (folder / name).read_bytes()
        if error is None:
            crop, width, height = preprocess(content)
            assert crop.shape == (224, 224, 3) and width > 0 and height > 0, name
        else:
            with pytest.raises(ImageError, match=error):
                preprocess(content)


def test_pixel_limit_is_configurable():
    with pytest.raises(ImageError, match="too large: 1000x1000"):
        preprocess(jpeg(Image.new("RGB", (1000, 1000))), max_pixels=500_000)


def test_extension_glob_is_case_insensitive():
    glob = extension_glob(["jpg", "png"])
    assert glob == "*.{[jJ][pP][gG],[pP][nN][gG]}"


def reference_crop(content: bytes, box: tuple[float, float, float, float] | None = None) -> np.ndarray:
    """What torchvision's eval transform gives: full decode, (box crop), Resize(256) antialiased, CenterCrop(224)."""
    img = ImageOps.exif_transpose(Image.open(io.BytesIO(content))).convert("RGB")
    if box is not None:
        img = img.crop(box)
    w, h = img.size
    size = (256, int(256 * h / w)) if w <= h else (int(256 * w / h), 256)
    img = img.resize(size, Image.BILINEAR)
    left, top = int(round((size[0] - 224) / 2)), int(round((size[1] - 224) / 2))
    return np.asarray(img.crop((left, top, left + 224, top + 224)))


@pytest.fixture(scope="module")
def real_jpegs(photos) -> dict[str, bytes]:
    """Real photos as JPEGs at the sizes where draft decoding matters: 512 px, 600 px, 1024 px, 1411 px, 3000 px,
    2.5:1."""
    moto = Image.open(photos["motorcycle"][0]).convert("RGB")
    return {
        "astronaut 512x512": jpeg(Image.open(photos["astronaut"][0]).convert("RGB"), quality=90),
        # the worst case of drafting to 2x: a JPEG DCT-scaled to exactly twice the resize (1/2 of 1024 = 512)
        "astronaut 1024x1024": jpeg(
            Image.open(photos["astronaut"][0]).convert("RGB").resize((1024, 1024), Image.BICUBIC), quality=90
        ),
        "cameraman 512x512 grey": jpeg(Image.open(photos["cameraman"][0]), quality=90),
        "grace hopper 512x600": photos["grace_hopper"][0].read_bytes(),
        "retina 1411x1411": photos["retina"][0].read_bytes(),
        "motorcycle 3000x2024": jpeg(moto.resize((3000, 2024), Image.BICUBIC), quality=90),
        "motorcycle 1800x720": jpeg(moto.crop((0, 100, 741, 396)).resize((1800, 720), Image.BICUBIC), quality=90),
    }


def test_embeddings_match_the_reference_transform_at_every_size(real_jpegs, mobilenet_weights):
    # 512-px JPEGs drafted to 256 px in the DCT gave cosine 0.94-0.985 here; >= 0.99 needs the 2x draft
    net = build_model("mobilenet_v2", Path(mobilenet_weights).read_bytes())
    names, ours, reference = [], [], []
    for name, content in real_jpegs.items():
        width, height = Image.open(io.BytesIO(content)).size
        for box in (None, (0.1 * width, 0.15 * height, 0.8 * width, 0.9 * height)):
            names.append(f"{name}{' box' if box else ''}")
            ours.append(preprocess(content, box)[0])
            reference.append(reference_crop(content, box))
    with torch.inference_mode():
        a, b = (torch.nn.functional.normalize(net.embed(to_batch(crops)), dim=1) for crops in (ours, reference))
    cosines = dict(zip(names, (a * b).sum(1).tolist()))
    print("cosines to the reference:", {name: round(c, 5) for name, c in cosines.items()})
    assert min(cosines.values()) >= 0.99, cosines


def test_preprocess_equals_resizing_the_whole_photo_then_cropping(photos):
    content = photos["grace_hopper"][0].read_bytes()  # 512x600: decoded in full, no draft
    np.testing.assert_allclose(preprocess(content)[0].astype(int), reference_crop(content).astype(int), atol=1)


def test_vectorised_resize_matches_pillows_and_falls_back_to_it(photos):
    # torch resizes Pillow's memory in place; where Pillow cannot lend it (a large image in several blocks)
    # Pillow's own resize runs, and both give the same crop within one grey level
    decoded = [
        decode(photos[name][0].read_bytes())[0] for name in ("grace_hopper", "astronaut", "motorcycle", "retina")
    ]
    for img in decoded:
        assert _rgbx_pixels(img) is not None
        np.testing.assert_allclose(
            resize_center_crop(img).astype(int), _pillow_resize_center_crop(img).astype(int), atol=1
        )
    large = decoded[1].resize((3000, 3000))
    assert _rgbx_pixels(large) is None
    np.testing.assert_array_equal(resize_center_crop(large), _pillow_resize_center_crop(large))

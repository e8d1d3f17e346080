"""Decoding and preprocessing: torchvision-equivalent geometry, every odd format handled, errors named."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from jobs.imaging import ImageError, decode, extension_glob, preprocess, resize_center_crop, to_batch


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
    assert min(img.size) >= 256 and img.size[0] < 4000  # decoded reduced, still enough for resize 256


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

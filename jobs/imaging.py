"""Decode image bytes and preprocess like torchvision's ImageNet eval transforms (resize 256, crop 224)."""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
from PIL import Image, ImageOps, UnidentifiedImageError

try:
    import torch
except ImportError:  # executors that run an exported model: Pillow gives the same pixels, in twice the time
    torch = None

RESIZE = 256
CROP = 224
DRAFT_FACTOR = 2  # JPEGs decode to at least this many times RESIZE (see _draft_size)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_MAX_PIXELS = 100_000_000
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")

Box = tuple[float, float, float, float]


class ImageError(ValueError):
    """A file that cannot be embedded; its message is the `error` column's text."""


def extension_glob(extensions: Sequence[str] = IMAGE_EXTENSIONS) -> str:
    """A case-insensitive Hadoop glob for these extensions, e.g. `*.{[jJ][pP][gG],...}`."""

    def insensitive(ext: str) -> str:
        return "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else c for c in ext)

    return "*.{" + ",".join(insensitive(e) for e in extensions) + "}"


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB; transparency is composited on white, 16/32-bit scaled, not clipped."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if arr.max(initial=0) > 255 else 255.0
        img = Image.fromarray(np.clip(arr * (255.0 / top), 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def _draft_size(width: int, height: int, box: Box | None) -> tuple[int, int]:
    """The smallest JPEG decode size that leaves the (box's) shorter side >= DRAFT_FACTOR x RESIZE.

    DCT scaling averages 8x8 blocks down to 1-4 px, a box filter: drafting all the way to 256 px
    (as this did before) moved 512-px photos to cosine 0.94 against an antialiased resize of the
    full decode. At twice the final size the bilinear antialiased resize that follows does the last
    halving, and the result matches the full decode to cosine >= 0.998 (tests/test_imaging.py).
    """
    region_w, region_h = (box[2] - box[0], box[3] - box[1]) if box else (width, height)
    scale = DRAFT_FACTOR * RESIZE / max(1.0, min(region_w, region_h))
    return int(np.ceil(width * scale)), int(np.ceil(height * scale))


def decode(
    content: bytes, box: Box | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[Image.Image, int, int]:
    """RGB image (cropped to box if given, EXIF orientation applied) and the original width and height."""
    if not content:
        raise ImageError("empty file")
    Image.MAX_IMAGE_PIXELS = None  # our own check below names the size and the option
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(content))
            width, height = img.size
            if width * height > max_pixels:
                raise ImageError(f"too large: {width}x{height} pixels exceeds the limit of {max_pixels} (--max-pixels)")
            if img.format == "JPEG":
                img.draft("RGB", _draft_size(width, height, box))
            if box is not None:
                sx, sy = img.size[0] / width, img.size[1] / height
                x1, y1, x2, y2 = box
                # rounded like Pillow's own crop(box), so a box gives the same pixels drafted or not
                img = img.crop(
                    (
                        max(0, round(x1 * sx)),
                        max(0, round(y1 * sy)),
                        min(img.size[0], round(x2 * sx)),
                        min(img.size[1], round(y2 * sy)),
                    )
                )
            ImageOps.exif_transpose(img, in_place=True)  # no copy of an upright photo
            rgb = _to_rgb(img)
            rgb.load()
    except ImageError:
        raise
    except UnidentifiedImageError as e:
        raise ImageError("not a recognised image (unknown or corrupt header)") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(f"corrupt or truncated image: {e}"[:200]) from e
    if min(rgb.size) < 1:
        raise ImageError("empty image (zero width or height)")
    return rgb, width, height


def _crop_geometry(width: int, height: int) -> tuple[int, int, int, int]:
    """Resize(256)'s output size and CenterCrop(224)'s top-left corner in it: (new_w, new_h, top, left)."""
    if width <= height:
        new_w, new_h = RESIZE, int(RESIZE * height / width)
    else:
        new_w, new_h = int(RESIZE * width / height), RESIZE
    return new_w, new_h, int(round((new_h - CROP) / 2.0)), int(round((new_w - CROP) / 2.0))


def _rgbx_pixels(img: Image.Image) -> np.ndarray | None:
    """Pillow's own memory of an RGB image (4 bytes a pixel) as H x W x 4, without a copy; None where Pillow
    cannot lend it (Pillow < 11.2, or a large image stored in several blocks)."""
    if img.mode != "RGB":
        return None
    try:
        values = pa.array(img).values.to_numpy(zero_copy_only=True)
    except (TypeError, ValueError, pa.ArrowException):
        return None
    return values.reshape(img.size[1], img.size[0], 4)


def resize_center_crop(img: Image.Image) -> np.ndarray:
    """torchvision Resize(256) (bilinear, antialiased) then CenterCrop(224), as HWC uint8.

    torch's antialiased uint8 resize is vectorised and reads Pillow's pixels in place: 0.8 ms a bench photo
    against Pillow's 1.6 (bench/embed.py), within one grey level of Pillow's (tests/test_imaging.py).
    """
    pixels = _rgbx_pixels(img)
    if pixels is None or torch is None:
        return _pillow_resize_center_crop(img)
    new_w, new_h, top, left = _crop_geometry(*img.size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "not writable": the array is only read
        nchw = torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0)  # channels_last: the vectorised path
    resized = torch.nn.functional.interpolate(
        nchw, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False
    )
    return resized[0, :3, top : top + CROP, left : left + CROP].permute(1, 2, 0).numpy()


def _pillow_resize_center_crop(img: Image.Image) -> np.ndarray:
    """resize_center_crop with Pillow, resampling only the source region that lands in the crop (resize's `box`):
    the filter positions are those of the full resize, so the pixels are the same without resizing the margins."""
    w, h = img.size
    new_w, new_h, top, left = _crop_geometry(w, h)
    sx, sy = w / new_w, h / new_h
    box = (left * sx, top * sy, (left + CROP) * sx, (top + CROP) * sy)
    return np.asarray(img.resize((CROP, CROP), Image.BILINEAR, box=box), dtype=np.uint8)


def preprocess(
    content: bytes, box: Box | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[np.ndarray, int, int]:
    """Bytes to a 224x224x3 uint8 array (what every backend takes), with the original size."""
    img, width, height = decode(content, box, max_pixels)
    return resize_center_crop(img), width, height

"""Robust image and mask decoding, and the VOC palette.

Every image of a collection goes through :func:`load_image`: whatever the file holds
(JPEG with an EXIF orientation, grayscale, palette, CMYK, 16-bit, float, with alpha, 1×1
or huge), the result is an (H, W, 3) uint8 RGB array as the image is meant to be seen, or
an :class:`ImageDecodeError` naming the file and the reason. Masks (class-index PNGs) go
through :func:`load_mask` and are written with :func:`mask_to_image`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

_DECODE_ERRORS = (OSError, SyntaxError, ValueError, TypeError, EOFError, UnidentifiedImageError)
"""What PIL raises on broken files (truncated data, bad headers, unsupported features)."""

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_AXIS_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)
"""EXIF orientations whose display swaps width and height."""


class ImageDecodeError(ValueError):
    """A file that cannot become an RGB image (or index mask); ``str()`` names file and reason."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def voc_palette() -> list[int]:
    """The standard 256-entry PASCAL VOC colormap, flattened ``[r0, g0, b0, r1, ...]``.

    Index 0 is black (background), 1..20 the VOC class colours, 255 (ignore) is
    (224, 224, 192). Pass it to ``PIL.Image.putpalette``.
    """
    palette: list[int] = []
    for index in range(256):
        r = g = b = 0
        c = index
        for shift in range(7, -1, -1):
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette += [r, g, b]
    return palette


def scaled_size(height: int, width: int, max_side: int | None) -> tuple[int, int]:
    """(height, width) after bounding the longer side by ``max_side``, aspect preserved.

    Unchanged when ``max_side`` is None or the image already fits; each side stays >= 1.
    """
    if max_side is None or max(height, width) <= max_side:
        return height, width
    if max_side < 1:
        raise ValueError(f"max_side must be >= 1, got {max_side}")
    scale = max_side / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def _to_rgb(im: Image.Image, path: Path) -> Image.Image:
    """Any PIL mode of the image at ``path`` -> RGB.

    16-bit / 32-bit integer grayscale ("I;16*", "I") is read as 0..65535 (clipped) and scaled
    to 0..255 with rounding. Float grayscale ("F") is read as 0..1 when every value lies
    there, else as 0..255, rounded; other values (beyond 0..255, negative, NaN) raise
    ImageDecodeError. Alpha (RGBA, LA, PA, palette transparency) is composited on
    black: ``rgb * alpha / 255``, so fully transparent pixels are black whatever colour they
    store. Every other mode (L, P, 1, CMYK, YCbCr, LAB, HSV) uses PIL's own conversion.
    """
    if im.mode == "RGB":
        return im
    if im.mode in _SIXTEEN_BIT_MODES:
        wide = np.clip(np.asarray(im, dtype=np.int64), 0, 65535)
        return _gray((wide * 255 + 32767) // 65535)
    if im.mode == "F":
        values = np.asarray(im, dtype=np.float32)
        lo, hi = values.min(), values.max()  # NaN if any is: then no comparison holds
        if not (0 <= lo and hi <= 255):
            raise ImageDecodeError(
                path, f"float image values must lie in 0..1 or 0..255, got {lo} to {hi}"
            )
        return _gray(np.rint(values * 255 if hi <= 1 else values))
    if im.mode in _ALPHA_MODES or (im.mode in ("P", "L", "RGB") and "transparency" in im.info):
        rgba = np.asarray(im.convert("RGBA"), dtype=np.uint16)
        rgb = (rgba[:, :, :3] * rgba[:, :, 3:] + 127) // 255
        return Image.fromarray(rgb.astype(np.uint8))
    return im.convert("RGB")


def _gray(values: np.ndarray) -> Image.Image:
    """(H, W) gray values in 0..255 as an RGB image."""
    gray = values.astype(np.uint8)
    return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2))


def load_image(path: str | os.PathLike[str], max_side: int | None = None) -> np.ndarray:
    """Decode ``path`` to an (H, W, 3) uint8 RGB array (C-contiguous, writable).

    - The EXIF orientation is applied (``ImageOps.exif_transpose``): the array is the image
      as displayed.
    - Modes are converted as :func:`_to_rgb` documents (16-bit and float gray scaled, alpha
      on black).
    - ``max_side``: when the longer side exceeds it, the image is downscaled (antialiased
      bilinear) to :func:`scaled_size` of its full (oriented) size; JPEGs are decoded at a
      reduced DCT scale first, so a huge JPEG costs little. Smaller images, down to 1×1, are
      returned as they are.
    - Images above PIL's decompression-bomb limit (``2 * Image.MAX_IMAGE_PIXELS`` pixels)
      are refused before decoding.

    Raises ImageDecodeError (a ValueError) naming the file and the reason for: a missing or
    unreadable file, an empty (0-byte) file, a file that is not an image, a truncated or
    corrupt image, a decompression bomb, float values that are no gray levels.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageDecodeError(path, "empty file (0 bytes)")
        with Image.open(path) as im:
            width, height = im.size
            if im.getexif().get(ExifTags.Base.Orientation, 1) in _AXIS_SWAPPING_ORIENTATIONS:
                width, height = height, width
            if max_side is not None:
                im.draft("RGB", (max_side, max_side))
            im.load()
            rgb = _to_rgb(ImageOps.exif_transpose(im), path)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(path, f"refused as a decompression bomb ({e})") from e
    except FileNotFoundError as e:
        raise ImageDecodeError(path, "no such file") from e
    except UnidentifiedImageError as e:
        raise ImageDecodeError(path, "not an image file PIL can identify") from e
    except _DECODE_ERRORS as e:
        raise ImageDecodeError(path, f"cannot decode image ({type(e).__name__}: {e})") from e
    height, width = scaled_size(height, width, max_side)
    if (height, width) != (rgb.height, rgb.width):
        rgb = rgb.resize((width, height), Image.Resampling.BILINEAR)
    return np.array(rgb, dtype=np.uint8)


def load_mask(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a class-index mask PNG to an (H, W) uint8 array of indices (no palette lookup).

    Accepts palette ("P", e.g. VOC SegmentationClass), grayscale ("L", e.g.
    SegmentationClassAug) and integer modes whose values fit 0..255. Colour-coded (RGB)
    masks are refused. Raises ImageDecodeError naming the file for unreadable files and
    unsupported modes or values.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            values = np.array(im)
    except FileNotFoundError as e:
        raise ImageDecodeError(path, "no such file") from e
    except _DECODE_ERRORS as e:
        raise ImageDecodeError(path, f"cannot decode mask ({type(e).__name__}: {e})") from e
    if values.ndim != 2:
        raise ImageDecodeError(
            path, f"mask must be a palette or grayscale index image, got mode {mode}"
        )
    if values.dtype != np.uint8:
        if values.size and (values.min() < 0 or values.max() > 255):
            raise ImageDecodeError(path, f"mask values must lie in 0..255 (mode {mode})")
        values = values.astype(np.uint8)
    return values


def mask_to_image(mask: np.ndarray) -> Image.Image:
    """An (H, W) uint8 class-index mask as a palette ("P") PIL image with the VOC palette.

    Save it as PNG (lossless); :func:`load_mask` reads the indices back exactly.
    """
    if mask.ndim != 2 or mask.dtype != np.uint8:
        raise ValueError(f"mask must be (H, W) uint8, got {mask.shape} {mask.dtype}")
    im = Image.frombytes("P", (mask.shape[1], mask.shape[0]), mask.tobytes())
    im.putpalette(voc_palette())
    return im

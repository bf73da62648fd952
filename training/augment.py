"""IRN-style training augmentation and the matching validation transform.

Both map a :class:`~adcam_fast.data.base.Sample`'s ``image`` ((H, W, 3) uint8 RGB) and
optional ``mask`` ((H, W) uint8, 255 = ignore) to tensors: the image as (3, h, w) float32
normalised by ``(x / 255 - mean) / std``, the mask as (h, w) int64.

Randomness comes only from the ``numpy.random.Generator`` passed in, so a caller that derives
it from ``(seed, epoch, index)`` gets the same augmentation for an item whatever the worker,
the process or the order (see :class:`adcam_fast.training.engine.TransformedDataset`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor

from adcam_fast.data.base import IGNORE_INDEX

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "TrainTransform", "ValTransform", "normalize"]

IMAGENET_MEAN: tuple[float, float, float] = tuple(IMAGENET_DEFAULT_MEAN)
IMAGENET_STD: tuple[float, float, float] = tuple(IMAGENET_DEFAULT_STD)


def normalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(H, W, 3) uint8 -> (3, H, W) float32 ``(image / 255 - mean) / std``."""
    x = image.astype(np.float32) / 255.0
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def _resize_long(
    image: np.ndarray, mask: np.ndarray | None, long_side: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """Resize so the longer side is ``long_side`` (image bilinear, mask nearest)."""
    h, w = image.shape[:2]
    scale = long_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))  # PIL: (width, height)
    if size == (w, h):
        return image, mask
    image = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))
    if mask is not None:
        mask = np.asarray(Image.fromarray(mask).resize(size, Image.Resampling.NEAREST))
    return image, mask


def _to_tensors(image: np.ndarray, mask: np.ndarray | None) -> tuple[Tensor, Tensor | None]:
    mask_t = None if mask is None else torch.from_numpy(mask.astype(np.int64))
    return torch.from_numpy(image), mask_t


@dataclass(frozen=True)
class TrainTransform:
    """Random long-side resize, horizontal flip, normalisation, random ``crop x crop`` crop.

    The long side is drawn uniformly from the integers in
    ``[round(scale[0] * crop), round(scale[1] * crop)]`` (default 320..640 for ``crop=384``,
    IRN's range; relative to the crop so small crops on small images behave alike). The crop
    window is placed as in IRN: along a side longer than ``crop`` a random window is cut,
    along a shorter one the image is placed at a random offset and the rest padded with 0 in
    normalised space (the mean colour) and with 255 (ignore) in the mask.
    """

    crop: int
    scale: tuple[float, float] = (5 / 6, 5 / 3)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.crop < 1:
            raise ValueError(f"crop must be >= 1, got {self.crop}")
        if not 0 < self.scale[0] <= self.scale[1]:
            raise ValueError(f"scale must satisfy 0 < scale[0] <= scale[1], got {self.scale}")

    def __call__(
        self, image: np.ndarray, mask: np.ndarray | None, rng: np.random.Generator
    ) -> tuple[Tensor, Tensor | None]:
        """Augment one item; draws from ``rng`` in a fixed order (size, flip, crop)."""
        lo = max(1, round(self.scale[0] * self.crop))
        hi = max(lo, round(self.scale[1] * self.crop))
        image, mask = _resize_long(image, mask, int(rng.integers(lo, hi + 1)))
        if rng.random() < 0.5:
            image = image[:, ::-1]
            mask = None if mask is None else mask[:, ::-1]
        x = normalize(image, self.mean, self.std)

        h, w = image.shape[:2]
        out = np.zeros((3, self.crop, self.crop), np.float32)
        out_mask = np.full((self.crop, self.crop), IGNORE_INDEX, np.uint8)
        src, dst = [], []
        for size in (h, w):
            span = min(size, self.crop)
            s = int(rng.integers(0, size - self.crop + 1)) if size > self.crop else 0
            d = int(rng.integers(0, self.crop - size + 1)) if size < self.crop else 0
            src.append(slice(s, s + span))
            dst.append(slice(d, d + span))
        out[:, dst[0], dst[1]] = x[:, src[0], src[1]]
        if mask is None:
            return _to_tensors(out, None)
        out_mask[dst[0], dst[1]] = mask[src[0], src[1]]
        return _to_tensors(out, out_mask)


@dataclass(frozen=True)
class ValTransform:
    """Deterministic evaluation transform.

    With ``size``: resize the long side to ``size``, normalise, and pad bottom/right to
    ``size x size`` (image 0, mask 255), so items batch together. With ``size=None``: only
    normalise (full resolution, for pixel-accurate scoring; batch size 1).
    """

    size: int | None = None
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __call__(
        self, image: np.ndarray, mask: np.ndarray | None, rng: np.random.Generator | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Transform one item (``rng`` is accepted for interface parity and unused)."""
        if self.size is None:
            return _to_tensors(normalize(image, self.mean, self.std), mask)
        image, mask = _resize_long(image, mask, self.size)
        h, w = image.shape[:2]
        out = np.zeros((3, self.size, self.size), np.float32)
        out[:, :h, :w] = normalize(image, self.mean, self.std)
        if mask is None:
            return _to_tensors(out, None)
        out_mask = np.full((self.size, self.size), IGNORE_INDEX, np.uint8)
        out_mask[:h, :w] = mask
        return _to_tensors(out, out_mask)

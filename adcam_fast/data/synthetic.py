"""Deterministic synthetic scenes with exact masks that show AD-CAM's two failure modes.

Each scene (``size``×``size``, default 128) holds 1-3 objects of distinct classes out of 8
(:data:`CLASSES`), on a textured, cluttered, desaturated background:

- **Shared body, small discriminative part** (CNN CAM -> false negatives). An object is a
  body (ellipse, rectangle or lobed blob; long side 32-55 % of the image; random aspect,
  rotation and position) with a low-saturation colour of random hue and a striped texture:
  the same family for every class, so the body says "object" but not which. Inside it lies
  the class's *part*: an ellipse of 10-15 % of the body's area at a random place, painted in
  the class's own saturated hue (class c: hue c/8). Only the part tells the classes apart.
  The mask covers body and part (value c + 1).
- **Co-occurring unlabeled context** (attention -> false positives). With probability 0.8
  an object brings its class's *context* region (class c: hue (c + 0.5)/8, mid saturation,
  its own texture: waves, bars, grid or speckle), an ellipse touching the object on a random
  side, drawn under the objects. It is neither in the mask (value 0) nor in the labels.
  With probability 0.1 a scene also holds the context of a class it does not contain, so
  the context is a strong but imperfect cue.

Objects are placed with at most 15 % overlap with earlier ones where 8 tries allow; later
objects occlude earlier ones. Labels are the classes present in the mask. Pixel noise
(sigma 0.02) is added last.

Determinism: scene ``i`` of seed ``s`` depends only on ``(s, i, size)``
(``numpy.random.default_rng([s, i])``), so any subset can be regenerated alone. The
validation split is fixed by the index too: ``i`` is in val when
``floor((i + 1) * f) > floor(i * f)`` for val fraction ``f`` (evenly spread, ``floor(n f)``
items of the first n).
"""

from __future__ import annotations

import argparse
import colorsys
import math
import os
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from adcam_fast.data.base import ImageDataset, Sample, labels_from_mask, read_class_names
from adcam_fast.data.images import mask_to_image
from adcam_fast.data.voc import VOCDataset

CLASSES: tuple[tuple[str, str], ...] = (
    ("boat", "water"),
    ("train", "rail"),
    ("car", "road"),
    ("cow", "grass"),
    ("bird", "sky"),
    ("plane", "runway"),
    ("fish", "weed"),
    ("horse", "fence"),
)
"""(class name, name of its co-occurring unlabeled context), in class-index order."""

CLASS_NAMES = [name for name, _ in CLASSES]
DEFAULT_SIZE = 128
DEFAULT_VAL_FRACTION = 0.1
P_CONTEXT = 0.8
P_STRAY_CONTEXT = 0.1
OBJECT_COUNT_P = (0.5, 0.35, 0.15)
"""Probabilities of 1, 2 and 3 objects in a scene."""
OBJECT_LONG_SIDE = (0.32, 0.55)
"""Range of an object's long side, as a fraction of the image side."""
PART_AREA = (0.10, 0.15)
"""Range of the discriminative part's area, as a fraction of its body's area."""
MAX_OVERLAP = 0.15
NOISE_SIGMA = 0.02


@dataclass(frozen=True, eq=False)
class Scene:
    """One rendered scene: image (H, W, 3) uint8, mask (H, W) uint8 (0 background, c + 1
    class c), and the visible pixels of the discriminative parts (``part``, inside the mask)
    and of the unlabeled context regions (``context``, where the mask is 0), both (H, W)
    bool."""

    image: np.ndarray
    mask: np.ndarray
    part: np.ndarray
    context: np.ndarray


@dataclass(frozen=True)
class _Shape:
    """Ellipse (kind 0), rectangle (1) or lobed blob (2) with centre, semi-axes, rotation."""

    kind: int
    cy: float
    cx: float
    ry: float
    rx: float
    theta: float
    lobes: int = 3
    wobble: float = 0.0
    phase: float = 0.0

    def region(self, size: int) -> np.ndarray:
        yy, xx = _grid(size)
        dy, dx = yy - self.cy, xx - self.cx
        c, s = math.cos(self.theta), math.sin(self.theta)
        u = (dx * c + dy * s) / self.rx
        v = (dy * c - dx * s) / self.ry
        if self.kind == 1:
            return np.maximum(np.abs(u), np.abs(v)) <= 1.0
        r2 = u * u + v * v
        if self.kind == 0:
            return r2 <= 1.0
        edge = 1.0 + self.wobble * np.sin(self.lobes * np.arctan2(v, u) + self.phase)
        return r2 <= edge * edge


@lru_cache(maxsize=4)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (yy, xx), float32 (size, size); shared, never written."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    return yy, xx


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.asarray(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32)


def _random_body(rng: np.random.Generator, size: int) -> _Shape:
    long = rng.uniform(*OBJECT_LONG_SIDE) * size / 2
    short = long * rng.uniform(0.55, 1.0)
    kind = int(rng.integers(3))
    if kind == 1:  # a rectangle of the same semi-axes is 4/pi larger than the ellipse
        long, short = long * 0.88, short * 0.88
    cy, cx = rng.uniform(0.15, 0.85, size=2) * size
    return _Shape(
        kind,
        float(cy),
        float(cx),
        short,
        long,
        rng.uniform(0, math.pi),
        int(rng.integers(3, 6)),
        rng.uniform(0.1, 0.2),
        rng.uniform(0, 2 * math.pi),
    )


def _place_body(rng: np.random.Generator, size: int, taken: np.ndarray) -> np.ndarray:
    """A body region overlapping ``taken`` by at most MAX_OVERLAP of its area (8 tries;
    else the least-overlapping try)."""
    best, best_overlap = None, math.inf
    for _ in range(8):
        region = _random_body(rng, size).region(size)
        overlap = (region & taken).sum() / max(int(region.sum()), 1)
        if overlap < best_overlap:
            best, best_overlap = region, overlap
        if overlap <= MAX_OVERLAP:
            break
    return best


def _place_part(rng: np.random.Generator, size: int, body: np.ndarray) -> np.ndarray:
    """An ellipse of PART_AREA of ``body``'s area lying inside ``body`` (40 tries, shrinking
    every 10; the last try is clipped to the body)."""
    radius = math.sqrt(rng.uniform(*PART_AREA) * body.sum() / math.pi)
    aspect, theta = rng.uniform(0.7, 1.0), rng.uniform(0, math.pi)
    ys, xs = np.nonzero(body)
    region = body
    for attempt in range(40):
        k = int(rng.integers(len(ys)))
        shape = _Shape(0, ys[k] + 0.5, xs[k] + 0.5, radius * aspect, radius, theta)
        region = shape.region(size)
        if not (region & ~body).any():
            return region
        if attempt % 10 == 9:
            radius *= 0.85
    return region & body


def _context_region(rng: np.random.Generator, size: int, body: np.ndarray) -> np.ndarray:
    """An ellipse touching ``body`` on a random side (it overlaps the body's rim)."""
    ys, xs = np.nonzero(body)
    cy, cx = ys.mean() + 0.5, xs.mean() + 0.5
    radius = math.sqrt(body.sum() / math.pi)
    angle = rng.uniform(0, 2 * math.pi)
    along, across = radius * rng.uniform(0.5, 0.8), radius * rng.uniform(1.0, 1.6)
    dist = 0.6 * radius + 0.8 * along
    centre_y, centre_x = cy + dist * math.sin(angle), cx + dist * math.cos(angle)
    return _Shape(0, centre_y, centre_x, across, along, angle).region(size)


def _stray_context_region(rng: np.random.Generator, size: int) -> np.ndarray:
    cy, cx = rng.uniform(0.1, 0.9, size=2) * size
    ry, rx = rng.uniform(0.08, 0.18, size=2) * size
    return _Shape(0, float(cy), float(cx), float(ry), float(rx), rng.uniform(0, math.pi)).region(
        size
    )


def _context_texture(rng: np.random.Generator, c: int, size: int) -> np.ndarray:
    """Brightness modulation of class c's context: waves, bars, grid or speckle (c % 4),
    horizontal for c < 4, vertical otherwise."""
    yy, xx = _grid(size)
    a, b = (yy, xx) if c < 4 else (xx, yy)
    kind = c % 4
    if kind == 0:
        return 1.0 + 0.2 * np.sin(2 * np.pi * a / 6 + 2 * np.sin(2 * np.pi * b / 23))
    if kind == 1:
        return 1.0 - 0.35 * ((a / 9) % 1.0 < 0.3)
    if kind == 2:
        return 1.0 - 0.3 * (((a / 8) % 1.0 < 0.2) | ((b / 8) % 1.0 < 0.2))
    return 1.0 + 0.25 * rng.standard_normal((size, size)).astype(np.float32)


def _stripes(rng: np.random.Generator, size: int) -> np.ndarray:
    """The body texture shared by every class: hard stripes, random period and angle."""
    yy, xx = _grid(size)
    angle, period = rng.uniform(0, math.pi), rng.uniform(5, 8)
    wave = np.sin(2 * np.pi * (xx * math.cos(angle) + yy * math.sin(angle)) / period)
    return 1.0 + 0.18 * np.sign(wave)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Desaturated base colour, three soft sinusoids, 3-6 small desaturated clutter shapes."""
    yy, xx = _grid(size)
    shade = np.ones((size, size), dtype=np.float32)
    for _ in range(3):
        fy, fx = (float(f) for f in rng.uniform(-3, 3, size=2) * (2 * math.pi / size))
        shade += 0.08 * np.sin(fy * yy + fx * xx + rng.uniform(0, 2 * math.pi))
    base = _hsv(rng.uniform(), rng.uniform(0, 0.12), rng.uniform(0.35, 0.75))
    img = shade[:, :, None] * base
    for _ in range(int(rng.integers(3, 7))):
        cy, cx = rng.uniform(0, 1, size=2) * size
        ry, rx = rng.uniform(0.02, 0.05, size=2) * size
        shape = _Shape(int(rng.integers(2)), float(cy), float(cx), float(ry), float(rx), 0.0)
        img[shape.region(size)] = _hsv(rng.uniform(), rng.uniform(0, 0.15), rng.uniform(0.25, 0.85))
    return img


def render(seed: int, index: int, size: int = DEFAULT_SIZE) -> Scene:
    """Scene ``index`` of the synthetic collection ``seed`` (both >= 0), ``size`` px square
    (>= 32). A pure function of its arguments."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed} index={index}")
    if size < 32:
        raise ValueError(f"size must be >= 32, got {size}")
    rng = np.random.default_rng([seed, index])
    k = len(CLASSES)
    img = _background(rng, size)
    n_objects = int(rng.choice(len(OBJECT_COUNT_P), p=OBJECT_COUNT_P)) + 1
    classes = [int(c) for c in rng.choice(k, size=n_objects, replace=False)]

    taken = np.zeros((size, size), dtype=bool)
    objects = []
    contexts = []
    for c in classes:
        body = _place_body(rng, size, taken)
        taken |= body
        objects.append((c, body, _place_part(rng, size, body)))
        if rng.random() < P_CONTEXT:
            contexts.append((c, _context_region(rng, size, body)))
    if rng.random() < P_STRAY_CONTEXT:
        absent = [c for c in range(k) if c not in classes]
        contexts.append((int(rng.choice(absent)), _stray_context_region(rng, size)))

    context = np.zeros((size, size), dtype=bool)
    for c, region in contexts:
        texture = _context_texture(rng, c, size)
        img[region] = texture[region, None] * _hsv((c + 0.5) / k, 0.55, 0.6)
        context |= region
    mask = np.zeros((size, size), dtype=np.uint8)
    part = np.zeros((size, size), dtype=bool)
    for c, body, part_region in objects:
        colour = _hsv(rng.uniform(), rng.uniform(0.15, 0.35), rng.uniform(0.5, 0.8))
        img[body] = _stripes(rng, size)[body, None] * colour
        img[part_region] = _hsv(c / k, 1.0, 1.0)
        mask[body] = c + 1
        part[body] = False
        part |= part_region
    img += NOISE_SIGMA * rng.standard_normal(img.shape, dtype=np.float32)
    image = np.round(np.clip(img, 0.0, 1.0) * 255).astype(np.uint8)
    return Scene(image, mask, part, context & (mask == 0))


def is_val(index: int, val_fraction: float) -> bool:
    """Whether scene ``index`` belongs to the validation split (see the module doc)."""
    return math.floor((index + 1) * val_fraction) > math.floor(index * val_fraction)


def item_id(index: int) -> str:
    """The id of scene ``index``: ``syn_`` and the index on 6+ digits."""
    return f"syn_{index:06d}"


def _split_indices(n: int, split: str, val_fraction: float) -> list[int]:
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}")
    if split == "all":
        return list(range(n))
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'all', 'train' or 'val', got {split!r}")
    return [i for i in range(n) if is_val(i, val_fraction) == (split == "val")]


class SyntheticDataset(ImageDataset):
    """The first ``n`` scenes of seed ``seed``, rendered on access (nothing on disk).

    split: ``"all"``, ``"train"`` or ``"val"`` (see :func:`is_val`). Items have ids
    :func:`item_id`, masks, and labels equal to the classes in their mask; ``path(i)`` is
    None. ``scene(i)`` also gives the part and context maps.
    """

    def __init__(
        self,
        n: int,
        seed: int = 0,
        *,
        size: int = DEFAULT_SIZE,
        split: str = "all",
        val_fraction: float = DEFAULT_VAL_FRACTION,
    ) -> None:
        self.seed, self.size = seed, size
        self._indices = _split_indices(n, split, val_fraction)
        self.ids = [item_id(i) for i in self._indices]
        self.class_names = list(CLASS_NAMES)
        self._labels: list[np.ndarray | None] = [None] * len(self.ids)

    def scene(self, i: int) -> Scene:
        """The full rendered scene of item ``i``."""
        return render(self.seed, self._indices[self._index(i)], self.size)

    def path(self, i: int) -> None:
        """None: the items exist only in memory."""
        self._index(i)

    def labels(self, i: int) -> np.ndarray:
        """Multi-hot labels of item ``i`` (renders the scene once, then cached)."""
        i = self._index(i)
        if self._labels[i] is None:
            self._labels[i] = labels_from_mask(self.scene(i).mask, len(CLASSES), self.ids[i])
        return self._labels[i].copy()

    def mask(self, i: int) -> np.ndarray:
        """The exact mask of item ``i`` (renders the scene)."""
        return self.scene(i).mask

    def _load(self, i: int) -> Sample:
        scene = self.scene(i)
        if self._labels[i] is None:
            self._labels[i] = labels_from_mask(scene.mask, len(CLASSES), self.ids[i])
        return Sample(self.ids[i], scene.image, self._labels[i].copy(), scene.mask)


def make_synthetic(
    out_dir: str | os.PathLike[str],
    n: int,
    seed: int = 0,
    *,
    size: int = DEFAULT_SIZE,
    val_fraction: float = DEFAULT_VAL_FRACTION,
) -> Path:
    """Write scenes 0..n-1 of ``seed`` in VOC layout under ``out_dir`` and return it.

    Writes ``JPEGImages/ID.png`` (lossless, so reading back gives the rendered pixels),
    ``SegmentationClass/ID.png`` (palette PNG, VOC palette), ``ImageSets/Segmentation/``
    ``{train,val,trainval}.txt`` and ``class_names.txt``; existing files of the same names
    are overwritten. Read it with ``open_dataset("synthetic:OUT_DIR[:SPLIT]")``.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    indices = _split_indices(n, "all", val_fraction)
    out = Path(out_dir)
    images, masks, sets = out / "JPEGImages", out / "SegmentationClass", out / "ImageSets"
    for folder in (images, masks, sets / "Segmentation"):
        folder.mkdir(parents=True, exist_ok=True)
    for i in indices:
        scene = render(seed, i, size)
        Image.fromarray(scene.image).save(images / f"{item_id(i)}.png", compress_level=1)
        mask_to_image(scene.mask).save(masks / f"{item_id(i)}.png")
    val = [item_id(i) for i in indices if is_val(i, val_fraction)]
    train = [item_id(i) for i in indices if not is_val(i, val_fraction)]
    for name, ids in (("train", train), ("val", val), ("trainval", train + val)):
        (sets / "Segmentation" / f"{name}.txt").write_text("".join(f"{x}\n" for x in ids))
    (out / "class_names.txt").write_text("".join(f"{c}\n" for c in CLASS_NAMES))
    return out


def open_synthetic(root: str | os.PathLike[str], split: str = "train", **kw: object) -> VOCDataset:
    """Read :func:`make_synthetic` output: the VOC reader with ``ROOT/class_names.txt`` and
    labels from the masks; ``kw`` go to :class:`~adcam_fast.data.voc.VOCDataset`."""
    names = read_class_names(Path(root) / "class_names.txt")
    return VOCDataset(root, split, class_names=names, label_source="mask", **kw)


def add_make_synthetic_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``adcam make-synthetic OUT [--n N] [--seed S] [--size PX]
    [--val-fraction F]``."""
    parser.add_argument("out", type=Path, help="output folder (VOC layout)")
    parser.add_argument("--n", type=int, default=2000, help="number of images (default 2000)")
    parser.add_argument("--seed", type=int, default=0, help="collection seed (default 0)")
    parser.add_argument(
        "--size", type=int, default=DEFAULT_SIZE, help=f"image side in px (default {DEFAULT_SIZE})"
    )
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=DEFAULT_VAL_FRACTION,
        help=f"share of images in the val split (default {DEFAULT_VAL_FRACTION})",
    )


def run_make_synthetic(args: argparse.Namespace) -> int:
    """Run ``adcam make-synthetic``: write the collection, print a one-line summary.
    Returns 0, or 2 with the reason on stderr for bad arguments."""
    try:
        out = make_synthetic(
            args.out, args.n, args.seed, size=args.size, val_fraction=args.val_fraction
        )
    except ValueError as e:
        print(f"adcam make-synthetic: {e}", file=sys.stderr)
        return 2
    n_val = sum(is_val(i, args.val_fraction) for i in range(args.n))
    print(
        f"wrote {args.n} images ({args.n - n_val} train, {n_val} val), {len(CLASSES)} classes, "
        f"{args.size}x{args.size} px, seed {args.seed} -> {out}"
    )
    return 0

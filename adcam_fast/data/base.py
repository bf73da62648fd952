"""The item type every reader returns, the dataset base class, and ``--data SPEC`` parsing.

A dataset is a ``torch.utils.data.Dataset`` of :class:`Sample` with

- ``class_names``: the K foreground classes; mask value ``c + 1`` is ``class_names[c]``,
  0 is background, 255 is ignore;
- ``ids``: one unique string per item (output files are named after it; resume checks it);
- ``path(i)`` and ``labels(i)``: the image file and the multi-hot labels, without decoding
  the image (labels may need an annotation or mask file read once; readers cache them);
- ``mask(i)``: the ground-truth mask at the annotation's full size, without decoding the
  image (for scoring), or None.

``torch``'s default collate does not handle :class:`Sample`; batch with
``collate_fn=list`` (images differ in size anyway).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from adcam_fast.data.images import scaled_size
from adcam_fast.io import read_text

IGNORE_INDEX = 255
"""Mask value of pixels excluded from training and scoring."""


@dataclass(frozen=True, eq=False)
class Sample:
    """One item of a collection.

    id: unique within its dataset.
    image: (H, W, 3) uint8 RGB.
    labels: (K,) float32 multi-hot over the dataset's ``class_names``; None when the
        collection has no labels (an unlabeled folder: the pipeline predicts the classes).
    mask: (H, W) uint8 class indices (0 background, c + 1 class c, 255 ignore), or None
        when the collection has no pixel ground truth for this item.
    """

    id: str
    image: np.ndarray
    labels: np.ndarray | None
    mask: np.ndarray | None = None

    def __post_init__(self) -> None:
        img = self.image
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(
                f"{self.id}: image must be (H, W, 3) uint8, got {img.shape} {img.dtype}"
            )
        lab = self.labels
        if lab is not None and (lab.dtype != np.float32 or lab.ndim != 1):
            raise ValueError(f"{self.id}: labels must be (K,) float32, got {lab.shape} {lab.dtype}")
        m = self.mask
        if m is not None and (m.dtype != np.uint8 or m.shape != img.shape[:2]):
            raise ValueError(
                f"{self.id}: mask must be {img.shape[:2]} uint8 like the image, "
                f"got {m.shape} {m.dtype}"
            )


def multi_hot(indices: Iterable[int], num_classes: int) -> np.ndarray:
    """(num_classes,) float32 vector with 1 at each of ``indices`` (0-based class indices)."""
    out = np.zeros(num_classes, dtype=np.float32)
    out[list(indices)] = 1.0
    return out


def labels_from_mask(
    mask: np.ndarray, num_classes: int, source: str | os.PathLike[str]
) -> np.ndarray:
    """Multi-hot labels of the classes present in ``mask`` (values other than 0 and 255).

    Raises ValueError naming ``source`` when a value is neither 0, 255 nor 1..num_classes.
    """
    present = np.flatnonzero(np.bincount(mask.ravel(), minlength=256))
    bad = [int(v) for v in present if v > num_classes and v != IGNORE_INDEX]
    if bad:
        raise ValueError(f"{source}: mask values {bad} outside 0, 255 and 1..{num_classes}")
    return multi_hot([int(v) - 1 for v in present if 0 < v <= num_classes], num_classes)


def fit_mask(
    mask: np.ndarray, image: np.ndarray, max_side: int | None, source: str | os.PathLike[str]
) -> np.ndarray:
    """``mask`` brought to the image's size after :func:`~adcam_fast.data.images.load_image`
    downscaled it with ``max_side`` (nearest neighbour, so indices stay indices).

    Raises ValueError naming ``source`` when the mask and the image disagree in size.
    """
    target = scaled_size(mask.shape[0], mask.shape[1], max_side)
    if image.shape[:2] != target:
        raise ValueError(
            f"{source}: mask is {mask.shape[1]}x{mask.shape[0]} (W x H) but the image decodes to "
            f"{image.shape[1]}x{image.shape[0]}"
        )
    if target == mask.shape:
        return mask
    small = Image.fromarray(mask).resize((target[1], target[0]), Image.Resampling.NEAREST)
    return np.asarray(small, dtype=np.uint8).copy()


def read_class_names(path: str | os.PathLike[str]) -> list[str]:
    """Class names from a text file, one per line (surrounding blanks stripped, blank lines
    skipped); the order fixes the class indices. Raises ValueError naming the file when it is
    missing, not UTF-8, empty, or repeats a name."""
    path = Path(path)
    lines = read_text(path, "class list").splitlines()
    names = [line.strip() for line in lines if line.strip()]
    if not names:
        raise ValueError(f"{path}: the class list is empty")
    seen: set[str] = set()
    for row, name in enumerate(names, 1):
        if name in seen:
            raise ValueError(f"{path}: class {name!r} is listed twice (entry {row})")
        seen.add(name)
    return names


class ImageDataset(Dataset):
    """Base of every reader: ids, class names, cheap ``path``/``labels``, ``__getitem__``.

    Subclasses set ``ids`` and ``class_names`` and implement ``path``, ``labels``, ``mask``
    and ``_load``; indices may be negative (Python convention).
    """

    ids: list[str]
    class_names: list[str]
    has_labels: bool = True
    """False for a collection without image-level labels (``labels(i)`` is None)."""

    def __len__(self) -> int:
        return len(self.ids)

    def _index(self, i: int) -> int:
        n = len(self.ids)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} items")
        return i % n

    def __getitem__(self, i: int) -> Sample:
        """Decode item ``i`` (readers given ``max_side`` downscale the image; masks follow)."""
        return self._load(self._index(i))

    def _load(self, i: int) -> Sample:
        raise NotImplementedError

    def path(self, i: int) -> Path | None:
        """Image file of item ``i``; None for an in-memory (synthetic) dataset."""
        raise NotImplementedError

    def labels(self, i: int) -> np.ndarray | None:
        """(K,) float32 multi-hot labels of item ``i`` without decoding the image, or None."""
        raise NotImplementedError

    def mask(self, i: int) -> np.ndarray | None:
        """(H, W) uint8 ground-truth mask of item ``i`` at full size (not bounded by
        ``max_side``) without decoding the image, or None when the item has none."""
        raise NotImplementedError


def _split_spec(spec: str, kind: str, rest: str, min_parts: int, max_parts: int) -> list[str]:
    parts = rest.split(":")
    if not min_parts <= len(parts) <= max_parts or not parts[0]:
        raise ValueError(f"--data {spec!r}: expected {_FORMS[kind]}")
    return parts + [""] * (max_parts - len(parts))


_FORMS = {
    "voc": "voc:ROOT[:SPLIT]",
    "coco": "coco:IMAGES_DIR:ANNOTATIONS_JSON",
    "folder": "folder:IMAGE_DIR[:LABELS_FILE[:CLASSES_FILE]]",
    "synthetic": "synthetic:ROOT[:SPLIT]",
}


def open_dataset(spec: str, strict: bool = True, **kw: object) -> ImageDataset:
    """Open the collection a ``--data SPEC`` string names; ``kw`` go to the reader, and
    ``strict`` to the folder reader (False: a bad labels row fails its item, not the set).

    - ``voc:ROOT[:SPLIT]`` -> :class:`~adcam_fast.data.voc.VOCDataset` (SPLIT defaults to
      ``train_aug`` when ``ROOT/SegmentationClassAug`` exists, else ``train``).
    - ``coco:IMAGES_DIR:ANNOTATIONS_JSON`` -> :class:`~adcam_fast.data.coco.CocoDataset`.
    - ``folder:IMAGE_DIR[:LABELS_FILE[:CLASSES_FILE]]`` ->
      :class:`~adcam_fast.data.folder.FolderDataset` (an empty LABELS_FILE, as in
      ``folder:DIR::classes.txt``, means unlabeled images with a known class list).
    - ``synthetic:ROOT[:SPLIT]`` -> the output of ``adcam make-synthetic``: the VOC reader
      with ``ROOT/class_names.txt``; SPLIT defaults to ``train``.

    Paths may not contain ':'. Every reader accepts ``max_side``. Raises ValueError naming
    the spec for an unknown kind or a wrong number of fields, and the readers' own
    ValueErrors (naming the file) for missing or bad data.
    """
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in _FORMS:
        raise ValueError(f"--data {spec!r}: expected one of {', '.join(_FORMS.values())}")
    if kind == "voc":
        from adcam_fast.data.voc import VOCDataset

        root, split = _split_spec(spec, kind, rest, 1, 2)
        return VOCDataset(root, split or None, **kw)
    if kind == "synthetic":
        from adcam_fast.data.synthetic import open_synthetic

        root, split = _split_spec(spec, kind, rest, 1, 2)
        return open_synthetic(root, split or "train", **kw)
    if kind == "coco":
        from adcam_fast.data.coco import CocoDataset

        images, annotations = _split_spec(spec, kind, rest, 2, 2)
        if not annotations:
            raise ValueError(f"--data {spec!r}: expected {_FORMS[kind]}")
        return CocoDataset(images, annotations, **kw)
    from adcam_fast.data.folder import FolderDataset

    images, labels_file, classes_file = _split_spec(spec, kind, rest, 1, 3)
    return FolderDataset(images, labels_file or None, classes_file or None, strict=strict, **kw)


def check_unique(ids: Sequence[str], source: str | os.PathLike[str]) -> None:
    """Raise ValueError naming ``source`` when ``ids`` repeat an id."""
    seen: set[str] = set()
    for item in ids:
        if item in seen:
            raise ValueError(f"{source}: id {item!r} appears twice")
        seen.add(item)

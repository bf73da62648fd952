"""PASCAL VOC 2012 layout reader (also reads ``adcam make-synthetic`` output).

Layout under ROOT::

    JPEGImages/ID.jpg           (.jpeg and .png accepted too)
    SegmentationClass/ID.png    palette PNG of class indices (VOC palette), 255 = ignore
    SegmentationClassAug/ID.png optional: the SBD-augmented masks (grayscale indices)
    Annotations/ID.xml          optional: object annotations
    ImageSets/Segmentation/SPLIT.txt

Splits: ``ImageSets/Segmentation/SPLIT.txt``, one id per line; a line's first field may also
be a path (DeepLab's ``/JPEGImages/ID.jpg /SegmentationClassAug/ID.png`` lines): its stem is
the id. When no ``train_aug.txt`` exists but ``SegmentationClassAug/`` does, ``train_aug``
is every PNG there minus the ids of ``val.txt`` (12,031 - 1,449 = the usual 10,582 images).
The default split is ``train_aug`` when ``SegmentationClassAug/`` exists, else ``train``.

Masks: for ``train_aug`` an item's mask is ``SegmentationClassAug/ID.png`` (else
``SegmentationClass/ID.png``); for other splits ``SegmentationClass`` is looked at first.
Items without either have ``mask=None``.

Image labels (``label_source``):

- ``"auto"`` (default): from ``Annotations/ID.xml`` when it exists, else from the mask. The
  XML rule is the one of the published WSSS ``cls_labels.npy`` files (PSA, IRN, SEAM: they
  are made with ``load_image_label_list_from_xml``): every ``<object>``'s ``<name>``,
  ``difficult`` and ``truncated`` objects included.
- ``"xml"``: always from the XML (required for every item).
- ``"mask"``: always from the mask: its values other than 0 and 255 (required for every item).
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from adcam_fast.data.base import (
    ImageDataset,
    Sample,
    check_unique,
    fit_mask,
    labels_from_mask,
    multi_hot,
)
from adcam_fast.data.images import load_image, load_mask
from adcam_fast.io import read_text

VOC_CLASSES = [
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
]
"""The 20 foreground classes of PASCAL VOC, in mask-index order (mask value c + 1)."""

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
LABEL_SOURCES = ("auto", "xml", "mask")


def _listing(folder: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    """stem -> file for the files of ``folder`` with one of ``suffixes`` (case-insensitive);
    a stem present with several suffixes maps to the first in ``suffixes`` order."""
    if not folder.is_dir():
        return {}
    by_stem: dict[str, list[Path]] = {}
    for entry in os.scandir(folder):
        p = Path(entry.path)
        if p.suffix.lower() in suffixes:
            by_stem.setdefault(p.stem, []).append(p)
    return {
        stem: min(paths, key=lambda p: (suffixes.index(p.suffix.lower()), p.name))
        for stem, paths in by_stem.items()
    }


def _split_id(field: str) -> str:
    """The image id of a split file's first field: an id (``2007_000032``, kept whole, dots
    included), or a path to the image or its mask (``/JPEGImages/2007_000032.jpg``, as in
    SegmentationClassAug's lists), whose stem it is."""
    path = Path(field)
    return path.stem if "/" in field or path.suffix.lower() in IMAGE_SUFFIXES else field


def _read_split(root: Path, split: str) -> tuple[list[str], str]:
    """The ids of ``split`` and a description of where they came from (for messages)."""
    sets = root / "ImageSets" / "Segmentation"
    split_file = sets / f"{split}.txt"
    if split_file.is_file():
        lines = read_text(split_file, "split list").splitlines()
        ids = [_split_id(line.split()[0]) for line in lines if line.strip()]
        check_unique(ids, split_file)
        return ids, str(split_file)
    aug = root / "SegmentationClassAug"
    if split == "train_aug" and aug.is_dir():
        val_file = sets / "val.txt"
        val = set(_read_split(root, "val")[0]) if val_file.is_file() else set()
        ids = sorted(stem for stem in _listing(aug, (".png",)) if stem not in val)
        return ids, f"{aug} (PNG listing minus {val_file.name})"
    known = sorted(p.stem for p in sets.glob("*.txt")) if sets.is_dir() else []
    raise ValueError(f"{split_file}: split {split!r} not found (splits here: {known or 'none'})")


def _xml_labels(path: Path, class_names: list[str]) -> np.ndarray:
    """Multi-hot labels from a VOC annotation XML (every object's name, difficult included)."""
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as e:
        raise ValueError(f"{path}: cannot parse annotation XML ({e})") from e
    index = {name: c for c, name in enumerate(class_names)}
    found = []
    for obj in root.findall("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in index:
            raise ValueError(
                f"{path}: object name {name!r} is not one of the {len(class_names)} classes"
            )
        found.append(index[name])
    return multi_hot(found, len(class_names))


class VOCDataset(ImageDataset):
    """A split of a VOC-layout collection (see the module doc for the rules).

    root: the folder holding ``JPEGImages/`` (e.g. ``VOCdevkit/VOC2012``).
    split: a name under ``ImageSets/Segmentation`` or None for the default.
    class_names: the foreground classes (default :data:`VOC_CLASSES`).
    label_source: ``"auto"``, ``"xml"`` or ``"mask"``.
    max_side: images are downscaled to fit it on load (masks follow, nearest neighbour).

    Construction lists the folders once and raises ValueError naming the split file or
    folder for: a missing root or split, an id without an image, an item without the label
    source it needs. Labels are read lazily and cached; a bad XML or mask raises ValueError
    naming that file when its item is first used.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str | None = None,
        *,
        class_names: list[str] | None = None,
        label_source: str = "auto",
        max_side: int | None = None,
    ) -> None:
        root = Path(root)
        if not (root / "JPEGImages").is_dir():
            raise ValueError(f"{root}: not a VOC root (no JPEGImages/ folder)")
        if label_source not in LABEL_SOURCES:
            raise ValueError(f"label_source must be one of {LABEL_SOURCES}, got {label_source!r}")
        aug = root / "SegmentationClassAug"
        if split is None:
            split = "train_aug" if aug.is_dir() else "train"
        self.root = root
        self.split = split
        self.class_names = list(VOC_CLASSES if class_names is None else class_names)
        self.max_side = max_side
        self.ids, source = _read_split(root, split)

        images = _listing(root / "JPEGImages", IMAGE_SUFFIXES)
        mask_dirs = [root / "SegmentationClass", aug]
        if split == "train_aug":
            mask_dirs.reverse()
        mask_listings = [_listing(d, (".png",)) for d in mask_dirs]
        xmls = _listing(root / "Annotations", (".xml",))

        self._images: list[Path] = []
        self._masks: list[Path | None] = []
        self._label_files: list[Path] = []
        for item in self.ids:
            if item not in images:
                raise ValueError(
                    f"{source}: image {item!r} not found in {root / 'JPEGImages'} "
                    f"(looked for {', '.join(IMAGE_SUFFIXES)})"
                )
            mask = next((m[item] for m in mask_listings if item in m), None)
            xml = xmls.get(item)
            if label_source == "xml" or (label_source == "auto" and xml is not None):
                label_file = xml
            else:
                label_file = mask
            if label_file is None:
                wanted = {"xml": "XML", "mask": "mask", "auto": "mask or XML"}[label_source]
                raise ValueError(
                    f"{source}: item {item!r} has no {wanted} to take its labels from "
                    f"(label_source={label_source!r})"
                )
            self._images.append(images[item])
            self._masks.append(mask)
            self._label_files.append(label_file)
        self._labels: list[np.ndarray | None] = [None] * len(self.ids)

    def path(self, i: int) -> Path:
        """The image file of item ``i``."""
        return self._images[self._index(i)]

    def mask(self, i: int) -> np.ndarray | None:
        """The ground-truth mask of item ``i`` (full size), or None when it has none."""
        mask_file = self._masks[self._index(i)]
        return None if mask_file is None else load_mask(mask_file)

    def labels(self, i: int) -> np.ndarray:
        """Multi-hot labels of item ``i`` (reads its XML or mask once, then cached)."""
        i = self._index(i)
        cached = self._labels[i]
        if cached is None:
            source = self._label_files[i]
            if source.suffix.lower() == ".xml":
                cached = _xml_labels(source, self.class_names)
            else:
                cached = labels_from_mask(load_mask(source), len(self.class_names), source)
            self._labels[i] = cached
        return cached.copy()

    def _load(self, i: int) -> Sample:
        image = load_image(self._images[i], self.max_side)
        mask_file = self._masks[i]
        mask = None
        if mask_file is not None:
            full = load_mask(mask_file)
            if self._labels[i] is None and self._label_files[i] == mask_file:
                self._labels[i] = labels_from_mask(full, len(self.class_names), mask_file)
            mask = fit_mask(full, image, self.max_side, str(mask_file))
        return Sample(self.ids[i], image, self.labels(i), mask)

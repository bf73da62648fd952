"""A folder of images, with or without an image-level labels file.

Labels file (UTF-8, a BOM is tolerated), by extension:

- ``.json``: ``{"IMAGE": ["class", ...], ...}``;
- anything else: CSV rows ``IMAGE,LABELS`` with the class names in LABELS separated by ``;``
  (then a name may hold blanks) or else by blanks (quote the field if it holds a comma); an
  optional header row ``image,labels``; blank lines are skipped.

IMAGE is a path relative to the image folder, inside it (no ``..``). The item id is IMAGE
without its extension; items keep the file's order. Every listed image needs at least one
class. Class order: the classes file (one name per line) when given, else the sorted union
of the names used.

Without a labels file, every image under the folder (recursively; hidden files and folders
skipped; extensions in :data:`IMAGE_SUFFIXES`) is an item, in sorted path order, with
``labels=None``: the pipeline predicts the classes. ``class_names`` is then the classes
file's list, or empty.

Bad data raises ValueError at construction naming the labels file and the row (CSV line
number or JSON key): a missing image, an unknown class name, an empty labels field, a
malformed row, an empty or absolute image path or one with ``..``, a repeated image or id.
With ``strict=False`` (the label pipeline's mode) a bad row of the first three kinds stays
an item whose loading raises that ValueError, so the pipeline reports it and goes on with
the rest.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import numpy as np

from adcam_fast.data.base import ImageDataset, Sample, check_unique, multi_hot, read_class_names
from adcam_fast.data.images import load_image
from adcam_fast.io import read_text

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")

Entry = tuple[str, str, list[str]]
"""(where in the labels file, image path relative to the folder, class names)."""


def _class_list(field: str) -> list[str]:
    """The class names of a CSV labels field: separated by ``;`` where it holds one (names may
    then hold blanks, ``traffic light;person``), else by blanks."""
    names = field.split(";") if ";" in field else field.split()
    return [n.strip() for n in names if n.strip()]


def _read_csv(path: Path) -> list[Entry]:
    entries: list[Entry] = []
    reader = csv.reader(io.StringIO(read_text(path, "labels file"), newline=""))
    for row in reader:
        where = f"line {reader.line_num}"
        if not any(cell.strip() for cell in row):
            continue
        if not entries and [cell.strip().lower() for cell in row] == ["image", "labels"]:
            continue
        if len(row) != 2:
            raise ValueError(
                f"{path}: {where}: expected 2 fields 'image,labels' (labels separated by "
                f"';' or spaces), got {len(row)}"
            )
        entries.append((where, row[0].strip(), _class_list(row[1])))
    return entries


def _read_json(path: Path) -> list[Entry]:
    try:
        data = json.loads(read_text(path, "labels file"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected an object {{image: [class names]}}")
    entries: list[Entry] = []
    for image, names in data.items():
        where = f"entry {image!r}"
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"{path}: {where}: expected a list of class names")
        entries.append((where, image, [n.strip() for n in names if n.strip()]))
    return entries


LABEL_OUTPUTS = ("masks", "cams", "coco", "overlays")
"""The folders of images that ``adcam label`` writes beside its ``run.json``."""


def _list_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursive), relative, sorted; hidden entries and the
    outputs of ``adcam label`` (`LABEL_OUTPUTS` beside a ``run.json``) are skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        outputs = LABEL_OUTPUTS if "run.json" in filenames else ()
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in outputs]
        for name in filenames:
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES:
                found.append((Path(dirpath) / name).relative_to(folder))
    return sorted(found)


def _item_id(relative: Path) -> str:
    return relative.with_suffix("").as_posix()


def _relative_image(image: str) -> Path:
    """A labels file's IMAGE as a path inside the image folder. Raises ValueError (without
    the file and row, which the caller adds) for an empty field, an absolute path or one with
    a ``..`` part: its id would name output files outside the output folders."""
    path = Path(image)
    if not image:
        raise ValueError("empty image field")
    if path.is_absolute() or ".." in path.parts:
        raise ValueError(f"image {image!r} must be a path inside the image folder")
    return path


def _row_error(names: list[str], index: dict[str, int], folder: Path, image: str) -> str | None:
    """What is wrong with one labels-file row (image relative to folder), or None."""
    if not names:
        return f"image {image!r} has no labels"
    unknown = [n for n in names if n not in index]
    if unknown:
        return f"unknown class {unknown[0]!r} (not in the class list)"
    if not (folder / image).is_file():
        return f"image {image!r} not found in {folder}"
    return None


class FolderDataset(ImageDataset):
    """Images of a folder, labelled by a CSV/JSON file or unlabeled (see the module doc).

    image_dir: the folder; labels_file: CSV or JSON, or None for unlabeled images;
    classes_file: one class name per line, fixing the order; max_side: images are
    downscaled on load; strict: raise on a bad row at construction (else on loading that
    item). Items have no masks.
    """

    def __init__(
        self,
        image_dir: str | os.PathLike[str],
        labels_file: str | os.PathLike[str] | None = None,
        classes_file: str | os.PathLike[str] | None = None,
        *,
        max_side: int | None = None,
        strict: bool = True,
    ) -> None:
        self.image_dir = Path(image_dir)
        self._errors: dict[int, str] = {}
        self.max_side = max_side
        if not self.image_dir.is_dir():
            raise ValueError(f"{self.image_dir}: image folder not found")
        given = read_class_names(classes_file) if classes_file is not None else None
        if labels_file is None:
            self._files = _list_images(self.image_dir)
            self._labels: list[np.ndarray] | None = None
            self.class_names = given or []
            self.has_labels = False
            self.ids = [_item_id(p) for p in self._files]
            check_unique(self.ids, self.image_dir)
            return

        source = Path(labels_file)
        if not source.is_file():
            raise ValueError(f"{source}: labels file not found")
        entries = _read_json(source) if source.suffix.lower() == ".json" else _read_csv(source)
        if not entries:
            raise ValueError(f"{source}: no labelled images")
        self.class_names = given or sorted({n for _, _, names in entries for n in names})
        index = {name: c for c, name in enumerate(self.class_names)}
        self._files, self._labels, self.ids = [], [], []
        seen: set[str] = set()
        for where, image, names in entries:
            try:
                relative = _relative_image(image)
            except ValueError as e:
                raise ValueError(f"{source}: {where}: {e}") from None
            item = _item_id(relative)
            if item in seen:
                raise ValueError(f"{source}: {where}: id {item!r} appears twice")
            seen.add(item)
            error = _row_error(names, index, self.image_dir, image)
            if error is not None:
                error = f"{source}: {where}: {error}"
                if strict:
                    raise ValueError(error)
                self._errors[len(self.ids)] = error
            self._files.append(relative)
            known = (index[n] for n in names if n in index)
            self._labels.append(multi_hot(known, len(self.class_names)))
            self.ids.append(item)

    def path(self, i: int) -> Path:
        """The image file of item ``i``."""
        return self.image_dir / self._files[self._index(i)]

    def labels(self, i: int) -> np.ndarray | None:
        """Multi-hot labels of item ``i``, or None for an unlabeled folder."""
        i = self._index(i)
        return None if self._labels is None else self._labels[i].copy()

    def mask(self, i: int) -> None:
        """None: a folder has no pixel ground truth."""
        self._index(i)

    def _load(self, i: int) -> Sample:
        if i in self._errors:
            raise ValueError(self._errors[i])
        return Sample(self.ids[i], load_image(self.path(i), self.max_side), self.labels(i))

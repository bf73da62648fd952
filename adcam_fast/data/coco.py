"""MS COCO (2014 layout) reader through pycocotools (imported only when a COCO set is opened).

- Classes: the annotation file's categories sorted by category id; the c-th (0-based) is
  mask value c + 1 (COCO 2014: 80 classes, values 1..80).
- Items: the file's images sorted by image id; an item's id is its ``file_name`` without
  the extension (e.g. ``COCO_train2014_000000000009``).
- Image labels: the categories of all the image's annotations, crowd ones included (the
  class is in the picture). Images without annotations have all-zero labels; they are kept
  unless ``skip_empty=True``.
- Semantic mask, rendered from the instances with ``annToMask``: non-crowd instances are
  painted largest first (pixel area, ties by annotation id), so smaller objects lying on
  bigger ones stay visible; then crowd regions become 255 (ignore) where no non-crowd
  instance was painted. Annotations without a segmentation add a label but no pixels, and
  so do polygons of fewer than three points.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import numpy as np

from adcam_fast.data.base import IGNORE_INDEX, ImageDataset, Sample, check_unique, fit_mask
from adcam_fast.data.images import load_image


def _load_coco(annotations: Path):
    """A ``pycocotools.coco.COCO`` index of ``annotations`` (its progress prints silenced)."""
    try:
        from pycocotools.coco import COCO
    except ImportError as e:
        raise ImportError("coco: datasets need pycocotools (pip install pycocotools)") from e
    if not annotations.is_file():
        raise ValueError(f"{annotations}: annotation file not found")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return COCO(str(annotations))
    except (ValueError, KeyError, TypeError, AssertionError) as e:
        raise ValueError(f"{annotations}: not a COCO instances file ({e})") from e


class CocoDataset(ImageDataset):
    """COCO images with labels and semantic masks rendered from instance annotations.

    images_dir: the folder of the images (e.g. ``train2014/``); annotations: the instances
    JSON (e.g. ``annotations/instances_train2014.json``); skip_empty: drop images without
    annotations; max_side: images are downscaled on load, masks follow.

    ``image_ids[i]`` is item i's COCO image id and ``category_ids[c]`` class c's COCO
    category id (for writing COCO-format results).

    Raises ValueError naming the annotation file for: an unreadable file, no categories, an
    annotation of an unknown category, repeated ids, image files missing from images_dir.
    """

    def __init__(
        self,
        images_dir: str | os.PathLike[str],
        annotations: str | os.PathLike[str],
        *,
        skip_empty: bool = False,
        max_side: int | None = None,
    ) -> None:
        self.images_dir = Path(images_dir)
        self.annotations = Path(annotations)
        if not self.images_dir.is_dir():
            raise ValueError(f"{self.images_dir}: image folder not found")
        coco = _load_coco(self.annotations)
        cat_ids = sorted(coco.getCatIds())
        if not cat_ids:
            raise ValueError(f"{self.annotations}: no categories")
        self._coco = coco
        self._class_of = {cat: c for c, cat in enumerate(cat_ids)}
        self.category_ids = cat_ids
        self.class_names = [str(coco.cats[cat]["name"]) for cat in cat_ids]
        self.max_side = max_side

        present = set(os.listdir(self.images_dir))
        self.image_ids: list[int] = []  # COCO's own image id of each item
        self._label_list: list[np.ndarray] = []
        self.ids = []
        missing = []
        for image_id in sorted(coco.getImgIds()):
            labels = np.zeros(len(cat_ids), dtype=np.float32)
            for ann in coco.imgToAnns[image_id]:
                if ann["category_id"] not in self._class_of:
                    raise ValueError(
                        f"{self.annotations}: annotation {ann.get('id')} has unknown "
                        f"category_id {ann['category_id']}"
                    )
                labels[self._class_of[ann["category_id"]]] = 1.0
            if skip_empty and not labels.any():
                continue
            name = coco.imgs[image_id]["file_name"]
            if name not in present and not (self.images_dir / name).is_file():
                missing.append(name)
            self.image_ids.append(image_id)
            self._label_list.append(labels)
            self.ids.append(Path(name).stem)
        if missing:
            raise ValueError(
                f"{self.annotations}: {len(missing)} image files missing from "
                f"{self.images_dir}, e.g. {missing[0]!r}"
            )
        check_unique(self.ids, self.annotations)

    def path(self, i: int) -> Path:
        """The image file of item ``i``."""
        info = self._coco.imgs[self.image_ids[self._index(i)]]
        return self.images_dir / info["file_name"]

    def labels(self, i: int) -> np.ndarray:
        """Multi-hot labels of item ``i`` (from the annotations, no decode)."""
        return self._label_list[self._index(i)].copy()

    def mask(self, i: int) -> np.ndarray:
        """(height, width) uint8 semantic mask of item ``i`` at the annotated size, rendered
        from its instances (see the module doc)."""
        image_id = self.image_ids[self._index(i)]
        info = self._coco.imgs[image_id]
        mask = np.zeros((info["height"], info["width"]), dtype=np.uint8)
        things, crowds = [], []
        for ann in self._coco.imgToAnns[image_id]:
            region = self._region(ann)
            if region is None:
                continue
            if ann.get("iscrowd", 0):
                crowds.append(region)
            else:
                things.append((-int(region.sum()), ann["id"], region, ann["category_id"]))
        for _, _, region, cat in sorted(things, key=lambda t: t[:2]):
            mask[region] = self._class_of[cat] + 1
        painted = mask > 0
        for region in crowds:
            mask[region & ~painted] = IGNORE_INDEX
        return mask

    def _region(self, ann: dict) -> np.ndarray | None:
        """The pixels of one annotation, or None where it has no segmentation. Polygons of
        fewer than three points or of an odd count of coordinates, which some exports hold,
        are left out. Raises ValueError
        naming the file and the annotation for a segmentation pycocotools cannot render."""
        seg = ann.get("segmentation")
        if isinstance(seg, list):
            seg = [p for p in seg if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0]
            ann = ann | dict(segmentation=seg)
        if not seg:
            return None
        try:
            return self._coco.annToMask(ann).astype(bool)
        except Exception as e:  # pycocotools raises TypeError, or Exception itself
            raise ValueError(
                f"{self.annotations}: annotation {ann.get('id')!r}: cannot render its "
                f"segmentation ({e})"
            ) from e

    def _load(self, i: int) -> Sample:
        path = self.path(i)
        image = load_image(path, self.max_side)
        mask = fit_mask(self.mask(i), image, self.max_side, str(path))
        return Sample(self.ids[i], image, self.labels(i), mask)

"""Per-image outputs of ``adcam label``, each written atomically under the output directory.

    masks/<id>.png      indexed PNG, VOC palette, 0 background, c + 1 class c, 255 ignore
    cams/<id>.npz       maps (C, h, w) float16 normalised at the merge grid, class_ids (C,),
                        size (H, W) of the image: for threshold sweeps and refinement
    coco/<id>.json      one RLE per (image, class); `finish` joins them into coco.json
    overlays/<id>.png   the image with the mask blended in and the class names drawn

An image is complete when every requested file exists; a rerun skips complete images.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, ImageDraw

from adcam_fast.data.images import mask_to_image, voc_palette
from adcam_fast.io import atomic_write


@dataclass(frozen=True)
class LabelResult:
    """Everything written for one image."""

    id: str
    mask: np.ndarray  # (H, W) uint8
    maps: np.ndarray  # (C, h, w) float, normalised
    class_ids: np.ndarray  # (C,) label values (c + 1)
    image: np.ndarray | None = None  # (H, W, 3) uint8, for overlays


_SUFFIX = dict(masks=".png", cams=".npz", coco=".json", overlays=".png")


def coco_image_ids(image_ids: list[str]) -> dict[str, int]:
    """Integer image ids for COCO results: the ids themselves where every one is a decimal
    number and no two are the same number, else each id's position in ``image_ids``."""
    if all(i.isascii() and i.isdigit() for i in image_ids):
        numbers = [int(i) for i in image_ids]
        if len(set(numbers)) == len(numbers):
            return dict(zip(image_ids, numbers, strict=True))
    return {image_id: pos for pos, image_id in enumerate(image_ids)}


def _png(im: Image.Image):
    return lambda f: im.save(f, format="PNG")


class Outputs:
    """The output directory of one labelling run.

    ``redo_before``: while an ``--overwrite`` is in progress, the mtime (ns, by the output
    folder's clock) at which it began: an image whose files are not all newer is not done.
    """

    def __init__(
        self,
        root: str | Path,
        class_names: list[str],
        cams: bool = False,
        coco: bool = False,
        overlays: bool = False,
        category_ids: list[int] | None = None,
        redo_before: int | None = None,
    ) -> None:
        self.root = Path(root)
        self.class_names = class_names
        self.cams, self.coco, self.overlays = cams, coco, overlays
        self.category_ids = category_ids or list(range(1, len(class_names) + 1))
        self.redo_before = redo_before

    def file(self, kind: str, image_id: str) -> Path:
        """``root/<kind>/<id>.<suffix>`` of one output kind (masks, cams, coco, overlays).
        Raises ValueError for an id that would name a file outside that folder."""
        path = PurePosixPath(image_id)
        if not image_id or path.is_absolute() or ".." in path.parts:
            raise ValueError(f"image id {image_id!r} would write outside {self.root / kind}")
        return self.root / kind / f"{image_id}{_SUFFIX[kind]}"

    def files(self, image_id: str, wanted: bool = True) -> list[Path]:
        """The files that make ``image_id`` complete (or, not ``wanted``, the kinds this run
        does not write)."""
        kinds = dict(masks=True, cams=self.cams, coco=self.coco, overlays=self.overlays)
        return [self.file(kind, image_id) for kind, on in kinds.items() if on == wanted]

    def done(self, image_id: str) -> bool:
        """Every file of ``image_id`` is there, and newer than ``redo_before`` if set."""
        if self.redo_before is None:
            return all(p.exists() for p in self.files(image_id))
        try:
            return all(p.stat().st_mtime_ns > self.redo_before for p in self.files(image_id))
        except FileNotFoundError:
            return False

    def write(self, r: LabelResult) -> None:
        """Write every requested output of one image; the mask last, so it marks completion.
        While an overwrite is in progress, the image's files of the other kinds go first:
        they are an earlier run's, which a later run asking for them must not take."""
        if self.redo_before is not None:
            for path in self.files(r.id, wanted=False):
                path.unlink(missing_ok=True)
        if self.cams:

            def save_npz(f):
                np.savez_compressed(
                    f,
                    maps=r.maps.astype(np.float16),
                    class_ids=r.class_ids.astype(np.int64),
                    size=np.array(r.mask.shape, np.int64),
                )

            atomic_write(self.file("cams", r.id), save_npz)
        if self.coco:
            payload = json.dumps(self.rles(r)).encode()
            atomic_write(self.file("coco", r.id), lambda f: f.write(payload))
        if self.overlays:
            if r.image is None:
                raise ValueError(f"{r.id}: overlays need the image")
            atomic_write(self.file("overlays", r.id), _png(self.overlay(r)))
        atomic_write(self.file("masks", r.id), _png(mask_to_image(r.mask)))

    def rles(self, r: LabelResult) -> list[dict]:
        """One COCO result (``COCO.loadRes`` format) per class present in the mask."""
        from pycocotools import mask as mask_utils

        out = []
        for value in np.unique(r.mask):
            if value in (0, 255):
                continue
            rle = mask_utils.encode(np.asfortranarray((r.mask == value).astype(np.uint8)))
            out.append(
                dict(
                    image_id=r.id,
                    category_id=self.category_ids[int(value) - 1],
                    segmentation=dict(size=list(rle["size"]), counts=rle["counts"].decode()),
                    score=1.0,
                )
            )
        return out

    def overlay(self, r: LabelResult, alpha: float = 0.5) -> Image.Image:
        """The image with the mask's palette colours blended in and its class names drawn."""
        colours = np.array(voc_palette(), np.uint8).reshape(-1, 3)[r.mask]
        fg = (r.mask > 0)[..., None]
        blend = np.where(fg, (1 - alpha) * r.image + alpha * colours, r.image).astype(np.uint8)
        im = Image.fromarray(blend)
        draw = ImageDraw.Draw(im)
        y = 2
        for value in np.unique(r.mask):
            if value in (0, 255):
                continue
            draw.text(
                (3, y), self.class_names[int(value) - 1], fill=tuple(colours[r.mask == value][0])
            )
            y += 12
        return im

    def finish(self, image_ids: list[str], numeric_ids: dict[str, int] | None = None) -> None:
        """Join the per-image COCO fragments of ``image_ids`` into ``coco.json``.

        COCO wants integer image ids: ``numeric_ids`` maps ours to theirs (a COCO dataset's
        own ids); by default, `coco_image_ids`.
        """
        if not self.coco:
            return
        numeric_ids = numeric_ids or coco_image_ids(image_ids)
        results = []
        for image_id in image_ids:
            frag = self.file("coco", image_id)
            if frag.exists():
                num = numeric_ids[image_id]
                results += [ann | dict(image_id=num) for ann in json.loads(frag.read_text())]
        payload = json.dumps(results).encode()
        atomic_write(self.root / "coco.json", lambda f: f.write(payload))

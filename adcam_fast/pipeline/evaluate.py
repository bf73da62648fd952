"""Seed and mask quality: mIoU, per-class IoU, and the paper's FP / FN rates (Table 3).

For each class c over the whole set, with TP, FP, FN counted in pixels (ground truth 255
ignored):

    IoU_c = TP_c / U_c,   FP_c = FP_c / U_c,   FN_c = FN_c / U_c,   U_c = TP_c + FP_c + FN_c

averaged over the classes with U_c > 0, so ``mIoU + FP + FN = 1``. Background (0) is a class.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from adcam_fast.data.base import IGNORE_INDEX
from adcam_fast.data.images import load_mask, scaled_size

SWEEP = np.round(np.arange(0.0, 0.6001, 0.01), 2)
"""Background thresholds of the seed sweep: 0.00 to 0.60 in steps of 0.01."""


def confusion(pred: np.ndarray, gt: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) pixel counts, rows = ground truth, columns = prediction; gt == 255 ignored.

    Prediction values outside [0, C) (such as 255 in a mask) count as background.
    """
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in size")
    keep = gt != IGNORE_INDEX
    g = gt[keep].astype(np.int64)
    if g.size and g.max() >= num_classes:
        raise ValueError(f"ground truth holds class {g.max()} but num_classes is {num_classes}")
    p = pred[keep].astype(np.int64)
    p = np.where((p >= 0) & (p < num_classes), p, 0)
    return np.bincount(g * num_classes + p, minlength=num_classes**2).reshape(
        num_classes, num_classes
    )


@dataclass(frozen=True)
class Scores:
    """Set-level scores from a confusion matrix; NaN for classes absent from both sides."""

    iou: np.ndarray
    fp: np.ndarray
    fn: np.ndarray

    @classmethod
    def from_confusion(cls, conf: np.ndarray) -> Scores:
        tp = np.diag(conf).astype(np.float64)
        fp = conf.sum(0) - tp
        fn = conf.sum(1) - tp
        union = tp + fp + fn
        with np.errstate(invalid="ignore", divide="ignore"):
            return cls(iou=tp / union, fp=fp / union, fn=fn / union)

    @property
    def miou(self) -> float:
        return float(np.nanmean(self.iou))

    @property
    def fp_rate(self) -> float:
        return float(np.nanmean(self.fp))

    @property
    def fn_rate(self) -> float:
        return float(np.nanmean(self.fn))

    def as_dict(self, class_names: list[str]) -> dict:
        """JSON-ready summary; ``class_names`` includes the background at index 0."""
        per_class = {
            name: None if np.isnan(v) else float(v)
            for name, v in zip(class_names, self.iou, strict=True)
        }
        return dict(miou=self.miou, fp=self.fp_rate, fn=self.fn_rate, iou=per_class)


def best_of_sweep(
    cams: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]],
    num_classes: int,
    thresholds: np.ndarray = SWEEP,
) -> tuple[float, Scores, dict[float, float]]:
    """Seed protocol: the background threshold with the best mIoU.

    cams yields ``(maps, class_ids, gt)`` per image: maps (C, H, W) normalised at the ground
    truth's size, class_ids (C,) label values, gt (H, W). A pixel's seed is its best class
    when that class's score exceeds the threshold, else background (ties go to background,
    as in `adcam_fast.seed_labels`). Returns (best threshold, its scores, mIoU per threshold).
    """
    conf = np.zeros((len(thresholds), num_classes, num_classes), dtype=np.int64)
    for maps, class_ids, gt in cams:
        if len(class_ids):
            top, score = class_ids[maps.argmax(0)], maps.max(0)
        else:
            top, score = np.zeros(gt.shape, np.int64), np.zeros(gt.shape, np.float32)
        for t, thr in enumerate(thresholds):  # in the maps' precision, as seed_labels does
            seeds = np.where(score > np.asarray(thr, score.dtype), top, 0)
            conf[t] += confusion(seeds, gt, num_classes)
    scores = [Scores.from_confusion(c) for c in conf]
    best = int(np.argmax([s.miou for s in scores]))
    curve = {float(thr): s.miou for thr, s in zip(thresholds, scores, strict=True)}
    return float(thresholds[best]), scores[best], curve


def format_table(rows: dict[str, Scores]) -> str:
    """A plain-text table of mIoU / FP / FN (percent) per named method or run."""
    width = max(8, *(len(n) for n in rows))
    lines = [f"{'':{width}}  {'mIoU':>6}  {'FP':>6}  {'FN':>6}"]
    for name, s in rows.items():
        lines.append(
            f"{name:{width}}  {100 * s.miou:6.2f}  {100 * s.fp_rate:6.2f}  {100 * s.fn_rate:6.2f}"
        )
    return "\n".join(lines)


def _ground_truth(dataset, i: int, num_classes: int) -> np.ndarray:
    """Item i's ground-truth mask; ValueError naming it when it has none, or a value that is
    neither 255 nor below ``num_classes``."""
    mask = dataset.mask(i)
    if mask is None:
        raise ValueError(f"{dataset.ids[i]}: the collection has no ground-truth mask for it")
    values = mask[mask != IGNORE_INDEX]
    if values.size and values.max() >= num_classes:
        raise ValueError(
            f"{dataset.ids[i]}: ground truth holds class {values.max()} but the collection has "
            f"{num_classes - 1} classes"
        )
    return mask


def _prediction(path: Path, gt: np.ndarray) -> np.ndarray:
    """The mask at ``path`` at the ground truth's size: one written downscaled (``adcam label
    --max-side``) is brought back up by nearest neighbour. ValueError naming the file when
    its size is no downscale of the ground truth's."""
    pred = load_mask(path)
    if pred.shape != gt.shape:
        if scaled_size(*gt.shape, max(pred.shape)) != pred.shape:
            raise ValueError(
                f"{path}: prediction {pred.shape} is no downscale of its ground truth {gt.shape}"
            )
        size = (gt.shape[1], gt.shape[0])
        pred = np.asarray(Image.fromarray(pred).resize(size, Image.Resampling.NEAREST))
    return pred


def _check_some_found(missing: list[str], dataset, folder: Path, what: str) -> None:
    """ValueError naming ``folder`` when it holds ``what`` for none of the dataset's images."""
    if missing and len(missing) == len(dataset.ids):
        raise ValueError(
            f"{folder}: no {what} for any of the {len(missing)} images of the collection "
            "(another collection or split?)"
        )


def evaluate_masks(pred_dir: str | Path, dataset) -> tuple[Scores, list[str]]:
    """Scores of ``pred_dir/masks/<id>.png`` against the dataset's ground truth.

    Returns the scores and the ids with no prediction (counted as all background). Raises
    ValueError when no image has one (``pred_dir`` labelled another collection).
    """
    n = len(dataset.class_names) + 1
    conf = np.zeros((n, n), np.int64)
    missing = []
    for i, image_id in enumerate(dataset.ids):
        gt = _ground_truth(dataset, i, n)
        path = Path(pred_dir) / "masks" / f"{image_id}.png"
        if path.exists():
            pred = _prediction(path, gt)
        else:
            missing.append(image_id)
            pred = np.zeros_like(gt)
        conf += confusion(pred, gt, n)
    _check_some_found(missing, dataset, Path(pred_dir) / "masks", "mask")
    return Scores.from_confusion(conf), missing


def saved_maps(pred_dir: str | Path) -> Path:
    """``pred_dir/cams``; ValueError when it is not there (the run did not save maps)."""
    cams_dir = Path(pred_dir) / "cams"
    if not cams_dir.is_dir():
        raise ValueError(f"{cams_dir}: no saved maps (label with --save-cams to sweep thresholds)")
    return cams_dir


def sweep_cams(
    pred_dir: str | Path, dataset
) -> tuple[float, Scores, dict[float, float], list[str]]:
    """The seed protocol on ``pred_dir/cams/<id>.npz`` (see `best_of_sweep`), and the ids
    without maps (an image that failed to label), whose seeds count as all background.
    Raises ValueError when ``pred_dir`` holds no maps of the collection at all."""
    import torch
    import torch.nn.functional as F

    cams_dir = saved_maps(pred_dir)
    missing: list[str] = []

    def items():
        for i, image_id in enumerate(dataset.ids):
            gt = _ground_truth(dataset, i, len(dataset.class_names) + 1)
            path = cams_dir / f"{image_id}.npz"
            if not path.exists():
                missing.append(image_id)
                yield np.zeros((0, *gt.shape), np.float32), np.zeros(0, np.int64), gt
                continue
            z = np.load(path)
            maps = torch.from_numpy(z["maps"].astype(np.float32))
            if len(maps):
                maps = F.interpolate(maps[None], size=gt.shape, mode="bilinear")[0]
            yield maps.numpy(), z["class_ids"], gt

    best = best_of_sweep(items(), len(dataset.class_names) + 1)
    _check_some_found(missing, dataset, cams_dir, "maps")
    return (*best, missing)

"""Validation metrics: multi-label mAP and F1, and confusion-matrix mIoU.

Conventions: scores and targets are (num_samples, K) arrays or tensors; targets are 0/1.
Per-class values of classes that cannot be scored (no positive sample for AP; no positive,
no prediction for F1; zero union for IoU) are NaN and left out of the means.
"""

from __future__ import annotations

import numpy as np
from torch import Tensor

from adcam_fast.pipeline.evaluate import Scores, confusion

__all__ = ["ConfusionMatrix", "average_precision", "f1_scores", "mean_average_precision"]


def _as_numpy(x: Tensor | np.ndarray, name: str) -> np.ndarray:
    arr = x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be (num_samples, K), got shape {arr.shape}")
    return arr.astype(np.float64)


def _nanmean(values: np.ndarray) -> float:
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else float("nan")


def average_precision(scores: Tensor | np.ndarray, targets: Tensor | np.ndarray) -> np.ndarray:
    """Per-class non-interpolated average precision, shape (K,).

    ``AP = sum_n (R_n - R_{n-1}) P_n`` over the distinct score thresholds in decreasing order
    (tied scores form one threshold), the definition of scikit-learn's
    ``average_precision_score``. NaN for a class without positives, or with a score that
    is not finite (a diverged model ranks nothing).
    """
    s, t = _as_numpy(scores, "scores"), _as_numpy(targets, "targets")
    if s.shape != t.shape:
        raise ValueError(f"scores {s.shape} and targets {t.shape} differ in shape")
    ap = np.full(s.shape[1], np.nan)
    for k in range(s.shape[1]):
        order = np.argsort(-s[:, k], kind="stable")
        sk, tk = s[order, k], t[order, k]
        if tk.sum() == 0 or not np.isfinite(sk).all():
            continue
        last = np.r_[np.flatnonzero(np.diff(sk)), sk.size - 1]  # end of each tie run
        tp = np.cumsum(tk)[last]
        fp = np.cumsum(1.0 - tk)[last]
        recall = tp / tp[-1]
        precision = tp / (tp + fp)
        ap[k] = float(np.sum(np.diff(recall, prepend=0.0) * precision))
    return ap


def mean_average_precision(scores: Tensor | np.ndarray, targets: Tensor | np.ndarray) -> float:
    """Mean of :func:`average_precision` over the classes that have positives; NaN if none
    has, or if any score is not finite (so a partly diverged model never looks best)."""
    if not np.isfinite(_as_numpy(scores, "scores")).all():
        return float("nan")
    return _nanmean(average_precision(scores, targets))


def f1_scores(
    probs: Tensor | np.ndarray, targets: Tensor | np.ndarray, threshold: float = 0.5
) -> dict[str, float]:
    """F1 of the predictions ``probs >= threshold``.

    Returns ``{"micro": F1 of the pooled counts, "macro": mean per-class F1}``; per-class F1 is
    ``2TP / (2TP + FP + FN)`` and NaN (skipped) for a class with no positive and no prediction.
    """
    p, t = _as_numpy(probs, "probs"), _as_numpy(targets, "targets")
    if p.shape != t.shape:
        raise ValueError(f"probs {p.shape} and targets {t.shape} differ in shape")
    pred = p >= threshold
    pos = t > 0.5
    tp = (pred & pos).sum(0).astype(np.float64)
    fp = (pred & ~pos).sum(0).astype(np.float64)
    fn = (~pred & pos).sum(0).astype(np.float64)
    denom = 2 * tp + fp + fn
    per_class = np.divide(2 * tp, denom, out=np.full_like(tp, np.nan), where=denom > 0)
    total = denom.sum()
    micro = float(2 * tp.sum() / total) if total > 0 else float("nan")
    return {"micro": micro, "macro": _nanmean(per_class)}


class ConfusionMatrix:
    """Accumulated confusion matrix of label maps (rows: truth, columns: prediction), built on
    :func:`adcam_fast.pipeline.evaluate.confusion`: truth ``255`` is skipped, a prediction
    outside ``[0, num_classes)`` counts as background, a truth value ``>= num_classes`` raises
    ValueError. Background (0) is a class."""

    def __init__(self, num_classes: int) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update(self, pred: Tensor | np.ndarray, target: Tensor | np.ndarray) -> None:
        """Add one or a batch of label maps; ``pred`` and ``target`` have equal shapes."""
        p = pred.detach().cpu().numpy() if isinstance(pred, Tensor) else np.asarray(pred)
        t = target.detach().cpu().numpy() if isinstance(target, Tensor) else np.asarray(target)
        self.matrix += confusion(p, t, self.num_classes)

    def iou(self) -> np.ndarray:
        """Per-class IoU ``TP / (TP + FP + FN)``, shape (num_classes,); NaN where the union is
        empty (class neither present nor predicted)."""
        return Scores.from_confusion(self.matrix).iou

    def miou(self) -> float:
        """Mean IoU over the classes with a non-empty union (NaN if none)."""
        return _nanmean(self.iou())

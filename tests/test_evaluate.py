"""mIoU / FP / FN and the threshold sweep on hand-made masks with hand-computed answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adcam_fast.cam import seed_labels
from adcam_fast.pipeline.evaluate import Scores, best_of_sweep, confusion, format_table

GT = np.array([[0, 0, 1, 1], [0, 2, 2, 255]], np.uint8)
PRED = np.array([[0, 1, 1, 1], [2, 2, 0, 1]], np.uint8)


def test_confusion_counts_and_ignores_255():
    conf = confusion(PRED, GT, 3)
    # gt 0: pred 0,1,2 ; gt 1: pred 1,1 ; gt 2: pred 2,0 ; (1,3) ignored
    expected = np.array([[1, 1, 1], [0, 2, 0], [1, 0, 1]])
    np.testing.assert_array_equal(conf, expected)


def test_scores_by_hand():
    s = Scores.from_confusion(confusion(PRED, GT, 3))
    # class 0: TP 1 FP 1 FN 2 (U 4); class 1: TP 2 FP 1 FN 0 (U 3); class 2: TP 1 FP 1 FN 1
    np.testing.assert_allclose(s.iou, [1 / 4, 2 / 3, 1 / 3])
    np.testing.assert_allclose(s.fp, [1 / 4, 1 / 3, 1 / 3])
    np.testing.assert_allclose(s.fn, [2 / 4, 0, 1 / 3])
    assert s.miou == pytest.approx((1 / 4 + 2 / 3 + 1 / 3) / 3)
    assert s.miou + s.fp_rate + s.fn_rate == pytest.approx(1.0)


def test_absent_classes_are_left_out_of_the_mean():
    s = Scores.from_confusion(confusion(np.zeros((2, 2), np.uint8), np.zeros((2, 2), np.uint8), 4))
    assert s.miou == 1.0 and np.isnan(s.iou[1:]).all()


def test_confusion_rejects_size_mismatch_and_unknown_classes():
    with pytest.raises(ValueError, match="differ in size"):
        confusion(PRED[:, :3], GT, 3)
    with pytest.raises(ValueError, match="ground truth holds class 2"):
        confusion(PRED, GT, 2)


def test_sweep_picks_the_best_threshold():
    # One class; its map is 0.8 on the object and 0.35 on a false-positive region.
    gt = np.array([[1, 1, 0, 0]], np.uint8)
    maps = np.array([[[0.8, 0.8, 0.35, 0.1]]], np.float32)
    thr, best, curve = best_of_sweep([(maps, np.array([1]), gt)], 2)
    assert best.miou == 1.0
    assert 0.35 <= thr < 0.8
    assert curve[0.0] == pytest.approx((0 + 2 / 4) / 2)  # everything labelled 1
    assert curve[thr] == 1.0


def test_format_table_percent():
    s = Scores.from_confusion(confusion(PRED, GT, 3))
    text = format_table({"adcam": s})
    assert "adcam" in text and f"{100 * s.miou:6.2f}" in text


def test_sweep_breaks_ties_as_seed_labels_does():
    """A map equal to the threshold (in the maps' float32) is background in both."""
    thr = 0.3
    maps = np.full((1, 2, 2), np.float32(thr), np.float32)
    gt = np.zeros((2, 2), np.uint8)
    seeds = seed_labels(torch.from_numpy(maps), [1], thr)
    assert not seeds.any()
    _, best, _ = best_of_sweep([(maps, np.array([1]), gt)], 2, np.array([thr]))
    assert best.miou == 1.0  # every pixel background, as the ground truth

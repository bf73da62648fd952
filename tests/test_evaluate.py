"""mIoU / FP / FN and the threshold sweep on hand-made masks with hand-computed answers, and
`evaluate_masks` on masks written by the tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from adcam_fast.cam import seed_labels
from adcam_fast.data import make_synthetic, open_dataset
from adcam_fast.data.images import mask_to_image
from adcam_fast.pipeline.evaluate import (
    Scores,
    best_of_sweep,
    confusion,
    evaluate_masks,
    format_table,
)

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


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    root = make_synthetic(tmp_path_factory.mktemp("syn"), 4, seed=5, size=48, val_fraction=0.0)
    return open_dataset(f"synthetic:{root}")


def _write_masks(pred: Path, dataset, make) -> None:
    (pred / "masks").mkdir(parents=True)
    for i, image_id in enumerate(dataset.ids):
        mask_to_image(make(dataset.mask(i))).save(pred / "masks" / f"{image_id}.png")


def test_evaluate_masks_scores_what_is_written(collection, tmp_path):
    """The ground truth itself scores 1; all background scores, by hand, the background's IoU
    over the classes present; the ground truth downscaled (as under --max-side) scores near 1."""
    masks = [collection.mask(i) for i in range(len(collection))]
    _write_masks(tmp_path / "same", collection, lambda m: np.where(m == 255, 0, m))
    scores, missing = evaluate_masks(tmp_path / "same", collection)
    assert missing == [] and scores.miou == 1.0 and scores.fp_rate == scores.fn_rate == 0.0

    _write_masks(tmp_path / "zeros", collection, np.zeros_like)
    scored = np.concatenate([m[m != 255] for m in masks])
    present = np.unique(scored)
    assert len(present) > 1  # the by-hand answer below needs some class besides background
    scores, _ = evaluate_masks(tmp_path / "zeros", collection)
    assert scores.miou == pytest.approx((scored == 0).mean() / len(present))

    def half(m: np.ndarray) -> np.ndarray:
        return np.asarray(Image.fromarray(np.where(m == 255, 0, m)).resize((24, 24), 0))

    _write_masks(tmp_path / "half", collection, half)
    scores, _ = evaluate_masks(tmp_path / "half", collection)
    assert 0.8 < scores.miou < 1.0

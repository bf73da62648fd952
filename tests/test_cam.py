"""Eq. 2 normalisation, the multi-scale + flip merge, and seed labels."""

from __future__ import annotations

import pytest
import torch

import adcam_fast


def test_normalize_cam_relu_and_unit_peak():
    F = torch.tensor([[[-1.0, 2.0], [4.0, 0.5]], [[-3.0, -1.0], [-2.0, -0.5]]])
    cam = adcam_fast.normalize_cam(F)
    expected = torch.tensor([[[0.0, 0.5], [1.0, 0.125]], [[0.0, 0.0], [0.0, 0.0]]])
    torch.testing.assert_close(cam, expected)


def test_normalize_cam_flat_maps():
    maps = torch.tensor([[1.0, 3.0, 0.0], [0.0, 0.0, 0.0]])
    cam = adcam_fast.normalize_cam(maps, spatial_dims=1)
    torch.testing.assert_close(cam, torch.tensor([[1 / 3, 1.0, 0.0], [0.0, 0.0, 0.0]]))


def test_normalize_cam_rejects_missing_dims():
    with pytest.raises(ValueError, match="maps must have a class dim"):
        adcam_fast.normalize_cam(torch.rand(4, 4), spatial_dims=2)


def test_merge_scales_resizes_unflips_and_normalises():
    base = torch.zeros(1, 4, 4)
    base[0, 1, 0] = 1.0
    small = torch.nn.functional.avg_pool2d(base[None], 2)[0]  # the same map at half size
    flipped = base.flip(-1)
    merged = adcam_fast.merge_scales([base, small, flipped], (4, 4), flipped=[False, False, True])
    assert merged.shape == (1, 4, 4)
    assert merged.max() == pytest.approx(1.0)
    # The flipped copy was flipped back: the peak stays in the left column.
    assert merged[0].argmax().item() == 4


def test_merge_scales_rejects_mismatched_flags():
    with pytest.raises(ValueError, match="flipped has 1 entries for 2 maps"):
        adcam_fast.merge_scales([torch.rand(1, 2, 2)] * 2, (2, 2), flipped=[True])


def test_seed_labels_background_threshold_and_ids():
    maps = torch.tensor([[[0.9, 0.2], [0.4, 0.1]], [[0.5, 0.6], [0.4, 0.05]]])
    seeds = adcam_fast.seed_labels(maps, [3, 15], bg_threshold=0.3)
    # Ties with the background go to the background; equal classes go to the first.
    assert seeds.tolist() == [[3, 15], [3, 0]]
    assert adcam_fast.seed_labels(maps, [3, 15], bg_threshold=0.6).tolist() == [[3, 0], [0, 0]]
    assert adcam_fast.seed_labels(maps, [3, 15], bg_threshold=0.95).tolist() == [[0, 0], [0, 0]]


def test_seed_labels_without_classes_is_background():
    assert adcam_fast.seed_labels(torch.zeros(0, 2, 3), [], 0.1).tolist() == [[0] * 3] * 2


def test_seed_labels_rejects_mismatched_ids():
    with pytest.raises(ValueError, match="one class id per map"):
        adcam_fast.seed_labels(torch.rand(2, 3, 3), [1], 0.3)

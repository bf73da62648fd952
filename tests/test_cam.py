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
    """Each map resized to the size (bilinear), a flipped one flipped back, summed, Eq. 2."""
    torch.manual_seed(0)
    base, small = torch.rand(2, 4, 6), torch.rand(2, 2, 3)  # two classes, left/right uneven
    mirrored = torch.rand(2, 4, 6)  # from the flipped image
    merged = adcam_fast.merge_scales([base, small, mirrored], (4, 6), flipped=[False, False, True])
    up = torch.nn.functional.interpolate(small[None], (4, 6), mode="bilinear")[0]
    total = base + up + mirrored.flip(-1)
    torch.testing.assert_close(merged, total / total.amax((-2, -1), keepdim=True))


def test_merge_scales_flips_back_only_what_is_flipped():
    peak = torch.zeros(1, 3, 5)
    peak[0, 1, 0] = 1.0  # the left edge of the flipped image is the right edge of the image
    assert adcam_fast.merge_scales([peak], (3, 5), flipped=[True])[0].argmax().item() == 9
    assert adcam_fast.merge_scales([peak], (3, 5))[0].argmax().item() == 5


def test_merge_scales_keeps_float64():
    maps = [torch.rand(2, 3, 3, dtype=torch.float64)]
    assert adcam_fast.merge_scales(maps, (5, 5)).dtype == torch.float64


def test_merge_scales_rejects_mismatched_flags():
    with pytest.raises(ValueError, match="flipped has 1 entries for 2 maps"):
        adcam_fast.merge_scales([torch.rand(1, 2, 2)] * 2, (2, 2), flipped=[True])


@pytest.mark.parametrize("other", [(1, 4, 4), (2, 3, 4, 4), (4, 4)])
def test_merge_scales_rejects_maps_of_other_classes(other):
    """A map of another class count or batch is named, not broadcast into the sum."""
    with pytest.raises(ValueError, match=r"maps\[1\] must be .* maps\[0\] \(3,\)"):
        adcam_fast.merge_scales([torch.rand(3, 4, 4), torch.rand(other)], (4, 4))


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

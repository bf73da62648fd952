"""Class activation maps: Eq. 2 normalisation, multi-scale + flip merge, seed labels."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

CAM_EPS = 1e-5
"""Floor of the per-class maximum in Eq. 2, so an all-zero map stays zero."""


def normalize_cam(maps: Tensor, spatial_dims: int = 2, eps: float = CAM_EPS) -> Tensor:
    """Eq. 2: ``CAM_k = ReLU(F_k) / max(max_x ReLU(F_k), eps)``.

    maps: (..., K, *spatial) with ``spatial_dims`` trailing spatial dimensions (2 for h×w
    maps, 1 for maps flattened to N). Each class map's maximum becomes 1 unless it is
    below eps.
    """
    if spatial_dims < 1 or maps.ndim < spatial_dims + 1:
        raise ValueError(
            f"maps must have a class dim and {spatial_dims} spatial dims, got {tuple(maps.shape)}"
        )
    pos = maps.relu()
    peak = pos.flatten(-spatial_dims).amax(-1).clamp_min(eps)
    return pos / peak.reshape(*peak.shape, *([1] * spatial_dims))


def merge_scales(
    maps: Sequence[Tensor], size: tuple[int, int], flipped: Sequence[bool] | None = None
) -> Tensor:
    """Multi-scale + flip merge: resize each (..., K, h_s, w_s) map to ``size``, sum, apply Eq. 2.

    ``flipped[s]`` marks a map computed on the horizontally flipped image; it is flipped
    back before summing. Bilinear resizing, ``align_corners=False``; float32, or float64 for
    float64 maps. Every map has the leading (..., K) of the first.
    """
    if not maps:
        raise ValueError("maps must hold at least one scale")
    flipped = [False] * len(maps) if flipped is None else list(flipped)
    if len(flipped) != len(maps):
        raise ValueError(f"flipped has {len(flipped)} entries for {len(maps)} maps")
    lead = maps[0].shape[:-2]
    total = None
    for s, (m, flip) in enumerate(zip(maps, flipped, strict=True)):
        if m.ndim < 3 or m.shape[:-2] != lead:
            raise ValueError(
                f"maps[{s}] must be (..., K, h, w) with the (..., K) of maps[0] {tuple(lead)}, "
                f"got {tuple(m.shape)}"
            )
        r = F.interpolate(
            m.reshape(-1, 1, *m.shape[-2:]).to(torch.promote_types(m.dtype, torch.float32)),
            size=size,
            mode="bilinear",
            align_corners=False,
        ).reshape(*lead, *size)
        r = r.flip(-1) if flip else r
        total = r if total is None else total + r
    return normalize_cam(total)


def seed_labels(maps: Tensor, class_ids: Tensor | Sequence[int], bg_threshold: float) -> Tensor:
    """Seed label map: argmax over ``[bg_threshold] + [M'_c for the image's classes]``.

    maps: (C, H, W) normalised maps of the image's C classes (C may be 0); class_ids: the
    C label values written for them. Background is 0 and wins ties. Returns (H, W) int64.
    """
    ids = torch.as_tensor(class_ids, dtype=torch.long, device=maps.device)
    if maps.ndim != 3 or ids.ndim != 1 or ids.numel() != maps.shape[0]:
        raise ValueError(
            f"maps must be (C, H, W) with one class id per map, got maps {tuple(maps.shape)} "
            f"and {ids.numel()} class ids"
        )
    bg = maps.new_full((1, *maps.shape[1:]), bg_threshold)
    choice = torch.cat([bg, maps]).argmax(0)
    return torch.cat([ids.new_zeros(1), ids])[choice]

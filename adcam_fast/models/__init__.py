"""Backbones. Importing this package registers the Conformer variants with timm."""

from adcam_fast.models.conformer import (
    Conformer,
    checkpoint_filter_fn,
    conformer_base_patch16,
    conformer_nano_patch16,
    conformer_small_patch16,
    conformer_tiny_patch16,
    parameter_branch,
)

__all__ = [
    "Conformer",
    "checkpoint_filter_fn",
    "conformer_base_patch16",
    "conformer_nano_patch16",
    "conformer_small_patch16",
    "conformer_tiny_patch16",
    "parameter_branch",
]

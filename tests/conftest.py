"""Shared fixtures: the label tests' nano checkpoint and synthetic collection. Without a CUDA
GPU, Triton kernels run on CPU tensors through Triton's interpreter, which must be switched
on before anything imports triton."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def random_attention(*shape: int, scale: float = 3.0, generator=None, dtype=torch.float64):
    """Row-stochastic attention: softmax of scaled normal noise, shape (..., N, N)."""
    logits = torch.randn(*shape, generator=generator, dtype=torch.float64) * scale
    return logits.softmax(-1).to(dtype)


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A random-weight nano classifier for the synthetic classes, saved as a checkpoint."""
    import timm

    from adcam_fast.data import SyntheticDataset
    from adcam_fast.training.checkpoint import classifier_config, save_classifier

    torch.manual_seed(0)
    names = SyntheticDataset(1).class_names
    config = classifier_config("conformer_nano_patch16", len(names), crop=64)
    model = timm.create_model(config["model"], num_classes=len(names), drop_last_block=True)
    return save_classifier(model, config, names, tmp_path_factory.mktemp("ckpt") / "nano.pth")


@pytest.fixture(scope="module")
def collection(tmp_path_factory) -> Path:
    """A synthetic collection of 12 images of 64 px (VOC layout, train split only)."""
    from adcam_fast.data import make_synthetic

    return make_synthetic(tmp_path_factory.mktemp("syn"), 12, seed=3, size=64, val_fraction=0.0)


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

"""Shared fixtures. Without a CUDA GPU, Triton kernels run on CPU tensors through Triton's
interpreter, which must be switched on before anything imports triton."""

from __future__ import annotations

import os
import sys

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


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

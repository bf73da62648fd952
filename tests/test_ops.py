"""The torch backend against the float64 reference, dispatch, and input validation."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import random_attention

import adcam_fast
from adcam_fast import ops, reference


def dense(weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Scatter a sparse Ã (weights, indices) into its dense (..., N, N) form."""
    n = indices.shape[-2]
    return weights.new_zeros(*indices.shape[:-1], n).scatter_add_(-1, indices, weights)


def block_attention(n: int, block: int) -> torch.Tensor:
    """Uniform attention inside consecutive blocks: every S entry in a block ties at 1."""
    A = torch.zeros(n, n, dtype=torch.float64)
    for s in range(0, n, block):
        A[s : s + block, s : s + block] = 1.0 / len(range(s, min(s + block, n)))
    return A


@pytest.mark.parametrize(
    ("lead", "n", "k", "steps"),
    [((), 16, 4, 2), ((3,), 37, 5, 2), ((2, 2), 64, 50, 1), ((2,), 144, 50, 2), ((1,), 20, 50, 3)],
)
def test_torch_equals_reference_float64(gen, lead, n, k, steps):
    A = random_attention(*lead, n, n, generator=gen)
    cams = torch.rand(*lead, 3, n, generator=gen, dtype=torch.float64)
    expected = adcam_fast.adcam(A, cams, k=k, steps=steps, backend="reference")
    out = adcam_fast.adcam(A, cams, k=k, steps=steps, backend="torch")
    assert out.shape == expected.shape and out.dtype == torch.float64
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    w, idx = ops.refine_sparse(A, k)
    torch.testing.assert_close(
        dense(w, idx), reference.refine_attention(A, k), rtol=1e-12, atol=1e-15
    )


@pytest.mark.parametrize("k", [1, 3, 5, 8])
def test_torch_tie_break_matches_reference(k):
    A = block_attention(23, 5)
    A[7] = 0
    A[7, [2, 9, 11]] = 1 / 3  # a row with mixed ties
    w, idx = ops.refine_sparse(A, k)
    torch.testing.assert_close(dense(w, idx), reference.refine_attention(A, k), rtol=0, atol=1e-15)


def test_topk_columns_prefers_smaller_columns_on_ties():
    S = torch.tensor([[0.2, 0.7, 0.7, 0.9, 0.7, 0.7]])
    idx = ops.topk_columns(S.clone(), 3)
    assert sorted(idx[0].tolist()) == [1, 2, 3]


def test_sparse_refine_shape_and_self_rows():
    A = torch.eye(4, dtype=torch.float64)
    A[1] = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    w, idx = ops.refine_sparse(A, 1)
    assert w.shape == idx.shape == (4, 1)
    assert idx[:, 0].tolist() == [0, 1, 2, 3] and w[:, 0].tolist() == [1.0] * 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_torch_low_precision_inputs(gen, dtype):
    """A in low precision is computed in float32: the float64 reference on the same (rounded)
    A, to float32's error. The seed's rows have no near-tie at the k-th place."""
    A = random_attention(2, 48, 48, generator=gen).to(dtype)
    cams = torch.rand(2, 2, 48, generator=gen)
    out = adcam_fast.adcam(A, cams, k=10, backend="torch")
    assert out.dtype == torch.float32
    want = reference.adcam(A.double(), cams.double(), 10, 2)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)
    # Mass is conserved whatever the precision of A.
    torch.testing.assert_close(out.sum(-1), cams.sum(-1), rtol=1e-5, atol=1e-5)


def test_auto_uses_torch_on_cpu(gen):
    A = random_attention(10, 10, generator=gen)
    cams = torch.rand(2, 10, generator=gen, dtype=torch.float64)
    assert ops.resolve_backend("auto", A.device) == "torch"
    want = reference.adcam(A, cams, 3, 2)
    torch.testing.assert_close(adcam_fast.adcam(A, cams, k=3), want, rtol=1e-12, atol=1e-12)


def test_gpus_older_than_ampere_are_named(monkeypatch):
    """Compute capability below 8.0 (a T4, a V100): the kernels are unusable, and say why."""
    pytest.importorskip("triton")
    from adcam_fast.kernels import launch

    if launch._triton_problem() is not None:
        pytest.skip(f"this Triton is unusable first: {launch._triton_problem()}")
    t4 = SimpleNamespace(name="Tesla T4", major=7, minor=5)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(launch, "device_properties", lambda device=None: t4)
    assert launch.unusable() == "Tesla T4 has compute capability 7.5, below 8.0"
    assert not launch.triton_available()


def test_auto_rule_on_cuda(monkeypatch):
    """Where the kernels run, ``auto`` takes them for 1 <= k < N up to their limit, in fp32
    and lower; float64 inputs and k >= N stay on the torch path."""
    pytest.importorskip("triton")
    from adcam_fast import kernels

    monkeypatch.setattr(kernels, "triton_available", lambda device=None: True)
    cuda = torch.device("cuda")
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert ops.resolve_backend("auto", cuda, 50, 576, dtype) == "triton"
    assert ops.resolve_backend("auto", cuda, 50, 576, torch.float64) == "torch"
    assert ops.resolve_backend("auto", cuda, 576, 576) == "torch"
    assert ops.resolve_backend("auto", cuda, 1024, 2304) == "triton"  # the kernels' largest k
    assert ops.resolve_backend("auto", cuda, 1025, 2304) == "torch"
    assert ops.resolve_backend("auto", torch.device("cpu"), 50, 576) == "torch"


GOOD_A = torch.full((2, 6, 6), 1 / 6)
GOOD_CAMS = torch.rand(2, 3, 6)


def good_a_but(value: float) -> torch.Tensor:
    """GOOD_A with one entry, in the second image, set to ``value``."""
    A = GOOD_A.clone()
    A[1, 4, 2] = value
    return A


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(A=GOOD_A[0, 0]), "A must have shape"),
        (dict(A=torch.ones(2, 6, 5) / 5), "A must have shape"),
        (dict(A=GOOD_A.long()), "A must have a floating dtype"),
        (dict(A=-GOOD_A), "A must be finite and non-negative"),
        (dict(A=GOOD_A.clone().fill_(math.nan)), "A must be finite and non-negative"),
        (dict(A=GOOD_A.clone().fill_(math.inf)), "A must be finite and non-negative"),
        (dict(A=good_a_but(math.nan)), r"A must be finite and non-negative \(1 entries"),
        (dict(A=good_a_but(-math.inf)), r"A must be finite and non-negative \(1 entries"),
        (dict(A=good_a_but(math.inf)), r"A must be finite and non-negative \(1 entries"),
        (dict(A=good_a_but(-1e-30)), r"A must be finite and non-negative \(1 entries"),
        (dict(A=[[1.0]]), "A must be a torch.Tensor"),
        (dict(cams=GOOD_CAMS[0]), "cams must have shape"),
        (dict(cams=torch.rand(1, 3, 6)), "cams must have shape"),
        (dict(cams=torch.rand(2, 3, 7)), "cams must have shape"),
        (dict(cams=GOOD_CAMS.clone().fill_(math.nan)), "cams must be finite"),
        (dict(k=0), "k must be an integer >= 1"),
        (dict(k=2.5), "k must be an integer >= 1"),
        (dict(k=True), "k must be an integer >= 1"),
        (dict(k=np.int64(0)), "k must be an integer >= 1"),
        (dict(steps=-1), "steps must be an integer >= 0"),
        (dict(backend="cuda"), "backend must be one of"),
    ],
)
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_bad_input_raises_value_error_naming_argument(kwargs, match, backend):
    args = dict(A=GOOD_A, cams=GOOD_CAMS, k=2, steps=1, backend=backend) | kwargs
    with pytest.raises(ValueError, match=match):
        adcam_fast.adcam(**args)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_k_and_steps_of_any_integer_type(backend):
    """numpy's integers (as from a config array) are integers: the same result as ints."""
    want = adcam_fast.adcam(GOOD_A, GOOD_CAMS, k=2, steps=1, backend=backend)
    got = adcam_fast.adcam(GOOD_A, GOOD_CAMS, k=np.int64(2), steps=np.int32(1), backend=backend)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_public_reference_functions_validate():
    with pytest.raises(ValueError, match="A must be finite"):
        adcam_fast.coneighbor_similarity(-GOOD_A)
    with pytest.raises(ValueError, match="k must be"):
        adcam_fast.refine_attention(GOOD_A, 0)
    with pytest.raises(ValueError, match="eps must be a finite number >= 0, got nan"):
        adcam_fast.refine_attention(GOOD_A, 2, eps=math.nan)
    with pytest.raises(ValueError, match=r"cams must have shape .* to match A_tilde \("):
        adcam_fast.diffuse(GOOD_A, GOOD_CAMS[:1], 1)
    with pytest.raises(ValueError, match="cams is on meta but A_tilde is on cpu"):
        adcam_fast.diffuse(GOOD_A, GOOD_CAMS.to("meta"), 1)
    with pytest.raises(ValueError, match=r"cams must have shape .* to match A \("):
        adcam_fast.reference.adcam(GOOD_A, GOOD_CAMS[:1])
    with pytest.raises(ValueError, match="steps must be"):
        adcam_fast.diffuse(GOOD_A, GOOD_CAMS, -2)

"""The reference ops against the properties DESIGN.md §1 fixes."""

from __future__ import annotations

import pytest
import torch
from conftest import random_attention

import adcam_fast
from adcam_fast.reference import topk_mask


def uniform_rows(neighbours: list[set[int]], n: int) -> torch.Tensor:
    """Rows spreading attention uniformly over each given neighbour set."""
    A = torch.zeros(len(neighbours), n, dtype=torch.float64)
    for i, s in enumerate(neighbours):
        A[i, sorted(s)] = 1.0 / len(s)
    return A


def test_similarity_symmetric_bounded_unit_diagonal(gen):
    A = random_attention(3, 50, 50, generator=gen)
    S = adcam_fast.coneighbor_similarity(A)
    assert S.shape == A.shape and S.dtype == torch.float64
    torch.testing.assert_close(S, S.mT, rtol=0, atol=1e-15)
    assert S.min() >= 0 and S.max() <= 1 + 1e-12
    torch.testing.assert_close(S.diagonal(dim1=-2, dim2=-1), torch.ones(3, 50, dtype=torch.float64))


def test_theorem_4_1_jaccard(gen):
    """Uniform attention over n neighbours each: S_ij = 2J / (1 + J)."""
    n_tokens, n = 40, 8
    sets = [set(torch.randperm(n_tokens, generator=gen)[:n].tolist()) for _ in range(12)]
    A = torch.zeros(n_tokens, n_tokens, dtype=torch.float64)
    A[:12] = uniform_rows(sets, n_tokens)
    A[12:] = 1.0 / n_tokens
    S = adcam_fast.coneighbor_similarity(A)
    for i in range(12):
        for j in range(12):
            jac = len(sets[i] & sets[j]) / len(sets[i] | sets[j])
            assert S[i, j].item() == pytest.approx(2 * jac / (1 + jac), abs=1e-12)


def test_topk_mask_ties_go_to_smaller_column():
    S = torch.tensor([[0.5, 0.9, 0.5, 0.5, 0.1], [1.0, 1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    m = topk_mask(S, 3)
    assert m.tolist() == [
        [True, True, True, False, False],
        [True, True, True, False, False],
    ]


def test_refine_rows_stochastic_sparse_and_inside_topk(gen):
    k = 7
    A = random_attention(2, 33, 33, generator=gen)
    At = adcam_fast.refine_attention(A, k)
    torch.testing.assert_close(At.sum(-1), torch.ones(2, 33, dtype=torch.float64))
    assert ((At > 0).sum(-1) <= k).all()
    S = adcam_fast.coneighbor_similarity(A)
    kth = S.topk(k, dim=-1).values[..., -1:]
    assert (S[At > 0] >= kth.expand_as(S)[At > 0]).all()
    # On the support, Ã is A rescaled by its row's kept mass.
    ratio = torch.where(At > 0, At / A, torch.zeros_like(A))
    row_scale = ratio.amax(-1, keepdim=True)
    torch.testing.assert_close(
        torch.where(At > 0, ratio, row_scale).expand_as(A), row_scale.expand_as(A)
    )


def test_refine_ties_select_smaller_columns():
    # Uniform attention: every S_ij = 1, so TOP keeps columns 0..k-1 in every row.
    A = torch.full((6, 6), 1 / 6, dtype=torch.float64)
    At = adcam_fast.refine_attention(A, 2)
    expected = torch.zeros(6, 6, dtype=torch.float64)
    expected[:, :2] = 0.5
    torch.testing.assert_close(At, expected)


def test_refine_k_at_least_n_keeps_whole_row(gen):
    A = random_attention(20, 20, generator=gen)
    for k in (20, 21, 500):
        torch.testing.assert_close(adcam_fast.refine_attention(A, k), A / A.sum(-1, keepdim=True))


def test_refine_empty_rows_become_self_rows():
    # Row 1 attends only to column 3, and S_11 = S_13 = 1: the tie keeps column 1, where
    # A_11 = 0, so the kept mass is zero and the row becomes the self row e_1.
    A = torch.eye(4, dtype=torch.float64)
    A[1] = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    At = adcam_fast.refine_attention(A, 1)
    torch.testing.assert_close(At, torch.eye(4, dtype=torch.float64), rtol=0, atol=0)
    # With k = 2 column 3 is kept too and the row follows A.
    torch.testing.assert_close(adcam_fast.refine_attention(A, 2), A, rtol=0, atol=0)


def test_diffusion_conserves_mass_and_zero_steps_is_identity(gen):
    A = random_attention(2, 30, 30, generator=gen)
    cams = torch.rand(2, 4, 30, generator=gen, dtype=torch.float64)
    At = adcam_fast.refine_attention(A, 5)
    for steps in (1, 2, 5):
        out = adcam_fast.diffuse(At, cams, steps)
        torch.testing.assert_close(out.sum(-1), cams.sum(-1))
    assert torch.equal(adcam_fast.diffuse(At, cams, 0), cams)


def test_diffusion_direction_sends_activation_along_rows():
    """M'(j) = Σ_i Ã_ij M(i): a pixel sends its activation to the columns of its row."""
    At = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    cams = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
    out = adcam_fast.diffuse(At, cams, 1)
    assert out.tolist() == [[0.0, 1.0, 0.0]]


def test_reference_adcam_composes(gen):
    A = random_attention(25, 25, generator=gen)
    cams = torch.rand(3, 25, generator=gen, dtype=torch.float64)
    expected = cams @ adcam_fast.refine_attention(A, 4) @ adcam_fast.refine_attention(A, 4)
    out = adcam_fast.adcam(A, cams, k=4, steps=2, backend="reference")
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-14)

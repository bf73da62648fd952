"""The readable specification of AD-CAM's three steps (DESIGN.md §1, paper Eq. 6-8).

Dense and batched over leading dimensions; float64 in, float64 out (half inputs are upcast
to float32). Every fast path (``ops`` and ``kernels``) is tested against these functions.
"""

from __future__ import annotations

import torch
from torch import Tensor

from adcam_fast.checks import (
    check_attention,
    check_cams,
    check_eps,
    check_k,
    check_square,
    check_steps,
    compute_dtype,
)

EPS = 1e-12
"""A refined row whose kept attention mass is <= EPS becomes the one-hot self row."""


def similarity(A: Tensor) -> Tensor:
    """Unchecked ``sqrt(A) @ sqrt(A)ᵀ`` in the compute dtype (see `coneighbor_similarity`)."""
    R = A.to(compute_dtype(A)).sqrt()
    return R @ R.mT


def coneighbor_similarity(A: Tensor) -> Tensor:
    """Co-neighbor similarity (Eq. 6): ``S_ij = Σ_k sqrt(A_ik · A_jk)``.

    A: (..., N, N) row-stochastic attention. S is symmetric, in [0, 1], with ``S_ii = 1``.
    """
    return similarity(check_attention(A))


def topk_mask(S: Tensor, k: int) -> Tensor:
    """``TOP(S, k)`` as a boolean mask: the k largest entries of each row.

    Ties go to the smaller column index (a stable descending sort); k >= N keeps every entry.
    """
    if k >= S.shape[-1]:
        return torch.ones_like(S, dtype=torch.bool)
    order = torch.sort(S, dim=-1, descending=True, stable=True).indices[..., :k]
    return torch.zeros_like(S, dtype=torch.bool).scatter_(-1, order, True)


def refine_attention(A: Tensor, k: int, eps: float = EPS) -> Tensor:
    """Refined attention (Eq. 7): ``Ã = rownorm(TOP(S, k) ⊗ A)`` with S from Eq. 6.

    A: (..., N, N). Returns dense Ã (..., N, N) whose rows sum to 1 with at most k non-zeros;
    a row whose kept mass is <= eps becomes the one-hot self row ``e_i``.
    """
    A = check_attention(A)
    k = check_k(k)
    eps = check_eps(eps)
    return normalize_rows(A.to(compute_dtype(A)) * topk_mask(similarity(A), k), eps)


def normalize_rows(kept: Tensor, eps: float = EPS) -> Tensor:
    """``rownorm`` of Eq. 7: each row divided by its sum; a row summing to <= eps becomes
    the one-hot self row ``e_i``."""
    mass = kept.sum(-1, keepdim=True)
    eye = torch.eye(kept.shape[-1], dtype=kept.dtype, device=kept.device).expand_as(kept)
    return torch.where(mass > eps, kept / mass.clamp_min(eps), eye)


def diffuse(A_tilde: Tensor, cams: Tensor, steps: int) -> Tensor:
    """Class-activation diffusion (Eq. 8): ``M⁽ᵗ⁺¹⁾(i) = Σ_j Ã_ji M⁽ᵗ⁾(j)``, T = steps times.

    With the maps as rows, ``M ← M · Ã``. A_tilde: (..., N, N); cams: (..., K, N).
    Row-stochastic Ã conserves each map's total mass; steps = 0 returns cams unchanged.
    """
    A_tilde = check_square(A_tilde, "A_tilde")
    cams = check_cams(cams, A_tilde, a_name="A_tilde")
    steps = check_steps(steps)
    dtype = compute_dtype(A_tilde, cams)
    A_tilde, M = A_tilde.to(dtype), cams.to(dtype)
    for _ in range(steps):
        M = M @ A_tilde
    return M


def adcam(A: Tensor, cams: Tensor, k: int = 50, steps: int = 2) -> Tensor:
    """AD-CAM's raw diffused maps: ``diffuse(refine_attention(A, k), cams, steps)``."""
    check_cams(cams, check_attention(A, values=False), values=False)  # named against A, not Ã
    return diffuse(refine_attention(A, k), cams, steps)

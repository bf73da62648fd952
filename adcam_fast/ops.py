"""AD-CAM as one op: validation, backend dispatch and the fast portable torch path.

The torch path never builds a dense Ã. The refined attention is kept sparse, as the k
column indices and weights of each row, and diffusion scatters along them:

    TOP(S, k) indices  -> (..., N, k)  ties toward the smaller column
    Ã row weights      -> (..., N, k)  rownorm(A gathered at those indices)
    M ← M · Ã          -> scatter-add of M(i) · w_ir into column idx_ir

The only O(N²) tensors are S and sqrt(A), for a bounded chunk of images at a time; S is
overwritten in place by the tie break. It is the CPU path and the GPU baseline that the
Triton kernels must beat.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from adcam_fast import reference
from adcam_fast.checks import check_attention, check_cams, check_k, check_steps, compute_dtype

Backend = Literal["auto", "reference", "torch", "triton"]
BACKENDS: tuple[str, ...] = ("auto", "reference", "torch", "triton")
SIMILARITY_CHUNK = 2**24
"""Entries of S computed at once by the torch path (images are processed in chunks)."""


def topk_columns(S: Tensor, k: int) -> Tensor:
    """Column indices of ``TOP(S, k)`` per row, ties toward the smaller column: (..., N, k).

    Requires k < N. S is overwritten (it becomes the tie-break key); pass a copy to keep it.
    Every entry strictly above the k-th largest value is in ``torch.topk``'s answer; the
    remaining places go to the columns equal to the k-th value, smallest column first.
    """
    n = S.shape[-1]
    values, idx = S.topk(k, dim=-1)
    kth = values[..., -1:]
    n_above = (values > kth).sum(-1, keepdim=True)
    # Tie key: (N - j) where S_ij equals the k-th value, 0 elsewhere; all ties have key > 0.
    key = S.eq_(kth).mul_(torch.arange(n, 0, -1, dtype=S.dtype, device=S.device))
    tie_idx = key.topk(k, dim=-1).indices
    place = torch.arange(k, device=S.device)
    return torch.where(place < n_above, idx, tie_idx.gather(-1, (place - n_above).clamp_min(0)))


def refine_sparse(A: Tensor, k: int, eps: float = reference.EPS) -> tuple[Tensor, Tensor]:
    """Sparse Ã of Eq. 7 as ``(weights, indices)``, each (..., N, min(k, N)).

    Row i of Ã is ``Σ_r weights[i, r] · e_{indices[i, r]}``. Rows whose kept mass is <= eps
    become the self row (weight 1 at place 0 with index i, weight 0 elsewhere). Unchecked.
    S and sqrt(A) exist for at most ``SIMILARITY_CHUNK`` entries' worth of images at a time.
    """
    n = A.shape[-1]
    A = A.to(compute_dtype(A))
    rows = torch.arange(n, device=A.device)
    if k >= n:
        idx = rows.expand(*A.shape)
    else:
        images = A.reshape(-1, n, n).split(max(1, SIMILARITY_CHUNK // (n * n)))
        idx = torch.cat([topk_columns(reference.similarity(a), k) for a in images])
        idx = idx.reshape(*A.shape[:-1], k)
    w = A.gather(-1, idx)
    mass = w.sum(-1, keepdim=True)
    empty = mass <= eps
    first = torch.arange(idx.shape[-1], device=A.device) == 0
    idx = torch.where(empty & first, rows[:, None], idx)
    w = torch.where(empty, first.to(w.dtype), w / mass.clamp_min(eps))
    return w, idx


def diffuse_sparse(weights: Tensor, indices: Tensor, cams: Tensor, steps: int) -> Tensor:
    """Eq. 8 with a sparse Ã: ``M'(j) = Σ_i Σ_r [indices_ir = j] · weights_ir · M(i)``.

    weights, indices: (..., N, k); cams: (..., K, N). Unchecked.
    """
    dtype = compute_dtype(weights, cams)
    M = cams.to(dtype)
    lead, n_cls = cams.shape[:-2], cams.shape[-2]
    w = weights.to(dtype).unsqueeze(-3)  # (..., 1, N, k)
    idx = indices.flatten(-2).unsqueeze(-2).expand(*lead, n_cls, -1)  # (..., K, N*k)
    for _ in range(steps):
        src = (M.unsqueeze(-1) * w).flatten(-2)
        M = torch.zeros_like(M).scatter_add_(-1, idx, src)
    return M


def adcam_torch(A: Tensor, cams: Tensor, k: int, steps: int) -> Tensor:
    """The portable fast path: sparse refinement then sparse diffusion. Unchecked.

    With k >= N every column is kept, Ã = rownorm(A) is dense, and so is the product: the
    diffusion is then T dense batched matmuls.
    """
    if k >= A.shape[-1]:
        dtype = compute_dtype(A, cams)
        A_tilde, M = reference.normalize_rows(A.to(dtype)), cams.to(dtype)
        for _ in range(steps):
            M = M @ A_tilde
        return M
    weights, indices = refine_sparse(A, k)
    return diffuse_sparse(weights, indices, cams, steps)


def resolve_backend(
    backend: str,
    device: torch.device,
    k: int = 1,
    n: int = 2,
    dtype: torch.dtype = torch.float32,
) -> str:
    """Map ``auto`` to the fastest backend for tensors on ``device``, this (k, N) and the
    inputs' promoted ``dtype``.

    ``auto`` takes the Triton kernels on CUDA for 1 <= k < N up to their top-k limit, and
    the torch path otherwise: for k >= N (Ã is dense: dense matmuls beat any sparse form)
    and for float64 inputs (the kernels return fp32; float64 in means float64 out).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    if device.type == "cuda" and k < n and dtype != torch.float64:
        from adcam_fast.kernels import triton_available

        if triton_available(device):
            from adcam_fast.kernels.coneighbor_topk import MAX_TOPK

            if k <= MAX_TOPK:
                return "triton"
    return "torch"


def adcam(
    A: Tensor, cams: Tensor, k: int = 50, steps: int = 2, backend: Backend = "auto"
) -> Tensor:
    """AD-CAM's raw diffused maps (Eq. 6-8): refine A with TOP(S, k), diffuse cams T = steps times.

    A: (..., N, N) attention with rows summing to 1; cams: (..., K, N) maps over the same N
    row-major positions. Returns (..., K, N) in the promoted dtype (at least float32; the
    triton backend always fp32).
    backend: ``reference`` (dense spec), ``torch`` (sparse, portable), ``triton`` (fused
    kernels, CUDA, or CPU under ``TRITON_INTERPRET=1``), ``auto`` (triton on CUDA, except
    for float64 inputs or k >= N; else torch).
    """
    cams = check_cams(cams, check_attention(A, values=False), values=False)  # shapes, device
    A, cams = check_attention(A), check_cams(cams, A)  # then values
    k = check_k(k)
    steps = check_steps(steps)
    backend = resolve_backend(backend, A.device, k, A.shape[-1], compute_dtype(A, cams))
    if backend == "reference":
        return reference.adcam(A, cams, k, steps)
    if backend == "torch":
        return adcam_torch(A, cams, k, steps)
    from adcam_fast.kernels import adcam_triton

    return adcam_triton(A, cams, k, steps)

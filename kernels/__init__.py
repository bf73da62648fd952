"""Fused Triton kernels for AD-CAM (DESIGN.md §4), installed as ``adcam_fast.kernels``.

Thin torch-facing wrappers over the launchers in `coneighbor_topk` (kernels 1+2: similarity,
streaming top-k, refinement; or the top-k alone) and `diffusion` (kernel 3). They flatten
leading dims to a batch B, convert dtypes and check devices; results follow the contracts
of the torch path in ``adcam_fast.ops`` but are always fp32 (indices int64).

Runs on CUDA GPUs (compute capability >= 8.0), or on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1`` set before this package is imported). Importing this package needs
no triton; `triton_available` says whether the GPU path works here.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from adcam_fast.checks import (
    check_attention,
    check_cams,
    check_eps,
    check_float_tensor,
    check_fp32_range,
    check_k,
    check_steps,
)
from adcam_fast.kernels.launch import check_runnable, triton_available
from adcam_fast.reference import EPS

__all__ = [
    "adcam_triton",
    "diffuse_sparse_triton",
    "refine_sparse_triton",
    "similarity_topk_triton",
    "triton_available",
]


def _flat(x: Tensor) -> Tensor:
    """x (..., P, Q) as (B, P, Q), B the product of the leading dims (any of them may be 0)."""
    return x.reshape(math.prod(x.shape[:-2]), *x.shape[-2:])


def _batch(A: Tensor) -> Tensor:
    """A (..., N, N) as a contiguous (B, N, N) tensor of a dtype the kernels read (float64
    within float32's range: one host sync)."""
    if A.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        check_fp32_range(A, "A")
        A = A.to(torch.float32)
    return _flat(A).contiguous()


def _per_row(
    A: Tensor, k: int, launch: Callable[[Tensor], tuple[Tensor, Tensor]]
) -> tuple[Tensor, Tensor]:
    """Check A (values: one host sync), k and the device, run ``launch`` on A as a (B, N, N)
    batch, and give its two (B, N, k') outputs A's leading dims."""
    check_runnable(check_attention(A, values=False))
    A = check_attention(A)
    k = check_k(k)
    out, idx = launch(_batch(A))
    shape = (*A.shape[:-1], out.shape[-1])
    return out.reshape(shape), idx.reshape(shape)


def refine_sparse_triton(A: Tensor, k: int, eps: float = EPS) -> tuple[Tensor, Tensor]:
    """Sparse refined attention (Eq. 7) by the fused similarity + top-k kernel.

    A: (..., N, N), validated like ``adcam_fast.refine_attention`` (one host sync). Returns
    ``(weights, indices)``, each (..., N, min(k, N)), fp32 and int64: row i of Ã is
    ``Σ_r weights[i, r] · e_{indices[i, r]}`` with places in descending S (ties: smaller
    column first); rows whose kept mass is <= eps are the self row (weight 1 at place 0
    with index i). Same contract as ``ops.refine_sparse``.
    """

    eps = check_eps(eps)

    def launch(batch: Tensor) -> tuple[Tensor, Tensor]:
        from adcam_fast.kernels.coneighbor_topk import refine_sparse

        return refine_sparse(batch, k, eps)

    return _per_row(A, k, launch)


def similarity_topk_triton(A: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``TOP(S, k)`` of the co-neighbor similarity S = sqrt(A)·sqrt(A)ᵀ (Eq. 6-7) by the
    streaming kernel, S never stored: ``(values, indices)``, each (..., N, min(k, N)),
    fp32 and int64, places by descending S, ties toward the smaller column.

    A: (..., N, N), validated like ``adcam_fast.coneighbor_similarity`` (one host sync).
    Values carry the kernel's arithmetic (``coneighbor_topk.similarity_topk``: fp16
    sqrt(A), keys of 24 - log2(N) bits); min(k, N) <= ``coneighbor_topk.MAX_TOPK``.
    """

    def launch(batch: Tensor) -> tuple[Tensor, Tensor]:
        from adcam_fast.kernels.coneighbor_topk import similarity_topk

        return similarity_topk(batch, k)

    return _per_row(A, k, launch)


def diffuse_sparse_triton(weights: Tensor, indices: Tensor, cams: Tensor, steps: int) -> Tensor:
    """Diffusion (Eq. 8) with a sparse Ã: T = steps times ``M'(j) = Σ_{idx_ir = j} w_ir M(i)``.

    weights, indices: (..., N, k) (e.g. from `refine_sparse_triton` or ``ops.refine_sparse``);
    cams: (..., K, N) any float. Returns (..., K, N) fp32. Checks shapes, devices and that
    indices lie in [0, N) (one host sync).
    """
    steps = check_steps(steps)
    weights, cams = check_float_tensor(weights, "weights"), check_float_tensor(cams, "cams")
    if not isinstance(indices, Tensor):
        raise ValueError(f"indices must be a torch.Tensor, got {type(indices).__name__}")
    n = indices.shape[-2] if indices.ndim >= 2 else 0
    if weights.shape != indices.shape or indices.ndim < 2 or n == 0:
        raise ValueError(
            "weights and indices must share a shape (..., N, k) with N >= 1, got "
            f"{tuple(weights.shape)} and {tuple(indices.shape)}"
        )
    if indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"indices must be int32 or int64, got {indices.dtype}")
    lead = indices.shape[:-2]
    if cams.ndim != indices.ndim or cams.shape[:-2] != lead or cams.shape[-1] != n:
        raise ValueError(f"cams must have shape {(*lead, 'K', n)}, got {tuple(cams.shape)}")
    check_runnable(weights, indices, cams)
    if bool(((indices < 0) | (indices >= n)).any()):
        raise ValueError(f"indices must lie in [0, {n})")
    check_fp32_range(cams, "cams")
    from adcam_fast.kernels.diffusion import diffuse_sparse

    out = diffuse_sparse(_flat(weights), _flat(indices), _flat(cams), steps)
    return out.reshape(cams.shape)


def adcam_triton(A: Tensor, cams: Tensor, k: int, steps: int) -> Tensor:
    """AD-CAM's raw diffused maps (Eq. 6-8) through the fused kernels: (..., K, N) fp32.

    A: (..., N, N) attention (fp32/fp16/bf16 read as is, other floats as fp32); cams:
    (..., K, N) any float. Values are not validated (``ops.adcam`` does that); shapes and
    devices are, without a host sync (float64 inputs: one, for their range). Per batch:
    the sqrt pass and the top-k kernel (once per chunk of ``coneighbor_topk.ROOT_CHUNK``
    attention entries), the diffusion's CSR (two kernels around one torch sort) and the
    diffusion (one launch, or one per step when its images are split over programs), and a
    few torch ops; no data-dependent host code: CUDA-graph capturable once the configs for
    these sizes are cached (after a first call, or ``ADCAM_AUTOTUNE=0``).
    Raises ValueError for mixed devices, CUDA tensors without a usable Triton, CPU tensors
    when the kernels are not interpreted (set TRITON_INTERPRET=1 or use backend="torch"),
    and float64 values beyond float32's range.
    """
    check_cams(cams, check_attention(A, values=False), values=False)
    check_runnable(A, cams)
    k = check_k(k)
    steps = check_steps(steps)
    check_fp32_range(cams, "cams")
    from adcam_fast.kernels.coneighbor_topk import refine_sparse
    from adcam_fast.kernels.diffusion import diffuse_sparse

    if steps == 0 or cams.numel() == 0:  # detached, as the kernels' outputs are
        return cams.detach().to(torch.float32, copy=True)
    w, idx = refine_sparse(_batch(A), k, EPS, torch.int32)
    return diffuse_sparse(w, idx, _flat(cams), steps).reshape(cams.shape)

"""Kernels 1+2: co-neighbor similarity, streaming per-row top-k, refinement epilogue.

For one image, with ``R = sqrt(A)``, the similarity ``S = R·Rᵀ`` (Eq. 6) is produced tile by
tile and folded into a running top-k per row; S never reaches device memory. The epilogue
turns the kept columns into the sparse refined attention of Eq. 7, exactly as
``adcam_fast.ops.refine_sparse`` does::

    idx[i, :]  = TOP(S[i, :], k)       ties toward the smaller column, places by descending S
    w[i, r]    = A[i, idx[i, r]] / Σ_r' A[i, idx[i, r']]
    mass <= eps  ->  idx[i, 0] = i, w[i, :] = (1, 0, ..., 0)   (the self row)

Tiling: a program owns ``BLOCK_M`` rows of one image and sweeps the column tiles of width
``BLOCK_N``, starting at the tile that holds its diagonal (the largest entries, ``S_ii = 1``,
and for real attention the spatial neighbours) so the running threshold rises early. Each
S tile is a ``tl.dot`` over ``BLOCK_K`` slices, sqrt applied on load (in fp32): fp16
attention takes sqrt(A) in fp16, fp32 and bf16 attention run the dot in tf32 (bf16's 8-bit
significand would cost S accuracy, and Triton's interpreter has no bf16 dot); fp32
accumulation. Either way sqrt(A) carries a relative rounding error <= 2**-11.

Top-k keys: S >= 0, so the bits of an fp32 value read as an integer order like the value.
A key is the int64 ``bits(S_ij) << 32 | (N - j)``: distinct per column, larger S wins, and
at equal S the smaller column wins. Padding (rows or columns >= N) is -1. The running top
``KP = next_pow2(k)`` keys per row are kept sorted ascending; a tile is merged by the
bitonic rule ``acc <- bitonic_merge(max(acc, topk(tile, KP)))`` (an ascending and a
descending sorted list, compared place by place, keep the KP largest of both as a bitonic
list, which the merge sorts). Tiles with no key above a row's current k-th best are skipped.
The first k of the final list (read from the top) are the chosen columns. Keys are exact
and unique, so the result does not depend on the tile order or sizes: deterministic.

``k >= N`` keeps every column: `rownorm_kernel` only normalises rows (no similarity).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from adcam_fast.kernels.launch import Config, choose_config, n_bucket, next_pow2

MAX_TOPK = 1024
"""The largest k < N supported (the running top-k of a row block is held on chip)."""


@triton.jit
def _compare_swap(x, DIST: tl.constexpr, DIR_BIT: tl.constexpr, FLIP: tl.constexpr):
    """One bitonic step on each row of x (M, W): columns c and c + DIST (c & DIST == 0) are
    put in order, descending where ``(c & DIR_BIT != 0) != FLIP``, ascending elsewhere.

    The partner of each entry is read as ``pair sum - self`` (a size-2 ``tl.sum``, one lane
    exchange); int64 arithmetic wraps around, so this is exact for any pair of keys.
    """
    M: tl.constexpr = x.shape[0]
    W: tl.constexpr = x.shape[1]
    h = tl.reshape(x, (M, W // (2 * DIST), 2, DIST))
    y = tl.reshape(tl.sum(h, axis=2, keep_dims=True) - h, (M, W))
    c = tl.arange(0, W)
    swap_to_right = ((c & DIST) != 0) != (((c & DIR_BIT) != 0) != FLIP)
    return tl.where((x > y) != swap_to_right[None, :], y, x)


@triton.jit
def _bitonic_merge(x, LOG_RUN: tl.constexpr, DIR_BIT: tl.constexpr, FLIP: tl.constexpr):
    """Sort each bitonic run of ``2**LOG_RUN`` columns (direction as in `_compare_swap`)."""
    for j in tl.static_range(LOG_RUN):
        x = _compare_swap(x, 1 << (LOG_RUN - 1 - j), DIR_BIT, FLIP)
    return x


@triton.jit
def _topk_desc(x, LOG_K: tl.constexpr, LOG_W: tl.constexpr):
    """The ``2**LOG_K`` largest entries of each row of x (M, 2**LOG_W), sorted descending.

    Bitonic top-k: sort runs of 2**LOG_K with alternating directions, then repeatedly take
    the element-wise max of neighbouring runs (a descending and an ascending run keep the
    larger half of both, as a bitonic run) and re-sort, halving the width to 2**LOG_K.
    Directions are flipped throughout so that the last run comes out descending.
    """
    K: tl.constexpr = 1 << LOG_K
    M: tl.constexpr = x.shape[0]
    for s in tl.static_range(1, LOG_K + 1):
        x = _bitonic_merge(x, s, 1 << s, True)
    for level in tl.static_range(LOG_W - LOG_K):
        half = tl.reshape(x, (M, (1 << (LOG_W - level - 1)) // K, 2, K))
        x = tl.reshape(tl.max(half, axis=2), (M, 1 << (LOG_W - level - 1)))
        x = _bitonic_merge(x, LOG_K, K, True)
    return x


@triton.jit
def coneighbor_topk_kernel(
    A,  # (B, N, N) attention, fp32 / fp16 / bf16, contiguous
    W,  # (B, N, K_KEEP) fp32 out: refined weights
    IDX,  # (B, N, K_KEEP) int32 / int64 out: column indices
    N,
    K_KEEP,
    eps,
    LOG_KP: tl.constexpr,  # KP = 2**LOG_KP = next_pow2(K_KEEP) <= BLOCK_N
    BLOCK_M: tl.constexpr,
    LOG_BN: tl.constexpr,  # BLOCK_N = 2**LOG_BN >= KP
    BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr,  # tl.float16 for fp16 attention, else tl.float32 (tf32 dot)
):
    KP: tl.constexpr = 1 << LOG_KP
    BLOCK_N: tl.constexpr = 1 << LOG_BN
    pid_m = tl.program_id(0)
    pid_b = tl.program_id(1)
    a_img = A + pid_b.to(tl.int64) * N * N
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N

    acc = tl.full((BLOCK_M, KP), -1, tl.int64)  # running top-KP keys, ascending
    n_tiles = (N + BLOCK_N - 1) // BLOCK_N
    first = (pid_m * BLOCK_M) // BLOCK_N
    for t in range(n_tiles):
        cols = ((first + t) % n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        s = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k0 in range(0, N, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            k_ok = kk < N
            r = tl.load(
                a_img + rows[:, None] * N + kk[None, :],
                mask=row_ok[:, None] & k_ok[None, :],
                other=0.0,
            )
            c = tl.load(
                a_img + cols[:, None] * N + kk[None, :],
                mask=col_ok[:, None] & k_ok[None, :],
                other=0.0,
            )
            r = tl.sqrt(r.to(tl.float32)).to(DOT_DTYPE)
            c = tl.sqrt(c.to(tl.float32)).to(DOT_DTYPE)
            s = tl.dot(r, tl.trans(c), s)
        key = (s.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (N - cols).to(tl.int64)[None, :]
        key = tl.where(row_ok[:, None] & col_ok[None, :], key, -1)
        kth = tl.min(acc, axis=1)
        if tl.max((key > kth[:, None]).to(tl.int32)) > 0:
            acc = _bitonic_merge(tl.maximum(acc, _topk_desc(key, LOG_KP, LOG_BN)), LOG_KP, 0, False)

    # Epilogue: acc[:, KP-1-p] holds place p of the descending order.
    place = KP - 1 - tl.arange(0, KP)
    cols = N - acc.to(tl.int32)  # low 32 bits hold N - j
    keep = row_ok[:, None] & (place < K_KEEP)[None, :]
    a = tl.load(a_img + rows[:, None] * N + cols, mask=keep, other=0.0).to(tl.float32)
    mass = tl.sum(a, axis=1)
    empty = (mass <= eps)[:, None]
    lead = (place == 0)[None, :]
    w = tl.where(empty, tl.where(lead, 1.0, 0.0), a / tl.maximum(mass, eps)[:, None])
    idx = tl.where(empty & lead, rows[:, None], cols).to(IDX.dtype.element_ty)
    out = (pid_b.to(tl.int64) * N + rows[:, None]) * K_KEEP + place[None, :]
    tl.store(W + out, w, mask=keep)
    tl.store(IDX + out, idx, mask=keep)


@triton.jit
def rownorm_kernel(
    A,  # (B, N, N) attention, contiguous
    W,  # (B, N, N) fp32 out
    IDX,  # (B, N, N) int32 / int64 out
    N,
    eps,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Refinement for k >= N: ``idx[i, r] = r``, ``w[i, :] = rownorm(A[i, :])``, self row
    when the row mass is <= eps."""
    pid_m = tl.program_id(0)
    pid_b = tl.program_id(1)
    img = pid_b.to(tl.int64) * N * N
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    mass = tl.zeros((BLOCK_M,), tl.float32)
    for c0 in range(0, N, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        ok = row_ok[:, None] & (cols < N)[None, :]
        offs = img + rows[:, None] * N + cols[None, :]
        mass += tl.sum(tl.load(A + offs, mask=ok, other=0.0).to(tl.float32), axis=1)
    empty = (mass <= eps)[:, None]
    denom = tl.maximum(mass, eps)[:, None]
    for c0 in range(0, N, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        ok = row_ok[:, None] & (cols < N)[None, :]
        offs = img + rows[:, None] * N + cols[None, :]
        a = tl.load(A + offs, mask=ok, other=0.0).to(tl.float32)
        lead = (cols == 0)[None, :]
        w = tl.where(empty, tl.where(lead, 1.0, 0.0), a / denom)
        idx = tl.where(empty & lead, rows[:, None], cols[None, :]).to(IDX.dtype.element_ty)
        tl.store(W + offs, w, mask=ok)
        tl.store(IDX + offs, idx, mask=ok)


def topk_configs(kp: int) -> tuple[Config, list[Config]]:
    """Default and candidate tilings for a running top-``kp`` (``BLOCK_N >= kp``).

    The row block shrinks as kp grows so that the (BLOCK_M, kp) int64 running list and the
    (BLOCK_M, BLOCK_N) tile stay in registers (ptxas, sm_90, Triton 3.6: 190-250 registers
    per thread at 8 warps for kp <= 128, spills from kp = 256). BLOCK_K is the same in every
    candidate: it fixes the order in which S is accumulated, so that autotuning does not
    move S by a rounding (the MMA instruction shape may still differ between candidates;
    ``ADCAM_AUTOTUNE=0`` pins the default for bitwise reproducibility across processes).
    """
    bn = max(64, kp)
    bm = max(16, min(64, 4096 // kp))
    default = Config(bm, bn, 32, num_warps=8, num_stages=2)
    others = [
        Config(bm, bn, 32, num_warps=8, num_stages=3),
        Config(bm, bn, 32, num_warps=4, num_stages=2),
        Config(max(16, bm // 2), bn, 32, num_warps=4, num_stages=2),
    ]
    return default, [default, *others]


def refine_sparse(
    A: Tensor, k: int, eps: float, index_dtype: torch.dtype = torch.int64
) -> tuple[Tensor, Tensor]:
    """Launch kernels 1+2 on a batch: A (B, N, N), contiguous, fp32/fp16/bf16.

    Returns ``(weights, indices)``, (B, N, min(k, N)) fp32 and ``index_dtype`` (int64 as in
    ``ops.refine_sparse``, or int32), with the contract of ``ops.refine_sparse``. One launch
    for the whole batch; no host sync once the config of this (N bucket, k bucket, dtype)
    is cached. Raises ValueError for MAX_TOPK < k < N.
    """
    b, n = A.shape[0], A.shape[-1]
    keep = min(k, n)
    w = torch.empty(b, n, keep, dtype=torch.float32, device=A.device)
    idx = torch.empty(b, n, keep, dtype=index_dtype, device=A.device)
    if b == 0:
        return w, idx
    if k >= n:
        bm, bn = 32, 64
        grid = (triton.cdiv(n, bm), b)
        rownorm_kernel[grid](A, w, idx, n, eps, BLOCK_M=bm, BLOCK_N=bn)
        return w, idx
    if k > MAX_TOPK:
        raise ValueError(f"the triton backend supports k <= {MAX_TOPK} (or k >= N), got k={k}")
    kp = next_pow2(k)
    default, candidates = topk_configs(kp)
    dot_dtype = tl.float16 if A.dtype == torch.float16 else tl.float32

    def run(cfg: Config) -> None:
        grid = (triton.cdiv(n, cfg.block_m), b)
        coneighbor_topk_kernel[grid](
            A, w, idx, n, keep, eps, LOG_KP=kp.bit_length() - 1,
            BLOCK_M=cfg.block_m, LOG_BN=cfg.block_n.bit_length() - 1, BLOCK_K=cfg.block_k,
            DOT_DTYPE=dot_dtype, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip

    cfg = choose_config(("topk", n_bucket(n), kp, A.dtype), default, candidates, run, A.device)
    run(cfg)
    return w, idx

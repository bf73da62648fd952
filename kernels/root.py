"""The pass before the similarity tiles: sqrt(A) in fp16, one power of four per row.

``R_i = fp16(sqrt(A_i · 4**-a_i))`` with ``4**a_i <= max_j A_ij < 4**(a_i + 1)``, found by
the same pass (one read of A): the scaled row peaks in [1, 4), so R < 2 never overflows
fp16 and rounds as ``fp16(sqrt(A_i))`` would (relative error <= 2**-11 for R >= 2**-14),
the same relative rounding as the tf32 a fp32 dot would use, for fp32, fp16 and bf16
attention alike, at half the bytes and twice the tensor-core rate. The tiles of
`coneighbor_topk` then make ``S' = R·Rᵀ = S_ij · 2**-(a_i + a_j)``, exact powers of two
that their keys undo. R is taken once per image, not on every load of a slice: the
(BLOCK_M + BLOCK_N)·N square roots per tile would cost more than its dot.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from adcam_fast.kernels.launch import next_pow2, on_device

ROOT_BLOCK = 4096
"""Lanes of a `root_kernel` program: whole rows up to this N (read once), as many as fill it
at the next power of two (`root_shape`), else one row in blocks of this many columns."""

ROOT_WARPS = 8
"""Warps of a `root_kernel` program: at most 16 entries a thread."""


@triton.jit
def pow2(e):
    """``2.0**e`` in fp32 for integers -126 <= e <= 127."""
    return ((127 + e) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _row_exponent(top):
    """a with ``4**a <= top < 4**(a + 1)`` for a row's largest entry ``top`` >= 0, clamped to
    -64 <= a <= 62 (a = -64 below 2**-126)."""
    e = ((top.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 126  # 2**(e-1) <= top < 2**e
    return (tl.minimum(tl.maximum(e, -126), 126) - 1) >> 1


@triton.jit
def _scaled_root(x, scale):
    """``fp16(sqrt_rn(v))`` of ``v = x · scale · scale`` >= 0 (scale = 2**-a applied twice:
    4**-a may not be an fp32 number), bitwise, from the IEEE square root of
    ``max(v, 2**-50)``: below 2**-50, sqrt(v) < 2**-25 rounds to fp16 zero, and so does
    2**-25 itself (to even). ``sqrt.rn`` branches to a slow path for inputs below about
    2**-101 (zeros included), which the masked lanes of a row and the underflowed entries of
    peaked rows would take."""
    return tl.sqrt_rn(tl.maximum(x * scale * scale, 2.0**-50)).to(tl.float16)


@triton.jit
def root_kernel(A, R, EXP, N, ROWS: tl.constexpr, BLOCK: tl.constexpr, TAIL: tl.constexpr,
                WHOLE: tl.constexpr):  # fmt: skip
    """Per row i of an image (B, N, N): ``R_i = fp16(sqrt(A_i · 4**-a_i))`` with
    ``4**a_i <= max_j A_ij < 4**(a_i + 1)`` (`_row_exponent`), a_i stored at ``EXP``.
    A program takes ROWS rows. WHOLE: each row is read once, as its first BLOCK <= N columns
    and the TAIL (a power of two, or 0) after them, which hold the rest (so lanes past N
    are at most those of the tail's power of two); else BLOCK columns at a time, twice (the
    second time from cache)."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    b = tl.program_id(1)
    row_ok = rows < N
    row_at = (b.to(tl.int64) * N + rows)[:, None] * N
    cols = tl.arange(0, BLOCK)[None, :]
    at = row_at + cols
    if WHOLE:  # the tail first, maxima as (ROWS, 1): where its layout (fewer entries a thread)
        # meets the head's, Triton converts the tail or the maxima, not the head
        top = tl.zeros((ROWS, 1), tl.float32)
        if TAIL > 0:
            tail_cols = BLOCK + tl.arange(0, TAIL)[None, :]
            tail_at = row_at + tail_cols
            tail_ok = row_ok[:, None] & (tail_cols < N)
            y = tl.load(A + tail_at, mask=tail_ok, other=0.0).to(tl.float32)
            top = tl.max(y, axis=1, keep_dims=True)
        x = tl.load(A + at, mask=row_ok[:, None], other=0.0).to(tl.float32)
        top = tl.maximum(top, tl.max(x, axis=1, keep_dims=True))
        e = _row_exponent(top)
        scale = pow2(-e)
        tl.store(R + at, _scaled_root(x, scale), mask=row_ok[:, None])
        if TAIL > 0:
            tl.store(R + tail_at, _scaled_root(y, scale), mask=tail_ok)
        tl.store(EXP + b * N + rows[:, None], e, mask=row_ok[:, None])
    else:
        top = tl.zeros((ROWS, BLOCK), tl.float32)
        for c0 in range(0, N, BLOCK):
            ok = row_ok[:, None] & (c0 + cols < N)
            top = tl.maximum(top, tl.load(A + at + c0, mask=ok, other=0.0).to(tl.float32))
        e = _row_exponent(tl.max(top, axis=1))
        scale = pow2(-e)[:, None]
        for c0 in range(0, N, BLOCK):
            ok = row_ok[:, None] & (c0 + cols < N)
            x = tl.load(A + at + c0, mask=ok, other=0.0).to(tl.float32)
            tl.store(R + at + c0, _scaled_root(x, scale), mask=ok)
        tl.store(EXP + b * N + rows, e, mask=row_ok)


def root_shape(n: int) -> dict[str, int | bool]:
    """The constexpr arguments of `root_kernel` at size N: rows of N <= ROOT_BLOCK whole, as
    many a program as fill ROOT_BLOCK lanes at the next power of two, each in its largest
    power of two of columns and a tail (576 = 512 + 64 and 2304 = 2048 + 256 leave no lane
    idle, 1296 = 1024 + 272 of 512 leaves 240); longer rows one a program, in blocks of
    ROOT_BLOCK."""
    if n > ROOT_BLOCK:
        return dict(ROWS=1, BLOCK=ROOT_BLOCK, TAIL=0, WHOLE=False)
    head = 1 << (n.bit_length() - 1)
    tail = next_pow2(n - head) if n > head else 0
    return dict(ROWS=ROOT_BLOCK // next_pow2(n), BLOCK=head, TAIL=tail, WHOLE=True)


def take_root(A: Tensor, out: Tensor, exponents: Tensor) -> None:
    """The pass before the tiles: ``out = fp16(sqrt(A_i · 4**-a_i))`` per row by
    `root_kernel`, the rows' a_i into ``exponents`` (B, N) int32, for A (B, N, N)
    contiguous: one read of A."""
    b, n = A.shape[0], A.shape[-1]
    shape = root_shape(n)
    with on_device(A.device):
        root_kernel[(triton.cdiv(n, shape["ROWS"]), b)](
            A, out, exponents, n, **shape, num_warps=ROOT_WARPS
        )

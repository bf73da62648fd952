"""Kernels 1+2: co-neighbor similarity, streaming per-row top-k, refinement epilogue.

For one image, with ``R = sqrt(A)``, the similarity ``S = R·Rᵀ`` (Eq. 6) is produced tile by
tile and folded into a running top-k per row; S never reaches device memory. The epilogue
turns the kept columns into the sparse refined attention of Eq. 7, exactly as
``adcam_fast.ops.refine_sparse`` does::

    idx[i, :]  = TOP(S[i, :], k)       ties toward the smaller column, places by descending S
    w[i, r]    = A[i, idx[i, r]] / Σ_r' A[i, idx[i, r']]
    mass <= eps  ->  idx[i, 0] = i, w[i, :] = (1, 0, ..., 0)   (the self row)

Tiling: a program owns ``BLOCK_M`` rows of one image and sweeps the column tiles of width
``BLOCK_N``, starting at the tile that holds its diagonal (the largest entries, S_ii, and
for real attention the spatial neighbours) so the running threshold rises early, then the
tiles after it, wrapping around (config ``lockstep``: the others from tile 0, one order for
every program, so that an image's programs read each tile at about one time and L2 holds the
tiles in use rather than whole images). With config ``parts`` = P > 1, P programs share a
row block, each over one of P runs of its column tiles (from the diagonal tile in the run
that holds it), and `merge_parts_kernel` merges their running lists before the epilogue: an
image takes P times the programs, which fills the GPU where one image's programs would not
(on an H200 at N = 2304, B = 1: 0.72 times the time), and the resident programs hold 1/P of
the images (their L2 hit rate went from 43 to 79 % at N = 2304, B = 128, for 0.96 times the
kernel's time: L2 misses do not hold the loop). Each S tile is a ``tl.dot`` over ``BLOCK_K``
slices of R in fp16, fp32 accumulation. R is taken once per image by the pass of `root`,
in chunks of whole images of at most ``ROOT_CHUNK`` entries, as ``R_i = fp16(sqrt(A_i ·
4**-a_i))`` with a power of four per row that puts the row's peak in [1, 4). The tiles make
``S' = R·Rᵀ = S_ij · 2**-(a_i + a_j)``, and the keys rank ``S'_ij · 2**(a_j - a_i) = S_ij ·
4**-a_i``: exact powers of two, one constant per row, so every row's order is that of S.
The slices arrive by masked pointer loads, or (config ``tma``) by the copy engine from two
TMA descriptors of R viewed as (B·N, N): the same values wherever S is used (slices past row
N hold the next image's rows, or zeros after the last image, and the keys of rows and
columns >= N are masked), in the same order, so the same S; tests check both bitwise.
With config ``flat``, one loop runs over the (tile, K step) pairs and a tile's keys and
merge sit in a branch on its last K step, so that the software pipeline already has the next
tile's first slices in flight during them; the same S, merged in the same order.

Top-k keys: S >= 0, so the bits of an fp32 value read as an integer order like the value.
With ``v = S_ij · 4**-a_i`` (< N·2**(a_j - a_i + 2): below 2**66 unless row maxima of one
image differ by about 2**100), ``f = min(max(bits(v) - bits(2**-62), 0), 2**30 - 1)`` and
``c = N.bit_length()``, a key is the int32 ``(f >> (c - 1)) << c | (N - j)``: distinct per
column, larger S wins, and S values equal in their top 24 - c significant bits (and all v
below 2**-62, or from 2**66) go to the smaller column. That truncation, 2**-(24 - c)
relative (2**-11 at N = 4096), is below the error of S itself (2**-10, from fp16 R), and
int32 keys take half the registers and instructions of exact int64 ones in the sorting
network. Padding (rows or columns >= N) is -1. The running top ``KP = next_pow2(k)`` keys
per row are kept sorted ascending; keys are merged in by the bitonic rule (`bitonic`)
``acc <- bitonic_merge(max(acc, topk(x, KP)))`` (an ascending and a descending sorted
list, compared place by place, keep the KP largest of both as a bitonic list, which the
merge sorts). Only keys above a row's current k-th best can enter. With ``LOG_CB = 0`` a
tile holding any such key is merged whole; with ``NARROW > 0`` too, unless every row of
the tile holds at most NARROW of them: then they are taken out one at a time, largest
first, by row maxima (`merge_largest`), which costs a few operations per key of the tile
and pass instead of a sorting network over it. Otherwise those candidates are parked,
compacted by a prefix sum, in ``2**LOG_CB`` scratch slots per row (global memory that
stays in L1/L2, ordered by CTA barriers), and merged before a tile that could overflow a
row's slots, and at the end: the bitonic work then follows the number of candidates,
which falls like k/t over the tiles t of a row, not N. The first k of the final list
(read from the top) are the chosen columns. Keys are unique, so for given S values the
result depends on neither the tile order, the merge schedule nor the parts: deterministic.

With ``REFINE`` off, the epilogue writes ``TOP(S, k)`` itself instead (`similarity_topk`):
each kept column's S, read back from its key's field and unscaled, beside its index.

``k >= N`` keeps every column: for the refinement, `rownorm_kernel` only normalises rows
(no similarity).
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.compiler import CompiledKernel
from triton.tools.tensor_descriptor import TensorDescriptor

from adcam_fast.kernels import launch
from adcam_fast.kernels.bitonic import bitonic_merge, kth_key, merge_largest, merge_tile
from adcam_fast.kernels.launch import Config, choose_config, n_bucket, next_pow2, on_device
from adcam_fast.kernels.root import pow2, take_root

MAX_TOPK = 1024
"""The largest k < N supported (the running top-k of a row block is held on chip)."""

MERGE_ENTRIES = 4096
"""Keys per program of `merge_parts_kernel`: 64 rows of a running top-64 on 4 warps."""

S_FLOOR_BITS = tl.constexpr((127 - 62) << 23)
"""The fp32 bits of 2**-62: smaller S values share the lowest key field (see the module)."""

ROOT_CHUNK = 2**26
"""Entries of sqrt(A) held at a time (128 MiB of fp16), in whole images (at least one): at
most 202 images a launch at N = 576, 39 at 1296, 12 at 2304; on a GPU, as many of those as
fill whole waves of programs (`images_per_launch`). Fuller waves pay: on an H200, chunks of
2**28 took the stage 0.91 times the time at N = 2304 and 0.93 at 1296, B = 128, but the
buffer is extra memory that grows with the chunk up to B·N² halves of floats: 2**28 broke
the bound of the memory test (half of a dense S at B = 32, N = 2304;
bench/kernels_notes.md)."""


@triton.jit
def _merge_parked(
    acc, buf, held, LOG_KP: tl.constexpr, LOG_CW: tl.constexpr, ROW_WARPS: tl.constexpr
):
    """`merge_tile` of the keys each row has parked in its slots ``[0, held)`` of the scratch
    ``buf`` (a (M, 1) block of row pointers), ``2**LOG_CW`` slots at a time (the tile width
    or KP: the least registers, and no more sorting per key than a merged tile)."""
    CW: tl.constexpr = 1 << LOG_CW
    slot = tl.arange(0, CW)
    tl.debug_barrier()  # every thread's parked keys are stored before any is read
    for h in range(0, tl.max(held), CW):
        x = tl.load(buf + h + slot[None, :], mask=(h + slot)[None, :] < held[:, None], other=-1)
        acc = merge_tile(acc, x, LOG_KP, LOG_CW, ROW_WARPS)
    tl.debug_barrier()  # and read before the slots are reused
    return acc


@triton.jit
def _column_tile(t, first, n_tiles, LOCKSTEP: tl.constexpr):
    """The column tile that a program whose diagonal is tile ``first`` takes at its step t:
    its diagonal first, then the others in order from tile 0 (LOCKSTEP: the same order for
    every program, so that an image's programs read each column tile at about one time),
    or the ones after it, wrapping around."""
    if LOCKSTEP:
        return tl.where(t == 0, first, t - 1 + (t - 1 >= first).to(tl.int32))
    j = first + t
    return tl.where(j >= n_tiles, j - n_tiles, j)


@triton.jit
def _slices(R, RM, RN, img, pid_b, row0, col0, k0, N, BLOCK_M: tl.constexpr,
            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """The slices ``R[row0 : row0 + BLOCK_M, k0 : k0 + BLOCK_K]`` and the same of the
    columns' rows from ``col0``, of image ``pid_b`` (at ``img``), in fp16: by the copy
    engine (RM, RN: rows past N hold another image's, or 0) or by masked loads (0 past N)."""
    if RM is not None:
        r = RM.load([pid_b * N + row0, k0])
        c = RN.load([pid_b * N + col0, k0])
    else:
        rows = row0 + tl.arange(0, BLOCK_M)
        cols = col0 + tl.arange(0, BLOCK_N)
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < N
        r = tl.load(R + img + rows[:, None] * N + kk[None, :],
                    mask=(rows < N)[:, None] & k_ok[None, :], other=0.0)  # fmt: skip
        c = tl.load(R + img + cols[:, None] * N + kk[None, :],
                    mask=(cols < N)[:, None] & k_ok[None, :], other=0.0)  # fmt: skip
    return r, c


@triton.jit
def _keys(s, row_ok, cols, a_rows, EXP, N, C):
    """The int32 keys of a tile of ``S' = R·Rᵀ`` (the module's rule) for its rows, whose
    exponents are ``a_rows``, and columns ``cols`` of one image (exponents at ``EXP``), -1
    at rows or columns >= N: of ``S'_ij · 2**(a_j - a_i)``, which is ``S_ij · 4**-a_i``."""
    return _scaled_keys(_scale(s, cols, a_rows, EXP, N), row_ok, cols, N, C)


@triton.jit
def _scale(s, cols, a_rows, EXP, N):
    """``S'_ij · 2**(a_j - a_i)`` for a tile of S' with its rows' exponents ``a_rows`` and
    columns ``cols`` (exponents at ``EXP``; 0 past N)."""
    a_cols = tl.load(EXP + cols, mask=cols < N, other=0)
    return s * pow2(a_cols[None, :] - a_rows[:, None])  # |a_j - a_i| <= 126: exact


@triton.jit
def _scaled_keys(v, row_ok, cols, N, C):
    """`_keys` of a tile already scaled by `_scale`."""
    field = tl.minimum(tl.maximum(v.to(tl.int32, bitcast=True) - S_FLOOR_BITS, 0), 2**30 - 1)
    key = ((field >> (C - 1)) << C) | (N - cols)[None, :]
    return tl.where(row_ok[:, None] & (cols < N)[None, :], key, -1)


@triton.jit
def _fold(acc, kth, key, K_KEEP, LOG_KP: tl.constexpr, LOG_BN: tl.constexpr,
          NARROW: tl.constexpr, ROW_WARPS: tl.constexpr):  # fmt: skip
    """acc and its k-th key after a tile of keys (M, 2**LOG_BN) with ``LOG_CB = 0``: merged
    whole if a row holds more than NARROW keys above its k-th, else by `merge_largest`."""
    KP: tl.constexpr = 1 << LOG_KP
    new = (key > kth[:, None]).to(tl.int32)  # could still enter the top k
    # The most candidates in one row (without NARROW, whether there are any).
    most = tl.max(tl.sum(new, axis=1)) if NARROW > 0 else tl.max(new)
    if most > NARROW:
        acc = merge_tile(acc, key, LOG_KP, LOG_BN, ROW_WARPS)
        kth = kth_key(acc, K_KEEP, KP)
    elif NARROW > 0:
        if most > 0:
            acc = merge_largest(acc, tl.where(new > 0, key, -1), most, LOG_KP)
            kth = kth_key(acc, K_KEEP, KP)
    return acc, kth


@triton.jit
def _epilogue(acc, rows, pid_b, A, EXP, W, IDX, N, C, K_KEEP, eps, REFINE: tl.constexpr):
    """The outputs of rows ``rows`` of image ``pid_b`` from their top-KP keys ``acc``
    (BLOCK_M, KP), ascending: place p of the descending order is ``acc[:, KP - 1 - p]``.
    REFINE: the refined weights of Eq. 7 (the self row where the kept mass is <= eps) and
    columns; else ``TOP(S, k)``, S read back from the key's field and the row's exponent
    (at ``EXP``, per image row)."""
    KP: tl.constexpr = acc.shape[1]
    img = pid_b.to(tl.int64) * N * N
    row_ok = rows < N
    place = KP - 1 - tl.arange(0, KP)
    cols = N - (acc & ((1 << C) - 1))  # the low C bits hold N - j
    keep = row_ok[:, None] & (place < K_KEEP)[None, :]
    out = (pid_b.to(tl.int64) * N + rows[:, None]) * K_KEEP + place[None, :]
    if REFINE:
        a = tl.load(A + img + rows[:, None] * N + cols, mask=keep, other=0.0).to(tl.float32)
        mass = tl.sum(a, axis=1)
        empty = (mass <= eps)[:, None]
        lead = (place == 0)[None, :]
        w = tl.where(empty, tl.where(lead, 1.0, 0.0), a / tl.maximum(mass, eps)[:, None])
        idx = tl.where(empty & lead, rows[:, None], cols)
    else:  # S from the key's field (truncated; 0 below 2**-62), times 4**a_i from the root
        field = (acc >> C) << (C - 1)
        w = tl.where(field > 0, (field + S_FLOOR_BITS).to(tl.float32, bitcast=True), 0.0)
        scale = pow2(tl.load(EXP + pid_b * N + rows, mask=row_ok, other=0))[:, None]
        w = w * scale * scale
        idx = cols
    tl.store(W + out, w, mask=keep)
    tl.store(IDX + out, idx.to(IDX.dtype.element_ty), mask=keep)


@triton.jit
def coneighbor_topk_kernel(
    R,  # (B, N, N) fp16 root of A (`root.root_kernel`), row i scaled by 2**-a_i
    RM,  # TensorDescriptor of R as (B·N, N), blocks (BLOCK_M, BLOCK_K); None: pointer loads
    RN,  # the same, blocks (BLOCK_N, BLOCK_K)
    A,  # (B, N, N) attention, fp32 / fp16 / bf16: the refinement reads it at the kept columns
    EXP,  # (B, N) int32: the rows' exponents a_i from `root.root_kernel`
    BUF,  # (B, grid_m * BLOCK_M, 2**LOG_CB) int32 scratch: parked candidate keys
    W,  # (B, N, K_KEEP) fp32 out: refined weights (REFINE) or S at the kept columns
    IDX,  # (B, N, K_KEEP) int32 / int64 out: column indices
    KEYS,  # (B, N, PARTS, KP) int32 out: each part's running list (PARTS > 1, else None)
    N,
    C,  # N.bit_length(): the key's column field
    K_KEEP,
    eps,
    LOG_KP: tl.constexpr,  # KP = 2**LOG_KP = next_pow2(K_KEEP) <= BLOCK_N
    BLOCK_M: tl.constexpr,
    LOG_BN: tl.constexpr,  # BLOCK_N = 2**LOG_BN, >= KP when LOG_CB = 0
    BLOCK_K: tl.constexpr,
    LOG_CB: tl.constexpr,  # 0: merge tiles directly; else park candidates in 2**LOG_CB slots
    NARROW: tl.constexpr,  # LOG_CB = 0: tiles with <= NARROW keys per row to `merge_largest`
    REFINE: tl.constexpr,  # epilogue: the refinement (Eq. 7), or TOP(S, k) as (S, index)
    ROW_WARPS: tl.constexpr,  # warps split the rows, not a row's columns (`bitonic.topk_desc`)
    FLAT: tl.constexpr,  # one loop over (tile, K step) instead of a K loop per tile (LOG_CB 0)
    LOCKSTEP: tl.constexpr,  # column tiles in one order for all programs (`_column_tile`)
    PARTS: tl.constexpr,  # programs per row block, each over a share of the column tiles
):
    KP: tl.constexpr = 1 << LOG_KP
    BLOCK_N: tl.constexpr = 1 << LOG_BN
    LOG_CW: tl.constexpr = LOG_KP if LOG_KP > LOG_BN else LOG_BN  # parked keys merged at once
    pid = tl.program_id(0)
    pid_m = pid // PARTS
    pid_b = tl.program_id(1)
    img = pid_b.to(tl.int64) * N * N
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    exp = EXP + pid_b * N  # this image's row exponents
    a_rows = tl.load(exp + rows, mask=row_ok, other=0)
    slot_rows = (pid_b * tl.num_programs(0) + pid).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    buf = BUF + (slot_rows[:, None] << LOG_CB)
    held = tl.zeros((BLOCK_M,), tl.int32)  # keys parked per row

    acc = tl.full((BLOCK_M, KP), -1, tl.int32)  # running top-KP keys, ascending
    kth = tl.full((BLOCK_M,), -1, tl.int32)  # k-th largest key so far: the bar to enter
    # This part's column tiles [lo, lo + n_tiles), from its diagonal tile if it holds it.
    part = pid % PARTS
    all_tiles = (N + BLOCK_N - 1) // BLOCK_N
    lo = part * all_tiles // PARTS
    n_tiles = (part + 1) * all_tiles // PARTS - lo
    first = (pid_m * BLOCK_M) // BLOCK_N - lo
    first = tl.where((first >= 0) & (first < n_tiles), first, 0)
    if FLAT:  # one loop over (tile, K step): the next tile's first slices load meanwhile
        tl.static_assert(LOG_CB == 0, "FLAT merges tiles directly")
        k0 = 0
        t = 0
        s = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for _ in range(n_tiles * tl.cdiv(N, BLOCK_K)):
            col0 = (lo + _column_tile(t, first, n_tiles, LOCKSTEP)) * BLOCK_N
            r, c = _slices(R, RM, RN, img, pid_b, pid_m * BLOCK_M, col0, k0, N,
                           BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip
            s = tl.dot(r, tl.trans(c), s)
            last = k0 + BLOCK_K >= N  # the tile's last K step
            if last:
                key = _keys(s, row_ok, col0 + tl.arange(0, BLOCK_N), a_rows, exp, N, C)
                acc, kth = _fold(acc, kth, key, K_KEEP, LOG_KP, LOG_BN, NARROW, ROW_WARPS)
                s = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
            k0 = tl.where(last, 0, k0 + BLOCK_K)
            t = tl.where(last, t + 1, t)
    else:
        for t in range(n_tiles + 1):  # the last pass only merges what is still parked
            if LOG_CB > 0:
                if (tl.max(held) > (1 << LOG_CB) - BLOCK_N) | (t == n_tiles):
                    acc = _merge_parked(acc, buf, held, LOG_KP, LOG_CW, ROW_WARPS)
                    kth = kth_key(acc, K_KEEP, KP)
                    held = tl.zeros((BLOCK_M,), tl.int32)
            if t < n_tiles:
                col0 = (lo + _column_tile(t, first, n_tiles, LOCKSTEP)) * BLOCK_N
                cols = col0 + tl.arange(0, BLOCK_N)  # taken after the K loop, 3.8 spills
                s = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
                for k0 in range(0, N, BLOCK_K):
                    r, c = _slices(R, RM, RN, img, pid_b, pid_m * BLOCK_M, col0, k0, N,
                                   BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip
                    s = tl.dot(r, tl.trans(c), s)
                key = _keys(s, row_ok, cols, a_rows, exp, N, C)
                if LOG_CB == 0:
                    acc, kth = _fold(acc, kth, key, K_KEEP, LOG_KP, LOG_BN, NARROW, ROW_WARPS)
                else:
                    new = (key > kth[:, None]).to(tl.int32)  # could still enter the top k
                    spot = held[:, None] + tl.cumsum(new, axis=1) - 1
                    tl.store(buf + spot, key, mask=new > 0)
                    held += tl.sum(new, axis=1)

    if PARTS > 1:  # the parts' lists meet in `merge_parts_kernel`
        out = ((pid_b * N + rows) * PARTS + part).to(tl.int64)[:, None] * KP
        tl.store(KEYS + out + tl.arange(0, KP)[None, :], acc, mask=row_ok[:, None])
    else:
        _epilogue(acc, rows, pid_b, A, EXP, W, IDX, N, C, K_KEEP, eps, REFINE)


@triton.jit
def merge_parts_kernel(
    KEYS,  # (B, N, PARTS, KP) int32: each part's top-KP keys of a row, ascending
    A,  # as in `coneighbor_topk_kernel`, and the rest of its epilogue's arguments
    EXP,
    W,
    IDX,
    N,
    C,
    K_KEEP,
    eps,
    LOG_KP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    PARTS: tl.constexpr,
    REFINE: tl.constexpr,
):
    """The top-KP keys of each row over its parts' lists (column sets that do not meet, so
    the list the whole row would have made: the same output), then the epilogue. Each next
    list is read in reverse, descending, so that ``max(acc, list)`` keeps the KP largest of
    both as a bitonic run, which `bitonic_merge` sorts."""
    KP: tl.constexpr = 1 << LOG_KP
    pid_b = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = (rows < N)[:, None]
    place = tl.arange(0, KP)[None, :]
    lists = KEYS + ((pid_b * N + rows) * PARTS).to(tl.int64)[:, None] * KP
    acc = tl.load(lists + place, mask=row_ok, other=-1)
    for p in tl.static_range(1, PARTS):
        down = tl.load(lists + p * KP + KP - 1 - place, mask=row_ok, other=-1)
        acc = bitonic_merge(tl.maximum(acc, down), LOG_KP, 0, False)
    _epilogue(acc, rows, pid_b, A, EXP, W, IDX, N, C, K_KEEP, eps, REFINE)


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


@functools.cache
def topk_configs(
    kp: int, aligned: bool = False, hopper: bool = False, warp_mma: bool = False
) -> tuple[Config, tuple[Config, ...]]:
    """Default and candidate configs for a running top-``kp`` at a size N that the copy
    engine can read (``aligned``, see `tma_fits`) or not, on a Hopper GPU (``hopper``: the
    warp-specialized kernel's `WS_CANDIDATE` joins them) or not, on a GPU whose ``tl.dot``
    is a warp's ``mma.sync`` (``warp_mma``, `launch.warp_mma`: Ampere, Ada, 12.x) or not.

    ``slots`` (kernel argument ``LOG_CB``) chooses the merge schedule: 0 merges every tile
    that holds a candidate (needs ``block_n >= kp``); otherwise candidates are parked in that
    many slots per row (a multiple of the merge width ``max(block_n, kp)``, so that a tile
    fits after a merge), a candidate only for kp > 64. ``narrow`` (with slots 0; kp <= 64,
    whose builds do not spill with it) merges a tile whose rows each hold at most that many
    candidates by `merge_largest`, the rest whole.
    For kp <= 64 the default S tile is 64×128 with BLOCK_K = 64 (one warpgroup issuing
    m64n128k16 wgmma). Where N is aligned, R's slices come by the copy engine (``tma``) and
    the default runs one loop over (tile, K step) (``flat``); the candidates beside it are
    three stages capped at 168 registers and two at 128 (more programs per SM), the default
    in two ``parts``, 128×128 narrow = 16 in ``lockstep``, and 128×256 narrow = 32 (the
    lowest floor, and the fastest on spatially structured rows). Elsewhere they take pointer
    loads: three stages (the default), four, narrow = 16, and 128×128 narrow = 16. Each was
    the fastest somewhere on an H200 (B = 1, 32, 128; N = 576 to 2304), and none of the
    configs dropped was in the last run that timed it (bench/kernels_notes.md, v3 to v29).
    With ``warp_mma``, those 64×128 tiles on 4 warps spill (sm_80: 400 bytes a thread by
    pointer loads; TMA there is Triton's fallback to plain loads, not pipelined, and 968),
    so for kp <= 64 the default is 64×64 on 4 warps (two programs per SM), beside it 64×128
    on 8 warps with three stages, four and narrow = 16, and 32×128 on 4 warps, all by
    pointer loads. Every one of these sits near 255 registers; with Triton 3.8 none spills
    at kp = 64 for sm_80, 86, 89 or 120 (bench/compile_check.py --arch, fp32 and bf16), and
    the default's fp32 build spills for neither sm_80 nor sm_89 with 3.4, 3.6, 3.7 or 3.9
    either, where the others keep 4 to 72 bytes on the stack in some builds (64×256 on 8
    warps spills for sm_120). None has been timed on such a GPU yet.
    For larger kp the row block shrinks so that the (BLOCK_M, kp) running list and the
    merged block stay in registers, and beyond kp = 256 BLOCK_K shrinks so that the
    (kp, BLOCK_K) column slices fit in shared memory; bench/compile_check.py lists every
    config's registers, spills and shared memory for sm_90a.
    On a GPU, S is accumulated one k16 MMA at a time in column order, into one accumulator
    (the slices past N add exact zeros), so that autotuning should not move S by a
    rounding. (The MMA instruction shape may still differ with the tiling or the warps; the
    interpreter's dot rounds once per K step; ``ADCAM_AUTOTUNE=0`` pins the default for
    bitwise reproducibility across processes.) For given S, every schedule keeps the same
    columns.
    """
    if kp <= 64 and warp_mma:
        default = Config(64, 64, 64, num_warps=4, num_stages=3)
        return default, (
            default,
            Config(64, 128, 64, num_warps=8, num_stages=3),
            Config(64, 128, 64, num_warps=8, num_stages=4),
            Config(64, 128, 64, num_warps=8, num_stages=3, narrow=16),
            Config(32, 128, 64, num_warps=4, num_stages=3),
        )
    if kp <= 64 and aligned:
        default = Config(64, 128, 64, num_warps=4, num_stages=4, tma=True, flat=True)
        return default, (
            default,
            Config(64, 128, 64, num_warps=4, num_stages=3, maxnreg=168, tma=True),
            Config(64, 128, 64, num_warps=4, num_stages=2, maxnreg=128, tma=True),
            dataclasses.replace(default, parts=2),
            Config(128, 128, 64, num_warps=8, num_stages=4, narrow=16, tma=True, lockstep=True),
            Config(128, 256, 64, num_warps=8, num_stages=3, narrow=32, tma=True),
            *([WS_CANDIDATE] if hopper else []),
        )
    if kp <= 64:
        default = Config(64, 128, 64, num_warps=4, num_stages=3)
        return default, (
            default,
            Config(64, 128, 64, num_warps=4, num_stages=4),
            Config(64, 128, 64, num_warps=4, num_stages=3, narrow=16),
            Config(128, 128, 64, num_warps=8, num_stages=4, narrow=16),
        )
    bm = 32 if kp == 128 else 16
    bk, stages = (64, 3) if kp <= 256 else (16, 2)  # a (kp, 64) slice per stage would not fit
    default = Config(bm, kp, bk, num_warps=8, num_stages=stages)
    return default, (default, Config(bm, 64, bk, num_warps=8, num_stages=stages, slots=2 * kp))


WS_CANDIDATE = Config(
    128, 128, 64, num_warps=8, num_stages=4, tma=True, ws=True, parts=2, lane_pairs=True
)
"""The warp-specialized kernel's candidate (kp <= 64, aligned N, Hopper): 128×128 tiles, 8
merge warps holding a row on two lanes, four operand stages and one S buffer, two parts of
the column tiles."""


def check_config(cfg: Config, kp: int) -> None:
    """Raises ValueError naming the field of ``cfg`` that `coneighbor_topk_kernel` cannot
    run with for a running top-``kp``: block sizes powers of two >= 16 (the dot's least),
    ``num_warps`` a power of two, ``slots`` 0 (then ``block_n >= kp``: a tile merges whole)
    or a power of two >= ``block_n`` (a tile's candidates fit after a merge), and ``flat``
    only with ``slots`` 0; ``ws`` (`coneighbor_topk_ws`) with ``tma``, without ``slots``,
    ``narrow``, ``flat`` or ``maxnreg``, and a tile of at least 64 rows that one MMA
    warpgroup holds (block_m·block_n <= 128·128); ``lane_pairs`` with ``ws`` and at least
    16 rows a merge warp; ``mma_scales`` with ``ws``."""
    for name, least in (("block_m", 16), ("block_n", 16), ("block_k", 16), ("num_warps", 1)):
        if not least <= (v := getattr(cfg, name)) == next_pow2(v):
            raise ValueError(f"config {name} must be a power of two >= {least}, got {v}")
    if cfg.slots == 0 and cfg.block_n < kp:
        raise ValueError(
            f"config block_n must be >= next_pow2(k) = {kp} with slots 0, got {cfg.block_n}"
        )
    if cfg.slots and not cfg.block_n <= cfg.slots == next_pow2(cfg.slots):
        raise ValueError(
            f"config slots must be 0 or a power of two >= block_n = {cfg.block_n}, got {cfg.slots}"
        )
    if cfg.flat and cfg.slots:
        raise ValueError(f"config flat needs slots 0, got {cfg.slots}")
    for name in ("narrow", "parts", "maxnreg"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"config {name} must be >= 0, got {getattr(cfg, name)}")
    if cfg.ws:
        if not cfg.tma:
            raise ValueError("config ws needs tma (its copy warp takes R by the copy engine)")
        for name in ("slots", "narrow", "flat", "maxnreg"):
            if getattr(cfg, name):
                raise ValueError(f"config ws takes no {name}, got {getattr(cfg, name)}")
        if not (cfg.block_m >= 64 and cfg.block_m * cfg.block_n <= 128 * 128):
            raise ValueError(
                "config ws needs block_m >= 64 and block_m·block_n <= 16384 (the MMA "
                f"warpgroup's tile), got {cfg.block_m}×{cfg.block_n}"
            )
    if cfg.lane_pairs and not (cfg.ws and cfg.block_m >= 16 * cfg.num_warps):
        raise ValueError(
            "config lane_pairs needs ws and block_m >= 16·num_warps (a merge warp's 32 "
            f"lanes on 16 rows), got ws={cfg.ws}, {cfg.block_m} rows on {cfg.num_warps} warps"
        )
    if cfg.mma_scales and not cfg.ws:
        raise ValueError("config mma_scales needs ws (the Gluon kernel's MMA warpgroup)")


def topk_constants(kp: int, cfg: Config, refine: bool) -> dict[str, int | bool]:
    """The constexpr arguments of `coneighbor_topk_kernel` for a running top-``kp`` under
    ``cfg``, with the refinement epilogue or ``TOP(S, k)`` (``refine``): what `_topk`
    launches and bench/compile_check.py builds."""
    return dict(
        LOG_KP=kp.bit_length() - 1,
        BLOCK_M=cfg.block_m,
        LOG_BN=cfg.block_n.bit_length() - 1,
        BLOCK_K=cfg.block_k,
        LOG_CB=max(cfg.slots, 1).bit_length() - 1,
        NARROW=min(cfg.narrow, kp),
        ROW_WARPS=cfg.block_m >= 16 * cfg.num_warps,  # at least 16 rows a warp
        REFINE=refine,
        FLAT=cfg.flat,
        LOCKSTEP=cfg.lockstep,
        PARTS=max(cfg.parts, 1),
    )


def refine_sparse(
    A: Tensor,
    k: int,
    eps: float,
    index_dtype: torch.dtype = torch.int64,
    config: Config | None = None,
) -> tuple[Tensor, Tensor]:
    """Launch kernels 1+2 on a batch: A (B, N, N), contiguous, fp32/fp16/bf16.

    Returns ``(weights, indices)``, (B, N, min(k, N)) fp32 and ``index_dtype`` (int64 as in
    ``ops.refine_sparse``, or int32), with the contract of ``ops.refine_sparse``. Images go
    in chunks of at most ``ROOT_CHUNK`` entries (one chunk for B·N² <= ROOT_CHUNK), each
    a sqrt pass (`root.take_root`) and a top-k launch (and `merge_parts_kernel` for a
    config in parts); no host sync once the config of this (N, k, batch buckets, dtype) is
    cached; ``config`` fixes one instead (`check_config` says which it can take).
    Raises ValueError for MAX_TOPK < k < N, and for a ``config`` the kernel cannot run.
    """
    b, n = A.shape[0], A.shape[-1]
    if k < n or b == 0:
        return _topk(A, k, eps, index_dtype, config, refine=True)
    w = torch.empty(b, n, n, dtype=torch.float32, device=A.device)
    idx = torch.empty(b, n, n, dtype=index_dtype, device=A.device)
    bm, bn = 32, 64
    with on_device(A.device):
        for lo in range(0, b, launch.GRID_Y):
            hi = min(b, lo + launch.GRID_Y)
            rownorm_kernel[(triton.cdiv(n, bm), hi - lo)](
                A[lo:hi], w[lo:hi], idx[lo:hi], n, eps, BLOCK_M=bm, BLOCK_N=bn
            )
    return w, idx


def similarity_topk(
    A: Tensor, k: int, index_dtype: torch.dtype = torch.int64, config: Config | None = None
) -> tuple[Tensor, Tensor]:
    """Kernel 1 alone on a batch: ``TOP(S, k)`` as ``(values, indices)``, each
    (B, N, min(k, N)), places by descending S, ties toward the smaller column (k >= N: every
    column, in that order). A as in `refine_sparse`.

    A value is S as the kernel ranked it: from fp16 sqrt(A) (relative error <= 2**-10 per
    term), truncated to ``24 - N.bit_length()`` significant bits, and 0 below 2**-62 times
    the row's power-of-four scale. Raises ValueError for min(k, N) > MAX_TOPK.
    """
    return _topk(A, k, 0.0, index_dtype, config, refine=False)


def tma_fits(n: int) -> bool:
    """Whether the copy engine can take R's slices at size N: TMA needs each row of R on 16
    bytes, N divisible by 8 (the ``tma`` configs run only then)."""
    return n % 8 == 0


@functools.cache
def images_per_launch(b: int, cap: int, programs: int, slots: int) -> int:
    """Images per launch, at most ``cap``, that run ``b`` images of ``programs`` programs
    each in the fewest waves of ``slots`` resident programs, then in the fewest launches.
    A launch lasts as long as its last wave, so one whose programs part-fill that wave
    leaves SMs idle: ``cap`` images a launch at N = 2304 on an H200 (12 images, 432 programs
    of 64 rows for 264 slots) take 22 waves for B = 128 where 7 (252 programs) take 19.
    Per-image work is independent, so the chunking changes no result."""
    if b <= cap:  # one launch: no split has fewer waves
        return b

    def cost(c: int) -> tuple[int, int]:
        full, rest = divmod(b, c)
        waves = full * triton.cdiv(c * programs, slots) + triton.cdiv(rest * programs, slots)
        return waves, triton.cdiv(b, c)

    return min(range(cap, 0, -1), key=cost)


_RESIDENT: dict[tuple, int] = {}
"""Programs per SM of the top-k builds that chunks were planned for, by (config, kp, refine,
dtype, device)."""


def _topk(
    A: Tensor, k: int, eps: float, index_dtype: torch.dtype, config: Config | None, refine: bool
) -> tuple[Tensor, Tensor]:
    """The sqrt pass and the top-k kernel over chunks of images: at most ``ROOT_CHUNK``
    entries each, as many as fill the GPU's waves best (`images_per_launch`)."""
    b, n = A.shape[0], A.shape[-1]
    keep = min(k, n)
    w = torch.empty(b, n, keep, dtype=torch.float32, device=A.device)
    idx = torch.empty(b, n, keep, dtype=index_dtype, device=A.device)
    if b == 0:
        return w, idx
    if keep > MAX_TOPK:
        whole = " (or k >= N)" if refine else ""
        raise ValueError(f"the triton backend supports k <= {MAX_TOPK}{whole}, got k={k}")
    kp = next_pow2(keep)
    aligned = tma_fits(n)
    if config is not None:
        check_config(config, kp)
        if config.tma and not aligned:
            raise ValueError(f"a config with tma needs N divisible by 8, got N={n}")
    hopper = launch.can_warp_specialize(A.device)
    if config is not None and config.ws and not hopper:
        raise ValueError(f"a config with ws needs a Hopper GPU (sm_90) and Gluon, got {A.device}")
    default, candidates = topk_configs(kp, aligned, hopper, launch.warp_mma(A.device))
    cap = max(1, min(b, ROOT_CHUNK // (n * n), launch.GRID_Y))  # images on the grid's y
    root = torch.empty(cap, n, n, dtype=torch.float16, device=A.device)
    exponents = torch.empty(cap, n, dtype=torch.int32, device=A.device)

    def programs(cfg: Config) -> int:
        """Top-k programs per image: its row blocks, times the parts of each."""
        return triton.cdiv(n, cfg.block_m) * max(cfg.parts, 1)

    def topk_launch(cfg: Config, lo: int, hi: int, warmup: bool) -> CompiledKernel:
        """The top-k kernel on images [lo, hi), their sqrt(A) in ``root`` and ``exponents``;
        with ``warmup`` only built. Returns the build."""
        r, exp = root[: hi - lo], exponents[: hi - lo]
        options = topk_constants(kp, cfg, refine) | cfg.launch_options()
        parts = options["PARTS"]
        grid = (programs(cfg), hi - lo)
        keys = None  # each part's list, (images, N, parts, kp)
        if parts > 1:
            keys = torch.empty(hi - lo, n, parts, kp, dtype=torch.int32, device=A.device)
        a, w_out, idx_out = A[lo:hi], w[lo:hi], idx[lo:hi]
        if cfg.ws:
            from adcam_fast.kernels import coneighbor_topk_ws

            kernel = coneighbor_topk_ws.launch(cfg, grid, r, exp, a, w_out, idx_out, keys, keep,
                                               eps, options, warmup)  # fmt: skip
        else:
            parked = grid[0] * cfg.block_m * cfg.slots * grid[1]  # whole tiles: none
            buf = torch.empty(max(parked, 1), dtype=torch.int32, device=A.device)
            rm = rn = None
            if cfg.tma:
                rm, rn = (
                    TensorDescriptor.from_tensor(r.view(-1, n), [rows, cfg.block_k])
                    for rows in (cfg.block_m, cfg.block_n)
                )
            args = (r, rm, rn, a, exp, buf, w_out, idx_out, keys, n, n.bit_length(), keep, eps)
            if warmup:
                kernel = coneighbor_topk_kernel.warmup(*args, grid=grid, **options)
            else:
                kernel = coneighbor_topk_kernel[grid](*args, **options)
        if warmup:
            return kernel
        if parts > 1:
            bm = MERGE_ENTRIES // kp
            merge_parts_kernel[(triton.cdiv(n, bm), hi - lo)](
                keys, a, exp, w_out, idx_out, n, n.bit_length(), keep, eps,
                LOG_KP=kp.bit_length() - 1, BLOCK_M=bm, PARTS=parts, REFINE=refine,
            )  # fmt: skip
        return kernel

    def run(cfg: Config, lo: int = 0, hi: int = cap) -> None:
        """Images [lo, hi) under ``cfg``: their sqrt pass, then the top-k launch."""
        take_root(A[lo:hi], root[: hi - lo], exponents[: hi - lo])
        topk_launch(cfg, lo, hi, warmup=False)

    with on_device(A.device):
        key = ("topk", n_bucket(n), aligned, kp, next_pow2(cap), A.dtype, refine)
        cfg = config or choose_config(key, default, candidates, run, A.device)
        chunk = cap
        if A.device.type == "cuda" and b > cap:
            built = (cfg, kp, refine, A.dtype, A.device)
            if built not in _RESIDENT:
                kernel = topk_launch(cfg, 0, cap, warmup=True)
                _RESIDENT[built] = launch.resident_programs(kernel, A.device)
            slots = _RESIDENT[built] * launch.device_properties(A.device).multi_processor_count
            chunk = images_per_launch(b, cap, programs(cfg), slots)
        for lo in range(0, b, chunk):
            run(cfg, lo, min(b, lo + chunk))
    return w, idx

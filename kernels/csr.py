"""The column-wise CSR of a sparse Ã that the diffusion walks (kernel 3's input).

Per image, the row-major edge list holds ``i → indices[i, r]`` with weight
``weights[i, r]`` at position ``i·(R+1) + r``, and a zero-weight self edge ``i → i`` at
``i·(R+1) + R`` (every node then has an incoming edge). The CSR is that list stably sorted
by destination: three (B, N·(R+1)) arrays in edge order, ``src`` (int32), ``dst`` (int32,
ascending within an image) and ``wgt`` (fp32). Stable, so the CSR, and with it every sum
of the diffusion, is reproducible. Two builds give bitwise the same arrays:

- ``sort`` (the default): one flat int32 torch sort of ``N·image + destination`` for the
  whole batch (on an H200 0.5 to 0.65 times the time of a sort per image;
  bench/kernels_notes.md), between two kernels that make its keys and read the arrays off
  its permutation. Memory while built: 28·B·N·(R+1) bytes and the sort's own storage.
- ``count`` (a candidate; chunks of rows, `chunk_rows`): a counting sort. Each
  chunk's edges are counted per destination (`edge_counts_kernel`: integer atomics,
  exact in any order); the counts become each chunk's first place per destination
  (`chunk_offsets_kernel`: an exclusive sum over the chunks, plus the image's edges to
  smaller destinations); then one program per chunk walks its rows in order and puts
  each edge at its destination's next place (`edge_place_kernel`; a row's edges to one
  node, such as the self edge of a row that keeps itself, in their row order), so every
  place is set by the row order alone: the stable sort's order, without atomics deciding
  it. It moves the edges once, against the sort's four radix passes over keys
  and 8-byte permutation; its table of counts is B·(N / rows)·N·4 bytes.

No host sync in either; B·N·(R+1) < 2**31.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from adcam_fast.kernels.launch import Config, choose_config, n_bucket, next_pow2, on_device

BLOCK = 1024
"""Edges per program of the sort build's two kernels."""


@triton.jit
def edge_keys_kernel(IDX, KEY, N, R, EDGES, BLOCK: tl.constexpr):
    """KEY[p] = N·image + destination of edge p of the row-major edge list (all images):
    row q = p // (R+1) (= N·image + i), place r = p % (R+1); IDX[q, r] for r < R, i for
    the self edge r = R."""
    p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # int32: EDGES < 2**31
    ok = p < EDGES
    row, place = p // (R + 1), p % (R + 1)
    i = row % N
    j = tl.load(IDX + row * R + place, mask=ok & (place < R), other=0)
    tl.store(KEY + p, (row - i + tl.where(place < R, j, i)).to(tl.int32), mask=ok)


@triton.jit
def edge_arrays_kernel(POS, KEY, W, SRC, DST, WGT, N, R, EDGES, BLOCK: tl.constexpr):
    """Edge p of the sorted list, which was edge POS[p] of the row-major one: SRC = its
    row's node, DST = its key's node, WGT = its weight (W[row, r], 0 for the self edge)."""
    p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = p < EDGES
    pos = tl.load(POS + p, mask=ok, other=0).to(tl.int32)
    row, place = pos // (R + 1), pos % (R + 1)
    w = tl.load(W + row * R + place, mask=ok & (place < R), other=0.0).to(tl.float32)
    tl.store(SRC + p, (row % N).to(tl.int32), mask=ok)
    tl.store(DST + p, tl.load(KEY + p, mask=ok, other=0) % N, mask=ok)
    tl.store(WGT + p, w, mask=ok)


@triton.jit
def edge_counts_kernel(IDX, CNT, N, R, ROWS, BLOCK_I: tl.constexpr, BLOCK_R: tl.constexpr):
    """``CNT[b, c, j] +=`` the edges of image b's rows ``[c·ROWS, (c+1)·ROWS)`` that end at
    node j, for BLOCK_I rows (each its R kept columns and its self edge)."""
    b = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    places = tl.arange(0, BLOCK_R)
    ok = (rows < N)[:, None] & (places <= R)[None, :]
    row = (b * N + rows).to(tl.int64)[:, None]
    j = tl.load(IDX + row * R + places[None, :], mask=ok & (places < R)[None, :], other=0)
    j = tl.where(places[None, :] == R, rows[:, None], j)
    chunk = (b * tl.cdiv(N, ROWS) + rows // ROWS).to(tl.int64)[:, None]
    tl.atomic_add(CNT + chunk * N + j, 1, mask=ok)


@triton.jit
def chunk_offsets_kernel(CNT, TOT, N, CHUNKS, BLOCK_C: tl.constexpr, BLOCK_J: tl.constexpr):
    """For BLOCK_J destinations j of image b: ``CNT[b, c, j]`` becomes the edges to j in
    the chunks before c (an exclusive sum over c, in place), ``TOT[b, j]`` their total."""
    b = tl.program_id(1)
    j = tl.program_id(0) * BLOCK_J + tl.arange(0, BLOCK_J)
    c = tl.arange(0, BLOCK_C)
    at = (b * CHUNKS + c).to(tl.int64)[:, None] * N + j[None, :]
    ok = (c < CHUNKS)[:, None] & (j < N)[None, :]
    x = tl.load(CNT + at, mask=ok, other=0)
    tl.store(CNT + at, tl.cumsum(x, axis=0) - x, mask=ok)
    tl.store(TOT + b * N + j, tl.sum(x, axis=0), mask=j < N)


@triton.jit
def edge_place_kernel(IDX, W, NEXT, BASE, SRC, DST, WGT, N, R, ROWS, BLOCK_R: tl.constexpr):
    """Chunk c of image b (rows ``[c·ROWS, (c+1)·ROWS)``), row by row: each edge ``i → j``
    goes to place ``BASE[b, j] + NEXT[b, c, j]`` (the image's edges to smaller nodes, then
    to j from earlier rows), and ``NEXT[b, c, j]`` moves past it. A row's edges to one node
    (its self edge where it keeps itself, or a column given twice) go in their row order,
    and the last of them moves the node's place."""
    c = tl.program_id(0)
    b = tl.program_id(1)
    places = tl.arange(0, BLOCK_R)
    kept = places < R
    edge = places <= R
    nxt = NEXT + (b * tl.cdiv(N, ROWS) + c).to(tl.int64) * N
    out = b.to(tl.int64) * N * (R + 1)
    lo, hi = c * ROWS, tl.minimum(c * ROWS + ROWS, N)
    ahead = (b * N + lo).to(tl.int64) * R + places  # each row's columns, a row ahead
    cols = tl.load(IDX + ahead, mask=kept, other=0)
    w_ahead = tl.load(W + ahead, mask=kept, other=0.0)
    for i in range(lo, hi):
        j = tl.where(places == R, i, cols)
        w = w_ahead.to(tl.float32)
        ahead += R
        cols = tl.load(IDX + ahead, mask=kept & (i + 1 < hi), other=0)
        w_ahead = tl.load(W + ahead, mask=kept & (i + 1 < hi), other=0.0)
        same = (j[:, None] == j[None, :]) & edge[None, :]  # [p, q]: edges p and q meet
        earlier = tl.sum((same & (places[None, :] < places[:, None])).to(tl.int32), axis=1)
        later = tl.sum((same & (places[None, :] > places[:, None])).to(tl.int32), axis=1)
        here = tl.load(nxt + j, mask=edge, other=0) + earlier
        at = out + tl.load(BASE + b * N + j, mask=edge, other=0) + here
        tl.store(SRC + at, tl.zeros_like(places) + i, mask=edge)
        tl.store(DST + at, j.to(tl.int32), mask=edge)
        tl.store(WGT + at, w, mask=edge)
        tl.store(nxt + j, here + 1, mask=edge & (later == 0))
        tl.debug_barrier()  # this row's places before the next row reads them


def _csr_by_sort(weights: Tensor, indices: Tensor, src: Tensor, dst: Tensor, wgt: Tensor) -> None:
    b, n, r = indices.shape
    edges = b * n * (r + 1)
    key = torch.empty(edges, dtype=torch.int32, device=indices.device)
    grid = (triton.cdiv(edges, BLOCK),)
    edge_keys_kernel[grid](indices, key, n, r, edges, BLOCK=BLOCK)
    key, pos = torch.sort(key, stable=True)  # one flat int32 sort
    edge_arrays_kernel[grid](pos, key, weights, src, dst, wgt, n, r, edges, BLOCK=BLOCK)


def _csr_by_count(
    weights: Tensor, indices: Tensor, src: Tensor, dst: Tensor, wgt: Tensor, rows: int
) -> None:
    b, n, r = indices.shape
    chunks = triton.cdiv(n, rows)
    counts = torch.zeros(b, chunks, n, dtype=torch.int32, device=indices.device)
    total = torch.empty(b, n, dtype=torch.int32, device=indices.device)
    block_r = next_pow2(r + 1)
    block_i = max(1, 1024 // block_r)
    edge_counts_kernel[(triton.cdiv(n, block_i), b)](
        indices, counts, n, r, rows, BLOCK_I=block_i, BLOCK_R=block_r
    )
    block_c = next_pow2(chunks)
    block_j = max(1, 4096 // block_c)
    chunk_offsets_kernel[(triton.cdiv(n, block_j), b)](
        counts, total, n, chunks, BLOCK_C=block_c, BLOCK_J=block_j
    )
    base = total.cumsum(-1, dtype=torch.int32) - total  # the image's edges to smaller nodes
    edge_place_kernel[(chunks, b)](
        indices, weights, counts, base, src, dst, wgt, n, r, rows, BLOCK_R=block_r, num_warps=1
    )


def csr_configs() -> tuple[Config, tuple[Config, ...]]:
    """Default and candidate builds: ``block_m`` 0 sorts, else counts, in chunks of at
    least that many rows (see `chunk_rows`). Every build gives the same arrays."""
    default = Config()
    return default, (default, Config(block_m=16))


def chunk_rows(least: int, n: int, r: int) -> int:
    """Rows per chunk of the counting build: at least ``least``, and enough that its table
    of counts, (N / rows)·N·4 bytes an image, stays within the CSR's own 12·N·(R+1)."""
    return max(least, triton.cdiv(n, 3 * (r + 1)))


def csr_edges(
    weights: Tensor, indices: Tensor, config: Config | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Column-wise CSR of a sparse Ã, per image: ``(src, dst, wgt)``, each (B, N·(R+1)), by
    the build of ``config``, or the one autotuned for these sizes (`csr_configs`, see the
    module; every build gives the same arrays).

    weights, indices: (B, N, R), B·N >= 1.
    """
    b, n, r = indices.shape
    if config is None:
        key = ("csr", n_bucket(n), next_pow2(r), next_pow2(b))
        config = choose_config(
            key, *csr_configs(), lambda cfg: csr_edges(weights, indices, cfg), indices.device
        )
    indices, weights = indices.contiguous(), weights.contiguous()
    src = torch.empty(b, n * (r + 1), dtype=torch.int32, device=indices.device)
    dst, wgt = torch.empty_like(src), torch.empty_like(src, dtype=torch.float32)
    least = config.block_m
    with on_device(indices.device):
        if least:
            _csr_by_count(weights, indices, src, dst, wgt, chunk_rows(least, n, r))
        else:
            _csr_by_sort(weights, indices, src, dst, wgt)
    return src, dst, wgt

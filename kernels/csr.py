"""The column-wise CSR of a sparse Ã that the diffusion walks (kernel 3's input).

Per image, the row-major edge list holds ``i → indices[i, r]`` with weight
``weights[i, r]`` at position ``i·(R+1) + r``, and a zero-weight self edge ``i → i`` at
``i·(R+1) + R`` (every node then has an incoming edge). The CSR is that list stably sorted
by destination: three (B, N·(R+1)) arrays in edge order, ``src`` (int32), ``dst`` (int32,
ascending within an image) and ``wgt`` (fp32). Stable, so the CSR, and with it every sum
of the diffusion, is reproducible. Built by one flat int32 torch sort of
``N·image + destination`` for the whole batch (on an H200 0.5 to 0.65 times the time of a
sort per image) between two kernels that make its keys and read the arrays off its
permutation. Memory while built: 28·B·N·(R+1) bytes and the sort's own storage. No host
sync; B·N·(R+1) <= ``MAX_EDGES`` (`diffusion.diffuse_sparse` takes more in chunks of
images). (A counting sort, which moves the edges once, took 1.0 to 1.75
times this build's time on an H200 at every size measured; bench/kernels_notes.md.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from adcam_fast.kernels.launch import on_device

BLOCK = 1024
"""Edges per program of the two kernels around the sort."""

MAX_EDGES = 2**31 - 1
"""The most edges of one build: its keys and positions are int32."""


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


def csr_edges(weights: Tensor, indices: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Column-wise CSR of a sparse Ã, per image: ``(src, dst, wgt)``, each (B, N·(R+1)) (see
    the module).

    weights, indices: (B, N, R), B·N >= 1, B·N·(R+1) <= ``MAX_EDGES``.
    """
    b, n, r = indices.shape
    indices, weights = indices.contiguous(), weights.contiguous()
    edges = b * n * (r + 1)
    src = torch.empty(b, n * (r + 1), dtype=torch.int32, device=indices.device)
    dst, wgt = torch.empty_like(src), torch.empty_like(src, dtype=torch.float32)
    key = torch.empty(edges, dtype=torch.int32, device=indices.device)
    grid = (triton.cdiv(edges, BLOCK),)
    with on_device(indices.device):
        edge_keys_kernel[grid](indices, key, n, r, edges, BLOCK=BLOCK)
        key, pos = torch.sort(key, stable=True)  # one flat int32 sort
        edge_arrays_kernel[grid](pos, key, weights, src, dst, wgt, n, r, edges, BLOCK=BLOCK)
    return src, dst, wgt

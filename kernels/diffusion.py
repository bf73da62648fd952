"""Kernel 3: class-activation diffusion with the sparse refined attention (Eq. 8).

With the maps of one image as rows of a K×N matrix M, each step is ``M ← M · Ã``::

    M'(c, j) = Σ_{(i, r) : idx[i, r] = j} w[i, r] · M(c, i)

Formulation (gather, deterministic). Ã's edges ``i → idx[i, r]``, plus one zero-weight
self edge ``j → j`` per node so that every node has an incoming edge, are sorted by
destination with a stable torch sort per image (`transpose_edges`: the column-wise CSR of
Ã, as int32 positions into the row-major list). In that order the in-edges of node j are
one contiguous run, and a step is a *segmented sum* over the edge list: a program walks the
edges of its image in chunks of ``BLOCK_E``, gathers ``w · M(:, i)`` for ``BLOCK_C``
classes, sums each run inside the chunk (a segmented Hillis-Steele scan on ``tl.gather``),
adds the partial sum of the run left open by the previous chunk, and stores each node's
total from the run's last edge. Every node is written by exactly one lane and every sum
has a fixed order (it depends on BLOCK_E only): no atomics, bitwise reproducible. The work
per step is O(N·(k+1)·K) whatever the in-degrees (a node kept by every row costs no more).

Launch: one program per (image, block of ``BLOCK_C`` classes), all steps in the one
launch. M lives in an fp32 scratch of three node-major slots (the input, then two
ping-pong buffers; a node's classes are contiguous, so one gather reads them together),
which stays in L2 at the sizes of interest; steps are separated by a CTA barrier, all the
ordering needed, since each program owns its classes. The last step writes the (B, K, N)
output. Nothing is bounded by on-chip memory: more classes than BLOCK_C split over more
programs (classes are independent), a larger N only lengthens the edge walk. Extra memory:
3·B·N·K·4 bytes of scratch plus the CSR, 8·B·N·(k+1) bytes (more while torch sorts).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from adcam_fast.kernels.launch import Config, choose_config, n_bucket, next_pow2, on_device


@triton.jit
def _run_sums(v, dst, LOG_E: tl.constexpr):
    """Segmented inclusive sums along the columns of v (C, 2**LOG_E): entry r becomes the
    sum of v over the entries r' <= r of its run (equal ``dst``; dst is sorted, so a run is
    contiguous). Hillis-Steele: after the step of distance d, entry r holds its run's sum
    over (r - 2d, r]; a fixed order of additions, so the result is reproducible."""
    lane = tl.arange(0, 1 << LOG_E)
    for s in tl.static_range(LOG_E):
        back = tl.maximum(lane - (1 << s), 0)
        same = (lane >= (1 << s)) & (tl.gather(dst, back, 0) == dst)
        shifted = tl.gather(v, tl.broadcast_to(back[None, :], v.shape), 1)
        v += tl.where(same[None, :], shifted, 0.0)
    return v


@triton.jit
def diffusion_kernel(
    SCR,  # (3, B, N, K) fp32 scratch; slot 0 holds the input maps (node-major)
    OUT,  # (B, K, N) fp32 out
    POS,  # (B, E) int32: edge i·(R+1) + r of the row-major list, in CSR order
    DST,  # (B, E) int32: edge destination j, ascending within an image
    WGT,  # (B, N, R) fp32: weights of Ã's rows (place r = R is the zero-weight self edge)
    N,
    K,
    R,
    slot,  # B * N * K
    steps,
    BLOCK_C: tl.constexpr,
    LOG_E: tl.constexpr,  # BLOCK_E = 2**LOG_E edges per chunk
):
    BLOCK_E: tl.constexpr = 1 << LOG_E
    pid_b = tl.program_id(0)
    cls = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cls < K
    nodes = pid_b.to(tl.int64) * N * K  # this image in a scratch slot / in OUT
    E = N * (R + 1)
    edges = pid_b.to(tl.int64) * E
    rows = pid_b.to(tl.int64) * N * R
    lane = tl.arange(0, BLOCK_E)
    slot = tl.cast(slot, tl.int64)
    for t in range(steps):
        read = slot * tl.where(t == 0, 0, 1 + (t + 1) % 2) + nodes
        write = slot * (1 + t % 2) + nodes
        last = t == steps - 1
        carry = tl.zeros((BLOCK_C,), tl.float32)  # open run's partial sum
        carry_dst = tl.full((), -1, tl.int32)  # its node
        for e0 in range(0, E, BLOCK_E):
            e = e0 + lane
            e_ok = e < E
            pos = tl.load(POS + edges + e, mask=e_ok, other=0)
            src = pos // (R + 1)
            place = pos - src * (R + 1)
            dst = tl.load(DST + edges + e, mask=e_ok, other=-1)
            nxt = tl.load(DST + edges + e + 1, mask=(e + 1) < E, other=-1)
            w = tl.load(WGT + rows + src * R + place, mask=e_ok & (place < R), other=0.0)
            m = tl.load(
                SCR + read + src[None, :] * K + cls[:, None],
                mask=c_ok[:, None] & e_ok[None, :],
                other=0.0,
            )
            v = _run_sums(m * w[None, :], dst, LOG_E)
            v += tl.where((dst == carry_dst)[None, :], carry[:, None], 0.0)
            end = c_ok[:, None] & (e_ok & (dst != nxt))[None, :]
            if last:
                tl.store(OUT + nodes + cls[:, None] * N + dst[None, :], v, mask=end)
            else:
                tl.store(SCR + write + dst[None, :] * K + cls[:, None], v, mask=end)
            at_end = (lane == BLOCK_E - 1)[None, :]
            carry = tl.sum(tl.where(at_end, v, 0.0), axis=1)
            carry_dst = tl.sum(tl.where(lane == BLOCK_E - 1, dst, 0))
        tl.debug_barrier()  # step t's writes before step t+1's reads and overwrites


def transpose_edges(indices: Tensor) -> tuple[Tensor, Tensor]:
    """Column-wise CSR of a sparse Ã's pattern, per image: ``(pos, dst)``, each (B, N·(R+1)).

    indices: (B, N, R). The row-major edge list holds ``i → indices[i, r]`` at position
    ``i·(R+1) + r`` and a self edge ``i → i`` at ``i·(R+1) + R``; ``dst`` is that list's
    destinations sorted ascending, ``pos`` their positions. The sort is stable (ties keep
    row-major order), so the CSR, and with it every sum of the kernel, is reproducible.
    int32 throughout (N·(R+1) < 2**31); no host sync.
    """
    b, n, _ = indices.shape
    nodes = torch.arange(n, device=indices.device, dtype=torch.int32).expand(b, n)
    dst = torch.cat([indices.to(torch.int32), nodes[..., None]], -1).reshape(b, -1)
    dst, pos = torch.sort(dst, dim=-1, stable=True)
    return pos.to(torch.int32), dst


def diffusion_configs(n_cls: int, device: torch.device) -> tuple[Config, list[Config]]:
    """Default and candidate (BLOCK_C = ``block_m``, BLOCK_E = ``block_n``) pairs.

    GPU: eight classes (one 32-byte sector per gathered node) by default; wider class blocks
    mean fewer programs per image, which pays only for large batches. BLOCK_E = 256 in
    every candidate: the order of the sums depends on BLOCK_E only, so the autotuned choice
    never changes the result. Interpreter: all classes and long chunks (its cost is per
    operation).
    """
    widest = min(32, next_pow2(n_cls))
    if device.type != "cuda":
        return Config(block_m=widest, block_n=2048), []
    default = Config(block_m=min(8, widest), block_n=256, num_warps=4)
    others = {Config(block_m=min(16, widest), block_n=256, num_warps=4),
              Config(block_m=widest, block_n=256, num_warps=8),
              Config(block_m=min(8, widest), block_n=256, num_warps=8)}  # fmt: skip
    return default, [default, *sorted(others - {default}, key=str)]


def diffuse_sparse(weights: Tensor, indices: Tensor, cams: Tensor, steps: int) -> Tensor:
    """Launch kernel 3 on a batch: T = ``steps`` applications of ``M ← M · Ã``.

    weights (B, N, k) float, indices (B, N, k) int in [0, N), cams (B, K, N) any float, all
    on one device. Returns (B, K, N) fp32. steps = 0 returns a fp32 copy of cams. One
    torch sort plus one kernel launch for the whole batch and all steps; no host sync once
    the config is cached.
    """
    b, n_cls, n = cams.shape
    out = torch.empty(b, n_cls, n, dtype=torch.float32, device=cams.device)
    if steps == 0 or out.numel() == 0:
        return out.copy_(cams)
    pos, dst = transpose_edges(indices)
    weights = weights.to(torch.float32).contiguous()
    scratch = torch.empty(3, b, n, n_cls, dtype=torch.float32, device=cams.device)
    scratch[0].copy_(cams.transpose(-1, -2))

    def run(cfg: Config) -> None:
        grid = (b, triton.cdiv(n_cls, cfg.block_m))
        diffusion_kernel[grid](
            scratch, out, pos, dst, weights, n, n_cls, indices.shape[-1], b * n * n_cls, steps,
            BLOCK_C=cfg.block_m, LOG_E=cfg.block_n.bit_length() - 1, num_warps=cfg.num_warps,
        )  # fmt: skip

    default, candidates = diffusion_configs(n_cls, cams.device)
    key = ("diffuse", n_bucket(n), next_pow2(indices.shape[-1]), next_pow2(b), next_pow2(n_cls))
    with on_device(cams.device):
        run(choose_config(key, default, candidates, run, cams.device))
    return out

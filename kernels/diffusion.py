"""Kernel 3: class-activation diffusion with the sparse refined attention (Eq. 8).

With the maps of one image as rows of a K×N matrix M, each step is ``M ← M · Ã``::

    M'(c, j) = Σ_{(i, r) : idx[i, r] = j} w[i, r] · M(c, i)

Formulation (gather, deterministic). Ã's edges ``i → idx[i, r]``, plus one zero-weight
self edge ``j → j`` per node so that every node has an incoming edge, are stably sorted
by destination (`csr.csr_edges`: the column-wise CSR of Ã as three (B, N·(k+1)) arrays in
edge order, int32 source, int32 destination, fp32 weight). In that
order the in-edges of node j are one contiguous run, and a step is a *segmented sum* over
the edge list. A program walks the edges of its image in chunks of ``BLOCK_E = T·G``: T
groups of G consecutive edges. Its loads of source, destination and weight are contiguous
and independent of each other; only the gather of ``M(:, i)`` for ``BLOCK_C`` classes
waits on the source. Within a group, the runs are summed edge by edge (G steps, in
registers); across the T groups, the sums of the runs open at each group's end are combined
by a segmented Hillis-Steele scan (log2(T) rounds of ``tl.gather`` along the groups;
whether a run spans groups is read from the sorted destinations, loaded with the walk's
loads), to which the partial sum of the run left open by the previous chunk is added, so
that the G gathers of a chunk are issued together. Each node's total is stored from its
run's last edge. Every node is written by exactly one lane, and every sum has an order
fixed by lane indices alone, set by BLOCK_E and G (not by BLOCK_C, the warps or the register
layout Triton picks): no atomics, bitwise reproducible. (A build may still fuse a multiply
and an add where another does not: the GPU tests check the candidates bitwise against each
other; see the thread mapping below.) ``tl.associative_scan`` would not do: its
combination order follows the layout, which changes with BLOCK_C and the warps, and the
interpreter runs a custom combine once per element. The work per step is
O(N·(k+1)·K) whatever the in-degrees (a node kept by every row costs no more).

Thread mapping (GPU): one warp per program, a group per lane, its ``BLOCK_C = 4`` classes
in the lane's registers. The maps' class stride is padded to a multiple of BLOCK_C that the
compiler can see (``KB·BLOCK_C``), so a node's classes are one aligned 16-byte vector: a
gather is one load per edge and lane, and the scan's rounds are lane shuffles. A group's
sources, destinations and weights are loaded once for its four classes, four edges to a
16-byte load (`_quads`). sm_90a, Triton 3.6: 921 SASS instructions per chunk and program,
against 4 × 669 for the same program on 4 warps with a class and group per thread (the
earlier mapping, which loads each group's edges four times and, here, scans through shared
memory with CTA barriers; its maps also came out one rounding apart from the one-warp
build's on an H200, so it is not a candidate). On an H200 (bench/kernels_notes.md) the
diffusion took 0.73 times the earlier kernel's time at N = 576, 0.70 at 1296 and 0.61 at
2304 (B = 128, with the CSR), with bitwise the same maps. With ``PREFETCH`` (a
candidate), each chunk's sources are loaded during the chunk before, so that its gathers
need not wait for them: one memory latency on a chunk's critical path instead of two, for
16 more live registers per lane.

Launch: one program per (image, block of ``BLOCK_C`` classes) by default, all steps in one
launch. That leaves the GPU's latency unhidden (B = 128 at 20 classes is 640 one-warp
programs, five to each of an H200's 132 SMs, each a chain of 116 dependent chunks at
N = 576), so an autotune candidate (`split`) cuts each image's edge list into parts of whole
chunks, a program each, enough for 16 warps per SM. A part stores the runs that end in its
span, and begins its walk at the chunk where the run open at its first edge began
(`walk_starts`), so every sum is formed from the same chunks in the same order as in one
walk: bitwise the same maps for any number of parts. M lives in two node-major fp32 slots
that the steps ping-pong between (the input first, its padding classes zero), which stay in
L2 at the sizes of interest. With one part, all steps run in one launch, separated by a CTA
barrier, all the ordering needed, since each program owns its classes; with more, a step
reads what other programs wrote, and programs cannot wait on each other, so each step is a
launch (the one launch of DESIGN.md §4 is the default, given up only where the autotuner
measures the split faster). The last step writes the (B, K, N) output itself. Nothing is
bounded by on-chip memory: more classes than BLOCK_C split over more programs (classes are
independent), a larger N only lengthens the edge walk.
Extra memory: min(T, 2)·B·N·K'·4 bytes of maps (K' = K rounded up to BLOCK_C), and the CSR,
12·B·N·(k+1) bytes (while it is built, at most 28·B·N·(k+1) and the sort's own temporary
storage; see `csr`).
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from adcam_fast.kernels import csr
from adcam_fast.kernels.launch import (
    Config,
    choose_config,
    device_properties,
    n_bucket,
    next_pow2,
    on_device,
)


@triton.jit
def _groups_back(x, d: tl.constexpr):
    """x (T, C) with row r replaced by row max(r - d, 0) (``tl.gather`` along the groups)."""
    row = tl.maximum(tl.arange(0, x.shape[0]) - d, 0)
    return tl.gather(x, tl.broadcast_to(row[:, None], x.shape), 0)


@triton.jit
def _quads(P, first, E, other, G: tl.constexpr):
    """``P[first + g]`` for g < G, masked to ``< E``, as G/4 (T, 4) tensors: a lane's
    consecutive edges four to a 16-byte load (where E, and ``first`` as the compiler sees
    it, are multiples of 4)."""
    quads = ()
    for q in tl.static_range(G // 4):
        offs = (first + 4 * q)[:, None] + tl.arange(0, 4)[None, :]
        quads += (tl.load(P + offs, mask=offs < E, other=other),)
    return quads


@triton.jit
def _split4(x):
    """The four columns of x (T, 4), each (T,), split in registers."""
    even, odd = tl.split(tl.reshape(x, (x.shape[0], 2, 2)))  # columns 0, 2 and 1, 3
    x0, x2 = tl.split(even)
    x1, x3 = tl.split(odd)
    return x0, x1, x2, x3


@triton.jit(do_not_specialize=["K", "KB", "last"])  # no new class count or T compiles anew
def diffusion_kernel(
    SCR,  # (min(T, 2), B, N, KB·BLOCK_C) fp32 maps, node-major: slot 0 the input (classes >= K
    #       zero); step t < last writes slot (t+1)%2
    OUT,  # (B, K, N) fp32: what step ``last`` writes
    SRC,  # (B, E) int32: edge source i, in CSR order
    DST,  # (B, E) int32: edge destination j, ascending within an image
    WGT,  # (B, E) fp32: edge weight (0 for the self edges)
    WALK,  # (B, parts) int32: the chunk-aligned edge where each part's walk begins (None: 0)
    N,
    K,
    KB,  # class blocks: the maps' class stride is KB·BLOCK_C
    E,
    span,  # edges per part, a multiple of BLOCK_E: part p stores the runs ending in its span
    step0,  # the first step of this launch (its maps are in slot step0 % 2)
    steps,
    last,  # T - 1
    BLOCK_C: tl.constexpr,
    LOG_T: tl.constexpr,  # 2**LOG_T groups per chunk
    G: tl.constexpr,  # consecutive edges per group
    PREFETCH: tl.constexpr,  # load each chunk's sources one chunk ahead
):
    T: tl.constexpr = 1 << LOG_T
    tl.static_assert(G % 4 == 0, "a group's edges are loaded four at a time")
    pid_b = tl.program_id(0)
    part = tl.program_id(2)
    cls = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    # The maps' class stride, a multiple of BLOCK_C as the compiler can see: a node's BLOCK_C
    # classes are one aligned vector, one load per edge and thread.
    ks = KB * BLOCK_C
    nodes = pid_b.to(tl.int64) * N * ks  # this image in a slot of the maps
    slot = tl.num_programs(0).to(tl.int64) * N * ks
    SRC += pid_b.to(tl.int64) * E
    DST += pid_b.to(tl.int64) * E
    WGT += pid_b.to(tl.int64) * E
    lo = part * span  # the edges whose runs this program stores: [lo, hi)
    hi = tl.minimum(lo + span, E)
    if WALK is None:  # one part per image, walked from its first edge
        walk = 0
    else:
        walk = tl.load(WALK + pid_b * tl.num_programs(2) + part)
    group = tl.arange(0, T)
    for t in range(step0, step0 + steps):
        read = SCR + slot * (t % 2) + nodes
        final = t == last  # into the output, class-major; else the next slot, node-major
        write = tl.where(
            final, OUT + pid_b.to(tl.int64) * K * N, SCR + slot * ((t + 1) % 2) + nodes
        )
        node_stride = tl.where(final, 1, ks)
        class_stride = tl.where(final, N, 1)
        c_ok = cls < tl.where(final, K, ks)  # the slots keep the padding classes, the output not
        carry = tl.zeros((BLOCK_C,), tl.float32)  # the previous chunk's open run, summed
        ahead = ()  # with PREFETCH, the sources of the chunk the walk comes to next
        if PREFETCH:  # (unhinted: hinted, the capped split spills)
            ahead = _quads(SRC, walk + group * G, E, 0, G)
        for e0 in range(walk, hi, T * G):
            # Each group's first edge: a multiple of G, since walks begin at a chunk.
            first = tl.multiple_of(e0 + group * G, G)
            before = tl.load(DST + first - 1, mask=(first > 0) & (first <= E), other=-1)
            # The scan's keys, here so that they are in flight with the walk's loads: the
            # destination of the last edge of group r - 2**s, for each round s.
            keys = ()
            for s in tl.static_range(LOG_T):
                back = first - (1 << s) * G + G - 1
                keys += (tl.load(DST + back, mask=(group >= 1 << s) & (back < E), other=-1),)
            after = tl.load(DST + first + G, mask=first + G < E, other=-1)
            # Within each group, sequentially: sums[g] is the sum of edge g's run over the
            # group's edges up to g, fresh[g] whether a run starts at one of edges 1..g.
            sums = ()
            fresh = ()
            opened = group < 0
            if PREFETCH:  # this chunk's sources came with the last; the next chunk's now
                src_quads = ahead
                ahead = _quads(SRC, first + T * G, E, 0, G)
            else:
                src_quads = _quads(SRC, first, E, 0, G)
            dst_quads = _quads(DST, first, E, -1, G)
            wgt_quads = _quads(WGT, first, E, 0.0, G)
            srcs = ()  # the group's G sources, destinations and weights, each (T,)
            edge_dsts = ()
            wgts = ()
            for q in tl.static_range(G // 4):
                srcs += _split4(src_quads[q])
                edge_dsts += _split4(dst_quads[q])
                wgts += _split4(wgt_quads[q])
            for g in tl.static_range(G):
                e_ok = first + g < E
                m = tl.load(
                    read + srcs[g][:, None] * ks + cls[None, :], mask=e_ok[:, None], other=0.0
                )
                x = m * wgts[g][:, None]
                if g == 0:
                    acc = x
                else:
                    start = edge_dsts[g] != edge_dsts[g - 1]
                    acc = tl.where(start[:, None], x, acc + x)
                    opened = opened | start
                sums += (acc,)
                fresh += (opened,)
            dsts = edge_dsts + (after,)  # noqa: RUF005 (no starred tuples in Triton 3.6)
            # Across the groups: tot becomes the sum of the run open at each group's end, over
            # the whole chunk and the carry (segmented Hillis-Steele over the T groups; a run
            # spans groups r-d..r iff group r-d ends on the same node as group r).
            tail = dsts[G - 1]
            tot = tl.where(((group == 0) & (tail == before))[:, None], carry[None, :] + acc, acc)
            for s in tl.static_range(LOG_T):
                same = (group >= 1 << s) & (keys[s] == tail)
                tot = tl.where(same[:, None], _groups_back(tot, 1 << s) + tot, tot)
            # The run open at each group's first edge, summed before the group.
            prior = tl.where((group == 0)[:, None], carry[None, :], _groups_back(tot, 1))
            joins = before == dsts[0]
            for g in tl.static_range(G):
                v = tl.where((joins & ~fresh[g])[:, None], prior + sums[g], sums[g])
                ends = (first + g >= lo) & (first + g < E) & (dsts[g] != dsts[g + 1])
                at = write + dsts[g][:, None] * node_stride + cls[None, :] * class_stride
                tl.store(at, v, mask=ends[:, None] & c_ok[None, :])
            carry = tl.sum(tl.where((group == T - 1)[:, None], tot, 0.0), axis=0)
        tl.debug_barrier()  # step t's writes before step t+1's reads and overwrites


CLASS_BLOCK = 4
"""Classes per program of the GPU default. The config cache keys a class count by its
number of such blocks (as a power of two): counts that give the same programs (1 to 4, say,
where a batch's images have few labels) share one autotuning."""

FILL = 16
"""Warps per SM that a split launch aims at: the one-warp build's 127 registers (sm_90a)
leave room for 16."""


def walk_starts(dst: Tensor, span: int, chunk: int) -> Tensor:
    """(B, parts) int32: where the walk of each part of ``span`` edges begins, the chunk (of
    ``chunk`` edges from the image's first) holding the first edge of the run open at the
    part's first edge. That run's earlier edges are walked again, from the same chunk
    boundaries as in one walk over the image, so its sum is the same, bit for bit."""
    first = dst[:, ::span].contiguous()  # each part's first destination
    return (torch.searchsorted(dst, first) // chunk * chunk).to(torch.int32)


def split(cfg: Config, b: int, n_cls: int, edges: int, sms: int) -> tuple[int, int]:
    """``(parts, span)``: each image's edge list cut into ``parts`` spans of ``span`` edges,
    whole chunks, one program per (image, class block, part). ``cfg.parts``, or for 0 so
    many that the programs' warps number ``FILL`` on each of ``sms`` SMs (0 off the GPU:
    one part): one program per (image, class block) leaves most of the GPU idle at small
    batches, each program's walk a chain of dependent chunks."""
    chunks = triton.cdiv(edges, cfg.block_n)
    parts = cfg.parts
    if not parts:
        parts = FILL // cfg.num_warps * sms // (b * triton.cdiv(n_cls, cfg.block_m))
    span = triton.cdiv(chunks, min(max(parts, 1), chunks)) * cfg.block_n
    return triton.cdiv(edges, span), span


@functools.cache
def diffusion_configs(n_cls: int, device: torch.device) -> tuple[Config, tuple[Config, ...]]:
    """Default and candidate configs: BLOCK_C = ``block_m`` classes, chunks of BLOCK_E =
    ``block_n`` edges in groups of G = ``block_k`` (BLOCK_E / G a power of two).

    GPU: a class block of 4 on one warp (a lane per group, its classes in registers), each
    image's walk split over enough programs to fill the GPU (``parts`` 0, see `split`: a
    launch per step where it splits) by default; as candidates, one program per image and
    class block with all steps in one launch (``parts`` 1: bitwise the same maps), and
    both with each chunk's sources loaded one chunk ahead (``prefetch``; the split then
    capped at 128 registers, so that 16 warps still fit an SM). On H200s the split was the
    faster at every N and B measured (0.58 to 0.80 times one walk's time at B = 128, 0.15
    at N = 2304, B = 1), and prefetching, meant to take one of a chunk's two memory
    latencies off the walk, took 0.96 to 1.02 times the time (bench/kernels_notes.md, "Kernel
    3: the diffusion"). The blocks are these whatever the class count (fewer classes run as
    zero padding), so a class count not seen before compiles nothing new. BLOCK_E = 512 and
    G = 16 in every candidate: the order of the sums depends on BLOCK_E and G only, so the
    autotuned choice never changes the result. None spills in the sm_90a builds
    (bench/compile_check.py: 125 to 167 registers).
    Interpreter: all classes and long chunks (its cost is per operation).
    """
    if device.type != "cuda":
        return Config(block_m=min(32, next_pow2(n_cls)), block_n=2048, block_k=4, parts=1), ()
    default = Config(block_m=CLASS_BLOCK, block_n=512, block_k=16, num_warps=1, parts=0)
    walk = dataclasses.replace(default, parts=1)
    return default, (
        default,
        walk,
        dataclasses.replace(walk, prefetch=True),
        dataclasses.replace(default, prefetch=True, maxnreg=128),
    )


def diffusion_constants(cfg: Config) -> dict[str, int]:
    """The constexpr arguments of `diffusion_kernel` under ``cfg`` (see `diffusion_configs`):
    what `diffuse_sparse` launches and bench/compile_check.py builds."""
    return dict(
        BLOCK_C=cfg.block_m,
        LOG_T=(cfg.block_n // cfg.block_k).bit_length() - 1,
        G=cfg.block_k,
        PREFETCH=cfg.prefetch,
    )


def diffuse_sparse(
    weights: Tensor, indices: Tensor, cams: Tensor, steps: int, config: Config | None = None
) -> Tensor:
    """Launch kernel 3 on a batch: T = ``steps`` applications of ``M ← M · Ã``.

    weights (B, N, k) float, indices (B, N, k) int in [0, N), cams (B, K, N) any float, all
    on one device. Returns (B, K, N) fp32. steps = 0 returns a fp32 copy of cams. The CSR
    (`csr.csr_edges`), a search when images are split, one kernel launch for the whole
    batch (one per step when images are split over programs, see `split`), and a copy into
    the node-major maps (and a fill of their padding classes where K is not a multiple of
    the class block); all of it per chunk of images past the CSR's int32 bound
    (`csr.MAX_EDGES`). No host sync once the config is cached; ``config`` fixes one instead
    (see `diffusion_configs`).
    """
    b, n_cls, n = cams.shape
    out = torch.empty(b, n_cls, n, dtype=torch.float32, device=cams.device)
    if steps == 0 or out.numel() == 0:
        return out.copy_(cams)
    most = max(1, csr.MAX_EDGES // (n * (indices.shape[-1] + 1)))  # images one CSR holds
    if b > most:
        for lo in range(0, b, most):
            hi = min(b, lo + most)
            out[lo:hi] = diffuse_sparse(weights[lo:hi], indices[lo:hi], cams[lo:hi], steps, config)
        return out
    src, dst, wgt = csr.csr_edges(weights, indices)
    gpu = cams.device.type == "cuda"
    sms = device_properties(cams.device).multi_processor_count if gpu else 0

    def run(cfg: Config) -> None:  # from the input each time: steps overwrite its slot
        kb = triton.cdiv(n_cls, cfg.block_m)
        maps = out.new_empty(min(steps, 2), b, n, kb * cfg.block_m)  # fp32, like out
        maps[0, ..., :n_cls].copy_(cams.transpose(-1, -2))
        if kb * cfg.block_m > n_cls:
            maps[0, ..., n_cls:].zero_()
        parts, span = split(cfg, b, n_cls, src.shape[-1], sms)
        walk = None if parts == 1 else walk_starts(dst, span, cfg.block_n)
        # Programs cannot wait on each other: with parts, a launch per step.
        for step0, n_steps in [(0, steps)] if parts == 1 else [(t, 1) for t in range(steps)]:
            diffusion_kernel[(b, kb, parts)](
                maps, out, src, dst, wgt, walk, n, n_cls, kb, src.shape[-1], span, step0,
                n_steps, steps - 1, **diffusion_constants(cfg), **cfg.launch_options(),
            )  # fmt: skip

    default, candidates = diffusion_configs(n_cls, cams.device)
    blocks = next_pow2(triton.cdiv(n_cls, CLASS_BLOCK))
    key = ("diffuse", n_bucket(n), next_pow2(indices.shape[-1]), next_pow2(b), blocks)
    with on_device(cams.device):
        run(config or choose_config(key, default, candidates, run, cams.device))
    return out

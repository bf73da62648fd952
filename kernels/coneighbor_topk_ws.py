"""Kernels 1+2 with warp specialization (Gluon, sm_90a): the tile loop of
`coneighbor_topk.coneighbor_topk_kernel` split into partitions that run side by side.

A program owns ``BLOCK_M`` rows of one image, as there, and its warps form three partitions
joined by mbarriers in shared memory:

- copy (1 warp): R's row and column slices of each (tile, K step) into a ring of
  ``STAGES`` shared-memory buffers, by the copy engine (TMA descriptors of R viewed as
  (B·N, N): the same slices as the ``tma`` configs);
- MMA (one warpgroup): each tile's ``S' = R·Rᵀ`` by asynchronous wgmma, K step after K step
  (one k16 MMA at a time, in column order, as `coneighbor_topk_kernel` does), then the
  finished tile into one of ``S_BUFS`` fp32 tile buffers;
- merge (the kernel's ``num_warps``): each tile's keys and its merge into the running top-k,
  and the epilogue, with the functions of `coneighbor_topk` and `bitonic` (the same keys,
  network and epilogue, so for the same S the same output).

The merge of one tile thus runs while the MMA warpgroup computes the next: the overlap that
one program per SM at 128×256 cannot get from Triton's software pipeline (its merges stop
the tensor cores; bench/kernels_notes.md, "Where the goals stand").

The merge warps read each tile from its shared-memory buffer in a layout of their own
choosing. By default it is the MMA warpgroup's (wgmma's accumulator: a row on the four lanes
of a quad, two rows a thread), where two bits of a column index select lanes: after the
network's relabelling (`bitonic.topk_desc`), bits 4 and 5, which a merge
exchanges across lanes eight times. With ``LANE_PAIRS`` (`Config.lane_pairs`) a
row lies on two lanes, 16 rows a warp and 64 columns a thread, read four adjacent columns at
a time (16 bytes; a quarter-warp's eight lanes on eight rows, whose 128-byte swizzle puts
them in different banks). Its one lane bit is column bit 2, which the relabelling moves to
bit 5, so that a merge exchanges lanes three times: in the mirror step that sorts runs of
64, in the bitonic merge of the tile's top 64 and in the merge into the running list.
`coneighbor_topk.WS_CANDIDATE` takes it: on an H200 at N = 2304 the stage took 0.94 to 0.96
times the time of the quad layout (bench/kernels_notes.md, v31).

With ``MMA_SCALES`` (`Config.mma_scales`) the MMA warpgroup multiplies each finished tile by
the keys' powers of two (`coneighbor_topk._scale`: the column exponents' loads and one
multiply an entry) before it stores it, and the merge warps make the keys of the scaled tile
(`coneighbor_topk._scaled_keys`): the same keys, bitwise. With lane pairs the merge warps
waited on those loads in 6 % of their samples on an H200 (bench/kernels_notes.md, v36).

Column tiles are taken in the order of `coneighbor_topk._column_tile` (the diagonal first,
or ``LOCKSTEP``), over one of ``PARTS`` runs of them (the lists then meet in
`coneighbor_topk.merge_parts_kernel`), and every tile with a key above a row's k-th is
merged whole (`bitonic.merge_tile`). Registers are moved between the partitions by
``setmaxnreg`` (`register_split`: at 128×128 and 8 merge warps, 168 a thread for the MMA
warpgroup, 24 for the copy warp, 160 for the merge warps).

On an H200 at N = 2304, B = 128 (Triton 3.6; bench/kernels_notes.md, v28 and v29) the
candidate, in two parts with four operand stages and one tile buffer, took the similarity
stage 0.84 times the time of the fastest Triton build on random attention (8.89 against
10.61 ms) and 0.89 times on spatially structured attention (8.38 against 9.44), and its
floor (one merge per program) was below 128×256's (7.29 against 7.98 ms). At N = 576 the
Gluon builds were 1.1 to 1.4 times slower. Gluon kernels compile only for a GPU (Hopper here):
nothing in this module runs under Triton's interpreter.
"""

from __future__ import annotations

import functools
import inspect

from torch import Tensor
from triton.compiler import CompiledKernel
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language._semantic import GluonSemantic
from triton.experimental.gluon.language.nvidia.hopper import (
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from adcam_fast.kernels.bitonic import kth_key, merge_tile, topk_desc
from adcam_fast.kernels.coneighbor_topk import (
    _column_tile,
    _epilogue,
    _keys,
    _scale,
    _scaled_keys,
)
from adcam_fast.kernels.launch import Config


def _layout_optional(name: str) -> None:
    """Makes the layout, the last argument of ``GluonSemantic.<name>``, optional (AutoLayout
    when left out, as `gl.arange` and `gl.full` have it) where it is not: `tl.arange` and
    `tl.full`, in the @triton.jit functions that both kernels call, pass none (Triton 3.6
    to 3.9). A Triton whose method has the default is left as it is."""
    method = getattr(GluonSemantic, name)
    params = list(inspect.signature(method).parameters.values())
    if params[-1].name != "layout" or params[-1].default is not inspect.Parameter.empty:
        return
    given = len(params) - 2  # neither self nor the layout

    @functools.wraps(method)
    def call(self, *args):
        return method(self, *args, *[None] * (given + 1 - len(args)))

    setattr(GluonSemantic, name, call)


_layout_optional("arange")
_layout_optional("full")

_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
"""The copy engine's load into shared memory: ``async_load`` from Triton 3.8 on, which 3.9
requires, ``async_copy_global_to_shared`` before."""


@gluon.jit
def _tile_columns(t, lo, first, n_tiles, BLOCK_N: gl.constexpr, LOCKSTEP: gl.constexpr,
                  layout: gl.constexpr):  # fmt: skip
    """The columns of the program's t-th tile (`coneighbor_topk._column_tile`), in the
    columns' slice of ``layout``."""
    col0 = (lo + _column_tile(t, first, n_tiles, LOCKSTEP)) * BLOCK_N
    return col0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, layout))


@gluon.jit
def _copy_partition(RM, RN, r_bufs, c_bufs, ready, free, pid_b, row0, lo, first, n_tiles, N,
                    BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
                    LOCKSTEP: gl.constexpr):  # fmt: skip
    """Issues the copies of every (tile, K step) into the ring, a stage once it is free."""
    STAGES: gl.constexpr = r_bufs.type.shape[0]
    k_steps = gl.cdiv(N, BLOCK_K)
    for t in range(n_tiles):
        col0 = (lo + _column_tile(t, first, n_tiles, LOCKSTEP)) * BLOCK_N
        for kk in range(k_steps):
            i = t * k_steps + kk
            stage = i % STAGES
            mbarrier.wait(free.index(stage), ((i // STAGES) & 1) ^ 1)
            bar = ready.index(stage)
            mbarrier.expect(bar, RM.block_type.nbytes + RN.block_type.nbytes)
            _tma_load(RM, [pid_b * N + row0, kk * BLOCK_K], bar, r_bufs.index(stage))
            _tma_load(RN, [pid_b * N + col0, kk * BLOCK_K], bar, c_bufs.index(stage))


@gluon.jit
def _mma_partition(r_bufs, c_bufs, ready, free, s_bufs, s_ready, s_free, EXP, pid_b, row0, lo,
                   first, n_tiles, N, BLOCK_K: gl.constexpr, LOCKSTEP: gl.constexpr,
                   MMA_SCALES: gl.constexpr):  # fmt: skip
    """Each tile's S' by wgmma from the ring (with MMA_SCALES, times the keys' powers of
    two, `coneighbor_topk._scale`), then into a tile buffer once it is free."""
    STAGES: gl.constexpr = r_bufs.type.shape[0]
    S_BUFS: gl.constexpr = s_bufs.type.shape[0]
    BLOCK_M: gl.constexpr = s_bufs.type.shape[1]
    BLOCK_N: gl.constexpr = s_bufs.type.shape[2]
    layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16]
    )
    k_steps = gl.cdiv(N, BLOCK_K)
    if MMA_SCALES:
        exp = EXP + pid_b * N
        rows = row0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, layout))
        a_rows = gl.load(exp + rows, mask=rows < N, other=0)
    for t in range(n_tiles):
        s = gl.zeros((BLOCK_M, BLOCK_N), gl.float32, layout)
        for kk in range(k_steps):
            i = t * k_steps + kk
            stage = i % STAGES
            mbarrier.wait(ready.index(stage), (i // STAGES) & 1)
            r, c = r_bufs.index(stage), c_bufs.index(stage)
            s = warpgroup_mma(r, c.permute((1, 0)), s, is_async=True)
            s, _, _ = warpgroup_mma_wait(1, deps=(s, r, c))
            mbarrier.arrive(free.index((i + STAGES - 1) % STAGES), pred=kk > 0)
        s = warpgroup_mma_wait(0, deps=(s,))
        mbarrier.arrive(free.index((t * k_steps + k_steps - 1) % STAGES))
        if MMA_SCALES:
            cols = _tile_columns(t, lo, first, n_tiles, BLOCK_N, LOCKSTEP, layout)
            s = _scale(s, cols, a_rows, exp, N)
        buf = t % S_BUFS
        mbarrier.wait(s_free.index(buf), ((t // S_BUFS) & 1) ^ 1)
        s_bufs.index(buf).store(s)
        mbarrier.arrive(s_ready.index(buf))


@gluon.jit
def _merge_partition(s_bufs, s_ready, s_free, A, EXP, W, IDX, KEYS, pid_b, row0, part, lo,
                     first, n_tiles, N, C, K_KEEP, eps, LOG_KP: gl.constexpr,
                     ROW_WARPS: gl.constexpr, REFINE: gl.constexpr, LOCKSTEP: gl.constexpr,
                     PARTS: gl.constexpr, LANE_PAIRS: gl.constexpr,
                     MMA_SCALES: gl.constexpr):  # fmt: skip
    """Keys and merge of each tile as it arrives, then the epilogue of the program's rows
    (with PARTS > 1, their running lists into KEYS, as `coneighbor_topk_kernel` does)."""
    KP: gl.constexpr = 1 << LOG_KP
    S_BUFS: gl.constexpr = s_bufs.type.shape[0]
    BLOCK_M: gl.constexpr = s_bufs.type.shape[1]
    BLOCK_N: gl.constexpr = s_bufs.type.shape[2]
    LOG_BN: gl.constexpr = BLOCK_N.bit_length() - 1
    if LANE_PAIRS:  # a row on two lanes, which take its columns four at a time in turn
        layout: gl.constexpr = gl.BlockedLayout([1, 4], [16, 2], [gl.num_warps(), 1], [0, 1])
    else:  # as the MMA warpgroup holds it: a row on the four lanes of a quad
        layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[gl.num_warps(), 1], instr_shape=[16, BLOCK_N, 16]
        )
    rows = row0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, layout))
    row_ok = rows < N
    if not MMA_SCALES:  # else the MMA warpgroup scales the tiles
        exp = EXP + pid_b * N
        a_rows = gl.load(exp + rows, mask=row_ok, other=0)
    # An empty list in the layout that the network gives its output (-1 everywhere).
    acc = topk_desc(gl.full((BLOCK_M, BLOCK_N), -1, gl.int32, layout), LOG_KP, LOG_BN, ROW_WARPS)
    kth = kth_key(acc, K_KEEP, KP)
    for t in range(n_tiles):
        cols = _tile_columns(t, lo, first, n_tiles, BLOCK_N, LOCKSTEP, layout)
        buf = t % S_BUFS
        mbarrier.wait(s_ready.index(buf), (t // S_BUFS) & 1)
        s = s_bufs.index(buf).load(layout)
        mbarrier.arrive(s_free.index(buf))
        if MMA_SCALES:
            key = _scaled_keys(s, row_ok, cols, N, C)
        else:
            key = _keys(s, row_ok, cols, a_rows, exp, N, C)
        bar = gl.convert_layout(kth, gl.SliceLayout(1, layout))
        if gl.max(gl.max(key > bar[:, None], axis=1), axis=0):  # a key could enter
            acc = merge_tile(acc, key, LOG_KP, LOG_BN, ROW_WARPS)
            kth = kth_key(acc, K_KEEP, KP)
    rows = row0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, acc.type.layout))
    if PARTS > 1:
        out = ((pid_b * N + rows) * PARTS + part).to(gl.int64)[:, None] * KP
        place = gl.arange(0, KP, layout=gl.SliceLayout(0, acc.type.layout))
        gl.store(KEYS + out + place[None, :], acc, mask=(rows < N)[:, None])
    else:
        _epilogue(acc, rows, pid_b, A, EXP, W, IDX, N, C, K_KEEP, eps, REFINE)


@gluon.jit
def coneighbor_topk_ws_kernel(
    RM,  # TensorDescriptor of R (B·N, N) fp16, blocks (BLOCK_M, BLOCK_K)
    RN,  # the same, blocks (BLOCK_N, BLOCK_K)
    A,  # as in `coneighbor_topk_kernel`, and the rest of the arguments
    EXP,
    W,
    IDX,
    KEYS,
    N,
    C,
    K_KEEP,
    eps,
    LOG_KP: gl.constexpr,
    ROW_WARPS: gl.constexpr,
    REFINE: gl.constexpr,
    LOCKSTEP: gl.constexpr,
    PARTS: gl.constexpr,
    LANE_PAIRS: gl.constexpr,  # the merge warps' layout (`Config.lane_pairs`)
    MMA_SCALES: gl.constexpr,  # the keys' powers of two by the MMA warpgroup (`Config.mma_scales`)
    STAGES: gl.constexpr,  # operand stages of the ring
    S_BUFS: gl.constexpr,  # fp32 S tile buffers between the MMA and merge partitions
    MMA_REGS: gl.constexpr,  # registers per thread of the MMA warpgroup
):
    BLOCK_M: gl.constexpr = RM.block_type.shape[0]
    BLOCK_N: gl.constexpr = RN.block_type.shape[0]
    BLOCK_K: gl.constexpr = RM.block_type.shape[1]
    pid_b = gl.program_id(1)
    row0 = gl.program_id(0) // PARTS * BLOCK_M
    # This part's column tiles [lo, lo + n_tiles), from its diagonal tile if it holds it.
    part = gl.program_id(0) % PARTS
    all_tiles = gl.cdiv(N, BLOCK_N)
    lo = part * all_tiles // PARTS
    n_tiles = (part + 1) * all_tiles // PARTS - lo
    first = row0 // BLOCK_N - lo
    first = gl.where((first >= 0) & (first < n_tiles), first, 0)

    r_bufs = gl.allocate_shared_memory(gl.float16, [STAGES, BLOCK_M, BLOCK_K], RM.layout)
    c_bufs = gl.allocate_shared_memory(gl.float16, [STAGES, BLOCK_N, BLOCK_K], RN.layout)
    s_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_N], gl.float32)
    s_bufs = gl.allocate_shared_memory(gl.float32, [S_BUFS, BLOCK_M, BLOCK_N], s_layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    free = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    s_ready = gl.allocate_shared_memory(gl.int64, [S_BUFS, 1], mbarrier.MBarrierLayout())
    s_free = gl.allocate_shared_memory(gl.int64, [S_BUFS, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(free.index(i), count=1)
    for i in gl.static_range(S_BUFS):
        mbarrier.init(s_ready.index(i), count=1)
        mbarrier.init(s_free.index(i), count=1)

    gl.warp_specialize(
        [
            (_merge_partition, (s_bufs, s_ready, s_free, A, EXP, W, IDX, KEYS, pid_b, row0,
                                part, lo, first, n_tiles, N, C, K_KEEP, eps, LOG_KP,
                                ROW_WARPS, REFINE, LOCKSTEP, PARTS, LANE_PAIRS, MMA_SCALES)),
            (_copy_partition, (RM, RN, r_bufs, c_bufs, ready, free, pid_b, row0, lo, first,
                               n_tiles, N, BLOCK_N, BLOCK_K, LOCKSTEP)),
            (_mma_partition, (r_bufs, c_bufs, ready, free, s_bufs, s_ready, s_free, EXP,
                              pid_b, row0, lo, first, n_tiles, N, BLOCK_K, LOCKSTEP,
                              MMA_SCALES)),
        ],
        [1, 4],
        [24, MMA_REGS],
    )  # fmt: skip


@functools.cache
def operand_layout(rows: int, block_k: int) -> gl.NVMMASharedLayout:
    """The shared layout of a (rows, block_k) fp16 slice of R, as wgmma reads it (a frozen
    value, made once: two of them for every launch's descriptors)."""
    return gl.NVMMASharedLayout.get_default_for([rows, block_k], gl.float16)


def descriptors(r: Tensor, cfg: Config) -> tuple[TensorDescriptor, TensorDescriptor]:
    """The TMA descriptors of R (images, N, N) fp16 viewed as (images·N, N): blocks
    (block_m, block_k) and (block_n, block_k), in `operand_layout`."""
    flat = r.view(-1, r.shape[-1])
    return tuple(
        TensorDescriptor.from_tensor(flat, [rows, cfg.block_k], operand_layout(rows, cfg.block_k))
        for rows in (cfg.block_m, cfg.block_n)
    )


SHARED_BYTES = 232448
"""Shared memory a Hopper program may take (227 KiB)."""

SM_REGISTERS = 65536
"""Registers of a Hopper SM, shared by the partitions of its one program."""


def tile_buffers(cfg: Config) -> int:
    """S tile buffers beside ``cfg.num_stages`` operand stages: two where both fit in
    `SHARED_BYTES` (the MMA warpgroup stores a tile while the merge reads the last), else
    one (1 KiB left for the barriers). The merge warps take a tile into registers as its
    merge begins, so with one buffer the MMA warpgroup waits only where a tile's merge
    outlasts the next tile's dot (bench/kernels_notes.md, v29)."""
    stages = cfg.num_stages * (cfg.block_m + cfg.block_n) * cfg.block_k * 2
    tile = cfg.block_m * cfg.block_n * 4
    return 2 if stages + 2 * tile <= SHARED_BYTES - 1024 else 1


def register_split(cfg: Config) -> tuple[int, int]:
    """``(maxnreg, mma_regs)``: the registers per thread that the launch gives all
    ``cfg.num_warps + 8`` warps (the copy warp takes a warpgroup's slot), and those the MMA
    warpgroup keeps (its fp32 tile, ``block_m·block_n / 128`` a thread, and 40 more); the
    merge warps get the rest."""
    maxnreg = SM_REGISTERS // (32 * (cfg.num_warps + 8)) // 8 * 8
    return min(maxnreg, 255), min(cfg.block_m * cfg.block_n // 128 + 40, 232)


def ws_constants(cfg: Config, constants: dict) -> dict[str, int | bool]:
    """The constexpr arguments of `coneighbor_topk_ws_kernel` under ``cfg``, from those of
    `coneighbor_topk_kernel` (``constants``, `coneighbor_topk.topk_constants`)."""
    names = ("LOG_KP", "ROW_WARPS", "REFINE", "LOCKSTEP", "PARTS")
    return {name: constants[name] for name in names} | dict(
        LANE_PAIRS=cfg.lane_pairs,
        MMA_SCALES=cfg.mma_scales,
        STAGES=cfg.num_stages,
        S_BUFS=tile_buffers(cfg),
        MMA_REGS=register_split(cfg)[1],
    )


def launch_options(cfg: Config) -> dict[str, int]:
    """Triton's launch options of `coneighbor_topk_ws_kernel` under ``cfg``: the merge
    warps, and the registers that `register_split` gives every thread at launch."""
    return dict(num_warps=cfg.num_warps, maxnreg=register_split(cfg)[0])


def launch(cfg: Config, grid: tuple[int, int], r: Tensor, exp: Tensor, a: Tensor, w: Tensor,
           idx: Tensor, keys: Tensor | None, k: int, eps: float, constants: dict,
           warmup: bool) -> CompiledKernel:  # fmt: skip
    """`coneighbor_topk_ws_kernel` over ``grid`` (row blocks times parts, images) on the
    images of ``r`` (images, N, N) fp16 and their exponents ``exp``, into ``w`` and ``idx``,
    or each part's list into ``keys`` (the arguments of `coneighbor_topk`'s launch,
    ``constants`` its `topk_constants`); with ``warmup`` only built. Returns the build."""
    n = r.shape[-1]
    args = (*descriptors(r, cfg), a, exp, w, idx, keys, n, n.bit_length(), k, eps)
    options = ws_constants(cfg, constants) | launch_options(cfg)
    if warmup:
        return coneighbor_topk_ws_kernel.warmup(*args, grid=grid, **options)
    return coneighbor_topk_ws_kernel[grid](*args, **options)

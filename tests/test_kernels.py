"""The Triton kernels (``adcam_fast.kernels``) against the float64 reference and the torch path.

Without CUDA the kernels run on CPU tensors under Triton's interpreter (``conftest`` sets
``TRITON_INTERPRET=1`` before triton is imported), at small N. Tests marked ``gpu`` run the
real sizes on a CUDA GPU and are skipped without one.

Near-tie rule. The kernel computes S from R_i = sqrt(A_i · 4**-a_i) rounded to fp16 (for
every attention dtype; 4**-a_i a per-row power of four that puts the row's peak in [1, 4),
undone exactly in the keys, so that no order changes) with fp32 accumulation, and ranks
columns by int32 keys that keep
24 - c significant bits of S (c = N.bit_length() bits hold the column). Its S_ij is within
``s_err(N) · S_ij + 1e-5 · max S`` of the true one: R rounded to fp16 has a relative error
<= 2**-11, so each product and hence S (non-negative terms) is within 2**-10 relative;
fp32 accumulation adds N·2**-23 (a unit in the last place per addition, which also covers
tensor cores that truncate), the key's truncation 2**-(24 - c). Entries of R below fp16's
normal range (2**-14 after the scale) are off by <= 2**-25 absolute instead, in units of
their row's scale 2**a_j, at most the image's largest entry's square root: that moves S by
less than 2**-23·sqrt(N) of the image's largest S: < 1e-5 for the N <= 4096 tested
(N < 7000), when the rows' largest entries are normal fp32 numbers. So at the k-th place of a
row the kernel may legitimately keep another column than the float64 reference when their
S values are that close: with ``S_(k)`` the reference k-th largest S of row i, a kept
column j is valid when ``S_ij >= S_(k) - tol_i`` and every column with
``S_ij > S_(k) + tol_i`` must be kept, ``tol_i = 2·s_err/(1 - s_err) · S_(k) + 2e-5 · max S``
(the two columns' errors, relative to S_(k); 0.4 % of S_(k) at N = 4096). Rows whose
reference top-k is unambiguous at that tolerance (no other column within tol_i of S_(k))
are compared with the reference elementwise; on every row the weights must be
``rownorm(A ⊙ kept)`` of the kernel's own choice.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import random_attention

import adcam_fast
from adcam_fast import ops, reference

pytest.importorskip("triton")

from adcam_fast import kernels
from adcam_fast.kernels import coneighbor_topk, csr, launch, root
from adcam_fast.kernels.launch import Config

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _interpreter_problem() -> str | None:
    """Why this Triton's interpreter cannot run the kernels (3.4 to 3.9 tried), None if it can."""
    release = launch.release(launch.triton_version())
    if release < (3, 6):
        return "Triton 3.4 and 3.5's interpreter reads TMA strides in elements as bytes"
    if release < (3, 7) and np.lib.NumpyVersion(np.__version__) >= "2.0.0":
        return "Triton 3.6's interpreter needs numpy < 2 (it takes a loop bound from an array)"
    return None


INTERPRETER_PROBLEM = _interpreter_problem() if DEVICE == "cpu" else None
needs_kernels = pytest.mark.skipif(
    INTERPRETER_PROBLEM is not None, reason=INTERPRETER_PROBLEM or "the kernels run here"
)
"""For the tests that launch a kernel: on CPU they need an interpreter that runs the kernels.
The host-only tests (configs, launch plans, versions, errors raised before a launch) run
without one."""

W_TOL = {"rtol": 1e-5, "atol": 1e-6}  # fp32 normalisation and diffusion sums


@pytest.fixture(autouse=True)
def _fixed_configs(monkeypatch):
    """Default kernel configs: no autotuning (compile time, and its host syncs)."""
    monkeypatch.setenv("ADCAM_AUTOTUNE", "0")


def dense(weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Scatter a sparse Ã (weights, indices) into its dense (..., N, N) form, float64."""
    n = indices.shape[-2]
    w = weights.double()
    return w.new_zeros(*indices.shape[:-1], n).scatter_add_(-1, indices.long(), w)


def s_err(n: int) -> float:
    """The kernel's relative error bound on one S value for N = n (module docstring):
    2.0e-3 at N = 4096."""
    return 2**-10 + n * 2**-23 + 2 ** -(24 - n.bit_length())


def check_top_columns(S: torch.Tensor, kept: torch.Tensor, k: int) -> torch.Tensor:
    """Assert the near-tie rule for the kept columns (a 0/1 mask, k per row) of the float64
    S (..., N, N); returns a mask like S, true on the rows whose reference top-k is
    unambiguous."""
    e = s_err(S.shape[-1])
    kth = S.topk(k, dim=-1).values[..., -1:]
    tol = 2 * e / (1 - e) * kth + 2e-5 * S.amax(dim=(-2, -1), keepdim=True)
    kept = kept.bool()
    assert not (kept & (S < kth - tol)).any(), "kept a column far below the k-th largest S"
    assert not (~kept & (S > kth + tol)).any(), "dropped a column far above the k-th largest S"
    return ((S >= kth - tol).sum(-1) == k).unsqueeze(-1).expand_as(S)


def check_refinement(A: torch.Tensor, k: int, w: torch.Tensor, idx: torch.Tensor) -> float:
    """Assert the near-tie rule and the weights of a sparse Ã from the kernel (no self rows).

    A: the kernel's input (any dtype); the reference runs on its float64 values, on the
    device of the inputs (float64 on a GPU keeps the full-size checks fast).
    Returns the fraction of rows compared elementwise with the reference.
    """
    n, keep = A.shape[-1], min(k, A.shape[-1])
    assert w.shape == idx.shape == (*A.shape[:-1], keep)
    assert w.dtype == torch.float32 and torch.isfinite(w).all()
    A64 = A.double()
    kept = dense(torch.ones_like(w), idx)
    assert (kept.amax(-1) == 1).all(), "indices of a row must be distinct"
    expected = A64 * kept
    torch.testing.assert_close(dense(w, idx), expected / expected.sum(-1, keepdim=True), **W_TOL)
    ref = reference.refine_attention(A64, k)
    if k >= n:
        torch.testing.assert_close(dense(w, idx), ref, **W_TOL)
        return 1.0
    clear = check_top_columns(reference.coneighbor_similarity(A64), kept, k)
    torch.testing.assert_close(
        torch.where(clear, dense(w, idx), 0.0), torch.where(clear, ref, 0.0), **W_TOL
    )
    return clear[..., 0].double().mean().item()


def to_device(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.to(DEVICE) for t in tensors]


def hub_inputs(
    gen: torch.Generator, b: int, n: int, r: int, n_cls: int, hub_places: int = 1
) -> list[torch.Tensor]:
    """A sparse Ã (weights, indices: (B, N, r)) whose every row keeps node 0 in its first
    ``hub_places`` places (in-degree >= N·hub_places: a run over several groups and chunks
    of the diffusion's edge walk), and maps (B, K, N); on DEVICE."""
    idx = torch.randint(0, n, (b, n, r), generator=gen)
    idx[:, :, :hub_places] = 0
    w = torch.rand(b, n, r, generator=gen)
    cams = torch.rand(b, n_cls, n, generator=gen)
    return to_device(w, idx, cams)


# ---------------------------------------------------------------- refinement (kernels 1+2)


@needs_kernels
@pytest.mark.parametrize(
    ("lead", "n", "k", "dtype"),
    [
        ((2,), 37, 5, torch.float32),
        ((1,), 100, 50, torch.float32),
        ((2,), 144, 50, torch.float32),
        ((2, 2), 40, 16, torch.float32),
        ((3,), 64, 1, torch.float32),
        ((1,), 197, 20, torch.float16),
        ((1,), 197, 50, torch.bfloat16),
        ((1,), 160, 100, torch.float16),  # k not a power of two, 128-wide running list
    ],
)
def test_refine_random_attention(gen, lead, n, k, dtype):
    (A,) = to_device(random_attention(*lead, n, n, generator=gen, dtype=dtype))
    w, idx = kernels.refine_sparse_triton(A, k)
    assert idx.dtype == torch.int64
    assert check_refinement(A, k, w, idx) > 0  # some rows elementwise


@needs_kernels
@pytest.mark.parametrize(("n", "k"), [(20, 50), (37, 37), (1, 1)])
def test_refine_keeps_whole_rows_when_k_reaches_n(gen, n, k):
    A = random_attention(2, n, n, generator=gen)
    A[1, n // 2] = 0  # an all-zero row becomes the self row
    w, idx = kernels.refine_sparse_triton(*to_device(A), k)
    torch.testing.assert_close(dense(w.cpu(), idx.cpu()), reference.refine_attention(A, k), **W_TOL)
    w_ref, idx_ref = ops.refine_sparse(A, k)
    assert torch.equal(idx.cpu(), idx_ref)
    torch.testing.assert_close(w.cpu().double(), w_ref, **W_TOL)


def dyadic_blocks(n: int, sizes: list[int]) -> torch.Tensor:
    """Uniform attention in consecutive blocks of power-of-two sizes (cycled): sqrt and
    products are exact, so all S entries inside a block tie exactly (at 1)."""
    A = torch.zeros(n, n, dtype=torch.float64)
    start, i = 0, 0
    while start < n:
        end = min(start + sizes[i % len(sizes)], n)
        while (end - start) & (end - start - 1):  # trim to a power of two
            end -= 1
        A[start:end, start:end] = 1.0 / (end - start)
        start, i = end, i + 1
    return A


@needs_kernels
@pytest.mark.parametrize("k", [1, 3, 5, 8])
def test_refine_exact_ties_go_to_the_smaller_column(k):
    A = dyadic_blocks(37, [4, 8, 2])
    A[7] = 0
    A[7, [2, 9, 11, 20]] = 0.25  # a row whose S ties across several blocks
    A[30] = A[3]  # a duplicated row: equal columns of S
    w, idx = kernels.refine_sparse_triton(*to_device(A.float()), k)
    torch.testing.assert_close(dense(w.cpu(), idx.cpu()), reference.refine_attention(A, k), **W_TOL)
    w_ref, idx_ref = ops.refine_sparse(A, k)
    torch.testing.assert_close(dense(w.cpu(), idx.cpu()), dense(w_ref, idx_ref), **W_TOL)


@needs_kernels
def test_refine_one_hot_rows_become_self_rows():
    """One-hot rows: S is 1 where two rows share their hot column, else 0 (ties at 0 go to the
    smallest columns); a row whose hot column is not kept has zero mass -> self row."""
    n, k = 48, 6
    hot = torch.randperm(n, generator=torch.Generator().manual_seed(3)) % 20
    A = torch.zeros(2, n, n, dtype=torch.float64)
    A[0, torch.arange(n), hot] = 1.0
    A[1] = dyadic_blocks(n, [16, 4])
    A[1, 5] = 0  # zero row
    w, idx = kernels.refine_sparse_triton(*to_device(A.to(torch.float16)), k)
    ref = reference.refine_attention(A, k)
    assert (ref.diagonal(dim1=-2, dim2=-1) == 1).sum() > 10  # many self rows exercised
    torch.testing.assert_close(dense(w.cpu(), idx.cpu()), ref, **W_TOL)


def groups(gen: torch.Generator, b: int, n: int, k: int) -> torch.Tensor:
    """Group labels (B, N): each image's N rows dealt at random into N // k groups of k."""
    return torch.stack([torch.randperm(n, generator=gen) % (n // k) for _ in range(b)])


@needs_kernels
@pytest.mark.parametrize("kind", ["near_uniform", "block_diagonal"])
def test_refine_structured_attention(gen, kind):
    """Near-uniform rows (every entry in [1, 1.55] before the row sums: every S in [0.98, 1]),
    whose k largest S are still clear of the rest: a row's group of k rows shares a pattern
    of bumps (and 5 % noise of its own), so S is > 0.9999 within a group and < 0.993
    across, a gap over 3 times the near-tie tolerance (2e-3): every row is compared with
    the reference elementwise, its kept columns its group's, scattered over the row. Random
    attention in blocks of 24 and none outside: the k-th place falls inside the block, and
    most rows (98 % here) are clear."""
    n, k = 96, 12
    if kind == "near_uniform":
        bumps = torch.rand(2, n // k, n, generator=gen, dtype=torch.float64) < 0.5
        pattern = bumps.gather(1, groups(gen, 2, n, k)[..., None].expand(2, n, n))
        A = 1 + 0.5 * pattern + 0.05 * torch.rand(2, n, n, generator=gen, dtype=torch.float64)
        least_clear = 1.0
    else:
        A = torch.block_diag(*random_attention(4, 24, 24, generator=gen)).expand(2, n, n).clone()
        least_clear = 0.9
    A = A / A.sum(-1, keepdim=True)
    (Ad,) = to_device(A.float())
    w, idx = kernels.refine_sparse_triton(Ad, k)
    assert check_refinement(Ad, k, w, idx) >= least_clear


@needs_kernels
@pytest.mark.parametrize(
    ("n", "k", "block_n", "dtype"),
    [(100, 20, 32, torch.float32), (100, 20, 64, torch.float16), (70, 5, 16, torch.bfloat16)],
)
def test_refine_merge_schedules_agree(gen, n, k, block_n, dtype):
    """Merging whole tiles, taking a tile's few candidates one at a time (narrow: up to 1,
    some, or every tile), or parking candidates in few slots (a merge before almost every
    tile) or many (one merge at the end, over several chunks of slots), sorting runs from
    ascending halves or by alternating bitonic merges, one loop over the (tile, K step)
    pairs instead of a K loop per tile, and the column tiles in one order for all programs
    keep the same unique keys: bitwise equal outputs for configs that differ only in the
    schedule."""
    (A,) = to_device(random_attention(1, n, n, generator=gen, dtype=dtype))
    kp = launch.next_pow2(k)
    schedules = [dict(narrow=w) for w in (1, 4, max(block_n, kp))]
    schedules += [dict(slots=s) for s in (max(block_n, kp), 2 * block_n, 8 * block_n)]
    # 32 rows on 2 warps: warps split the rows (``ROW_WARPS``); on 4 (the rest), the columns
    assert [coneighbor_topk.topk_constants(kp, Config(32, 32, 16, num_warps=w), True)["ROW_WARPS"]
            for w in (2, 4)] == [True, False]  # fmt: skip
    schedules.append(dict(num_warps=2))
    # One loop over (tile, K step); one order of column tiles for all programs.
    schedules += [dict(lockstep=True), dict(flat=True, narrow=4, lockstep=True)]
    outs = [
        coneighbor_topk.refine_sparse(A, k, reference.EPS, config=Config(32, block_n, 16, **s))
        for s in [{}, *schedules]
    ]
    check_refinement(A, k, *outs[0])
    for w, idx in outs[1:]:
        assert torch.equal(idx, outs[0][1]) and torch.equal(w, outs[0][0])


@needs_kernels
def test_refine_column_parts_agree(gen):
    """A row block's column tiles shared out over 2, 3 or 5 programs (5 parts of 4 tiles:
    one without a tile), each walking its share in a K loop per tile, in one loop over
    (tile, K step) or parking candidates, and their lists merged after: bitwise the output
    of one program per row block, for the refinement and for ``TOP(S, k)``."""
    (A,) = to_device(random_attention(1, 60, 60, generator=gen, dtype=torch.float32))
    whole = Config(32, 16, 16)
    parts = [dict(parts=3), dict(parts=2, flat=True, narrow=4, lockstep=True)]
    parts += [dict(parts=2, slots=32), dict(parts=5)]
    configs = [whole, *(dataclasses.replace(whole, **p) for p in parts)]
    outs = [coneighbor_topk.refine_sparse(A, 10, reference.EPS, config=c) for c in configs]
    check_refinement(A, 10, *outs[0])
    for (w, idx), cfg in zip(outs[1:], configs[1:], strict=True):
        assert torch.equal(idx, outs[0][1]) and torch.equal(w, outs[0][0]), cfg
    s, cols = coneighbor_topk.similarity_topk(A, 10, config=whole)
    s_parts, cols_parts = coneighbor_topk.similarity_topk(A, 10, config=configs[1])
    assert torch.equal(cols, cols_parts) and torch.equal(s, s_parts)


@needs_kernels
@pytest.mark.parametrize(
    ("n", "block_k", "dtype"),
    [(72, 16, torch.float32), (72, 32, torch.float32), (40, 16, torch.bfloat16)],
)
def test_refine_tma_loads_agree(gen, n, block_k, dtype):
    """R's slices by the copy engine (TMA descriptors over all images' rows: a row block
    that runs past N reads the next image, or zeros after the last, and a K slice past N
    zeros), in a K loop per tile or in one loop over (tile, K step), give bitwise the
    outputs of masked pointer loads; N not divisible by 8 is refused."""
    (A,) = to_device(random_attention(3, n, n, generator=gen, dtype=dtype))
    loads, tma = Config(32, 32, block_k), Config(32, 32, block_k, tma=True)
    flat = dataclasses.replace(tma, flat=True)
    configs = (loads, tma, flat)
    outs = [coneighbor_topk.refine_sparse(A, 6, reference.EPS, config=c) for c in configs]
    check_refinement(A, 6, *outs[1])
    for w, idx in outs[1:]:
        assert torch.equal(outs[0][0], w) and torch.equal(outs[0][1], idx)
    with pytest.raises(ValueError, match="divisible by 8"):
        coneighbor_topk.refine_sparse(A[:, 2:, 2:].contiguous(), 6, reference.EPS, config=tma)


@pytest.mark.parametrize("kp", [1, 64, 128, 1024])
def test_topk_configs_take_the_copy_engine_where_it_fits(kp):
    """At N divisible by 8 the kp <= 64 default and candidates read R by TMA; elsewhere, for
    larger kp, and on a GPU whose dot is a warp's mma.sync (Ampere and Ada have no copy
    engine), none does; the default is always a candidate, and every one is a config the
    kernel can run. On Hopper the warp-specialized candidate joins the TMA ones, and only
    there."""
    for aligned in (False, True):
        for hopper in (False, True):
            default, candidates = coneighbor_topk.topk_configs(kp, aligned, hopper)
            assert default in candidates
            assert {c.tma for c in candidates} == {aligned and kp <= 64}
            assert {c.ws for c in candidates} == {False} | {aligned and kp <= 64 and hopper}
            for cfg in candidates:
                coneighbor_topk.check_config(cfg, kp)  # raises for one the kernel cannot run
        default, candidates = coneighbor_topk.topk_configs(kp, aligned, warp_mma=True)
        assert default in candidates
        assert not any(c.tma or c.ws for c in candidates)
        for cfg in candidates:
            coneighbor_topk.check_config(cfg, kp)


def test_warp_mma_is_read_from_the_compute_capability(monkeypatch):
    """The tiles for a warp's mma.sync go to compute capability 8.x and 12.x only."""
    for major, expected in ((8, True), (9, False), (10, False), (12, True)):
        props = SimpleNamespace(major=major)
        monkeypatch.setattr(launch, "device_properties", lambda device, p=props: p)
        assert launch.warp_mma(torch.device("cuda", 0)) is expected, major
    assert not launch.warp_mma(torch.device("cpu"))


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_refine_in_chunks_of_images(gen, monkeypatch, dtype):
    """Batches larger than ROOT_CHUNK go in chunks of whole images: same result."""
    (A,) = to_device(random_attention(5, 40, 40, generator=gen, dtype=dtype))
    A[3] *= 1e-6 if dtype == torch.float32 else 1e-3  # another per-image scale
    whole = kernels.refine_sparse_triton(A, 6)
    monkeypatch.setattr(coneighbor_topk, "ROOT_CHUNK", 2 * 40 * 40 + 1)  # 2 images a chunk
    chunked = kernels.refine_sparse_triton(A, 6)
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])
    check_refinement(A, 6, *chunked)


@needs_kernels
def test_batches_past_a_launch_limit_go_in_chunks(gen, monkeypatch):
    """Images past the grid's y limit (the sqrt pass, the top-k and the k >= N rows) or the
    CSR's int32 edges (the diffusion) go in chunks: bitwise the same outputs."""
    A, cams = to_device(
        random_attention(3, 16, 16, generator=gen, dtype=torch.float32),
        torch.rand(3, 2, 16, generator=gen),
    )
    whole = [kernels.refine_sparse_triton(A, k) for k in (4, 16)]
    w, idx = whole[0]
    maps = kernels.diffuse_sparse_triton(w, idx, cams, 2)
    monkeypatch.setattr(launch, "GRID_Y", 2)
    monkeypatch.setattr(csr, "MAX_EDGES", 2 * 16 * 5)  # 2 images of 16 rows of 4 + 1 edges
    for k, (w_all, idx_all) in zip((4, 16), whole, strict=True):
        w_part, idx_part = kernels.refine_sparse_triton(A, k)
        assert torch.equal(w_all, w_part) and torch.equal(idx_all, idx_part)
    assert torch.equal(kernels.diffuse_sparse_triton(w, idx, cams, 2), maps)


def test_images_per_launch_fills_whole_waves():
    """Chunks of images whose programs fill their waves: at N = 2304 with 64-row programs
    (36 an image) on 264 slots (an H200 at two programs per SM), 7 images a launch take 19
    waves for B = 128 where the 12 of the memory cap take 22; a batch within the cap is one
    launch; ties go to fewer launches, then to larger chunks."""
    plan = coneighbor_topk.images_per_launch

    def waves(b: int, c: int, programs: int, slots: int) -> int:
        sizes = [c] * (b // c) + [b % c]
        return sum(-(-size * programs // slots) for size in sizes)

    assert plan(128, 12, 36, 264) == 7
    assert plan(32, 12, 36, 264) == 7  # 5 waves (cap: 6)
    assert plan(128, 39, 21, 264) == 37  # N = 1296: 11 waves in 4 launches (cap: 13)
    assert plan(128, 202, 9, 264) == 128 and plan(5, 12, 36, 264) == 5
    assert plan(20, 12, 10, 264) == 12  # 2 waves in 2 launches, as with 10
    for b, cap, programs, slots in [(100, 9, 7, 50), (97, 30, 13, 132), (40, 3, 200, 264)]:
        c = plan(b, cap, programs, slots)
        assert 1 <= c <= cap
        assert waves(b, c, programs, slots) <= waves(b, cap, programs, slots)


def test_programs_per_sm():
    """Occupancy by registers (in units of 256 per warp), shared memory (plus 1 KiB a
    block) and threads, on an H200's SM (65536 registers, 228 KiB, 2048 threads)."""
    sm = (65536, 233472, 2048)
    assert launch.programs_per_sm(238, 99 * 1024, 4, *sm) == 2  # the TMA top-k default
    assert launch.programs_per_sm(168, 72 * 1024, 4, *sm) == 3  # capped at 168 registers
    assert launch.programs_per_sm(80, 120 * 1024, 4, *sm) == 1  # by shared memory
    assert launch.programs_per_sm(16, 0, 1, *sm) == 64  # by threads
    assert launch.programs_per_sm(255, 0, 16, *sm) == 1  # none fits: still one


@needs_kernels
def test_refine_is_blind_to_a_power_of_two_scale(gen):
    """sqrt(A) is taken at a per-row power-of-four scale: attention far outside fp16's
    range (2**100 · A: its square roots would overflow fp16) gives bitwise the same output."""
    (A,) = to_device(random_attention(2, 50, 50, generator=gen, dtype=torch.float32))
    w, idx = kernels.refine_sparse_triton(A, 8)
    w_big, idx_big = kernels.refine_sparse_triton(A * 2.0**100, 8)
    assert torch.equal(idx, idx_big) and torch.equal(w, w_big)


def ieee_root(A: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """What `take_root` must store: fp16 of the IEEE fp32 square root of each row of A times
    ``2**-a_i · 2**-a_i``, from float64's root (53 >= 2·24 + 2 bits: rounding it to fp32 is
    exact); torch's fp32 sqrt on a CPU can be an ulp off (of 3.998046875: one high)."""
    half = torch.exp2(-a.float())[..., None]
    return (A.float() * half * half).double().sqrt().float().half()


def test_root_shape_covers_each_row_once():
    """`root_shape`: a row of N <= ROOT_BLOCK is read whole, as a head of BLOCK <= N columns
    and a tail of TAIL lanes, powers of two (or no tail), that cover it; fewer of the tail's
    lanes fall past N than on it, and no more lanes in all than N's next power of two (none
    past N where N is a sum of two powers of two: 576, 2304); ROWS such rows fill
    ROOT_BLOCK lanes at that power of two. Longer rows: one a program, in blocks."""
    pow2 = launch.next_pow2
    for n in range(1, root.ROOT_BLOCK + 1):
        s = root.root_shape(n)
        head, tail = s["BLOCK"], s["TAIL"]
        assert s["WHOLE"] and s["ROWS"] * pow2(n) == root.ROOT_BLOCK, n
        assert head <= n <= head + tail <= pow2(n) and head == pow2(head), n
        assert tail == 0 or (tail == pow2(tail) and head + tail - n < n - head), n
    assert all(sum(root.root_shape(n)[f] for f in ("BLOCK", "TAIL")) == n
               for n in (576, 2304))  # fmt: skip
    assert root.root_shape(5000) == dict(ROWS=1, BLOCK=4096, TAIL=0, WHOLE=False)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_root_scales_each_row_by_a_power_of_four(gen, monkeypatch, dtype):
    """`take_root`: ``R_i = fp16(sqrt(A_i · 4**-a_i))`` with the row's peak scaled into
    [1, 4) (zero rows: a = -64), bitwise the fp16 rounding of the IEEE fp32 square root of
    ``A_i · 2**-a_i · 2**-a_i`` (entries far below their row's peak and zeros included),
    and the same whether a row is read whole (N = 44: 32 columns and a tail of 16 lanes, 4
    past N) or in blocks (N > ROOT_BLOCK: two reads)."""
    (A,) = to_device(random_attention(2, 44, 44, generator=gen, dtype=torch.float32))
    A[0, 3] *= 2.0**-60 if dtype == torch.float32 else 2.0**-10  # rows far apart in scale
    A[1, 5] = 0.0
    tiny = torch.tensor([2.0**-47, 2.0**-49, 2.0**-50, 2.0**-51, 2.0**-60, 2.0**-130, 0.0])
    A[0, 7, :7] = A[0, 7].max() * tiny.to(A.device)  # around fp16's last subnormal of R
    A = A.to(dtype)
    R, a = torch.empty(A.shape, dtype=torch.float16), torch.empty(2, 44, dtype=torch.int32)
    R, a = to_device(R, a)
    root.take_root(A, R, a)
    peak = A.float().amax(-1)
    quarter = torch.exp2(-2.0 * a.double())
    assert a[1, 5] == -64 and ((peak * quarter >= 1) & (peak * quarter < 4) | (peak == 0)).all()
    expected = (A.double() * quarter[..., None]).sqrt()
    torch.testing.assert_close(R.double(), expected, rtol=2**-11, atol=2**-25)
    assert torch.equal(R, ieee_root(A, a))
    monkeypatch.setattr(root, "ROOT_BLOCK", 16)  # rows in 3 blocks
    R_blocks, a_blocks = torch.empty_like(R), torch.empty_like(a)
    root.take_root(A, R_blocks, a_blocks)
    assert torch.equal(R_blocks, R) and torch.equal(a_blocks, a)


# ---------------------------------------------------------------- TOP(S, k) alone (kernel 1)


@needs_kernels
@pytest.mark.parametrize(
    ("n", "k", "dtype", "scale"),
    [
        (37, 5, torch.float32, 1.0),
        (144, 50, torch.float32, 2.0**-100),  # sqrt(A) below fp16's range: S comes back unscaled
        (64, 20, torch.float16, 1.0),
        (50, 7, torch.bfloat16, 2.0**100),
        (100, 100, torch.float32, 1.0),  # k = N: every column, sorted
        (70, 90, torch.float32, 1.0),  # k > N
    ],
)
def test_similarity_topk_values_and_columns(gen, n, k, dtype, scale):
    """Values are the reference S at the returned columns within the kernel's error bound
    (``s_err``), non-increasing along a row; the columns obey the near-tie rule."""
    A = random_attention(2, n, n, generator=gen) * scale
    values, idx = kernels.similarity_topk_triton(*to_device(A.to(dtype)), k)
    keep = min(k, n)
    assert values.shape == idx.shape == (2, n, keep)
    assert values.dtype == torch.float32 and idx.dtype == torch.int64
    values, idx = values.cpu().double(), idx.cpu()
    S = reference.coneighbor_similarity(A.to(dtype).double())
    torch.testing.assert_close(values, S.gather(-1, idx), rtol=s_err(n), atol=1e-5 * scale)
    assert (values[..., 1:] <= values[..., :-1]).all()
    check_top_columns(S, dense(torch.ones_like(values), idx), keep)


@needs_kernels
@pytest.mark.parametrize("k", [1, 4, 9])
def test_similarity_topk_exact_ties_in_column_order(k):
    """Equal S values come in ascending column order: the first k of a stable descending sort."""
    A = dyadic_blocks(37, [4, 8, 2])
    A[30] = A[3]  # a duplicated row: equal columns of S
    values, idx = kernels.similarity_topk_triton(*to_device(A.float()), k)
    S = reference.coneighbor_similarity(A)
    order = S.sort(dim=-1, descending=True, stable=True).indices[..., :k]
    assert torch.equal(idx.cpu(), order)
    torch.testing.assert_close(values.cpu().double(), S.gather(-1, order), rtol=s_err(37), atol=0)


# ---------------------------------------------------------------- diffusion (kernel 3)


@needs_kernels
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("steps", [0, 1, 2, 3])
def test_diffuse_sparse_matches_torch(gen, steps, index_dtype):
    b, n, r, n_cls = 3, 50, 7, 5
    idx = torch.randint(0, n, (b, n, r), generator=gen)
    idx[1] = torch.arange(r)  # every row picks columns 0..r-1: in-degree n for those
    idx[2, :, 0] = torch.arange(n)  # a self edge in each row
    w = torch.rand(b, n, r, generator=gen, dtype=torch.float64)
    w[2, 3] = 0  # a row with zero weights
    cams = torch.rand(b, n_cls, n, generator=gen, dtype=torch.float64)
    out = kernels.diffuse_sparse_triton(*to_device(w.float(), idx.to(index_dtype), cams), steps)
    assert out.dtype == torch.float32 and out.shape == cams.shape
    torch.testing.assert_close(out.cpu().double(), ops.diffuse_sparse(w, idx, cams, steps), **W_TOL)


@needs_kernels
def test_diffuse_sparse_many_classes_and_no_alias(gen):
    """More classes than one program's block, and steps = 0 copies rather than aliases."""
    n, r, n_cls = 30, 4, 40
    w = torch.rand(n, r, generator=gen)
    idx = torch.randint(0, n, (n, r), generator=gen)
    cams = torch.rand(n_cls, n, generator=gen)
    w_d, idx_d, cams_d = to_device(w, idx, cams)
    out = kernels.diffuse_sparse_triton(w_d, idx_d, cams_d, 2)
    torch.testing.assert_close(
        out.cpu().double(), ops.diffuse_sparse(w.double(), idx, cams.double(), 2), **W_TOL
    )
    same = kernels.diffuse_sparse_triton(w_d, idx_d, cams_d, 0)
    assert torch.equal(same, cams_d) and same.data_ptr() != cams_d.data_ptr()
    A = torch.eye(n, device=cams_d.device)  # and detached, as the kernels' outputs are
    assert not kernels.adcam_triton(A, cams_d.clone().requires_grad_(), 4, 0).requires_grad


def csr_reference(weights: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """`csr.csr_edges` in torch: each row's edges and a zero-weight self edge, row-major,
    stably sorted by ``N·image + destination``; the sources, destinations and weights."""
    b, n, r = indices.shape
    base = n * torch.arange(b, dtype=torch.int32, device=indices.device)[:, None]
    nodes = torch.arange(n, dtype=torch.int32, device=indices.device).expand(b, n)
    dst = torch.cat([indices.to(torch.int32), nodes[..., None]], -1).reshape(b, -1) + base
    key, pos = torch.sort(dst.view(-1), stable=True)
    self_w = torch.zeros(b, n, 1, dtype=torch.float32, device=weights.device)
    wgt = torch.cat([weights.float(), self_w], -1).view(-1)[pos].view(b, -1)
    src = torch.div(pos, r + 1, rounding_mode="floor").view(b, -1) - base
    return src.to(torch.int32), key.view(b, -1) - base, wgt


@needs_kernels
@pytest.mark.parametrize(
    ("b", "n", "r", "index_dtype", "dtype"),
    [(3, 37, 5, torch.int64, torch.float16), (1, 9, 1, torch.int32, torch.float32),
     (2, 130, 12, torch.int32, torch.bfloat16)],
)  # fmt: skip
def test_csr_edges_match_torch(gen, b, n, r, index_dtype, dtype):
    """The CSR gives bitwise the arrays of the torch reference, hub nodes (long runs), rows
    that keep themselves (their self edge second), columns given twice in a row and
    non-contiguous inputs included."""
    from adcam_fast.kernels.csr import csr_edges

    idx = torch.randint(0, n, (b, n, r), generator=gen, dtype=index_dtype)
    idx[:, :, 0] = 2  # a node every row keeps
    idx[:, 3, -1] = 3  # a row that keeps itself
    idx[:, 5, -1] = 2  # and one that gives a column twice (for r > 1)
    w = torch.rand(b, n, r, generator=gen).to(dtype)
    want = csr_reference(w, idx)
    for w_in, idx_in in [(w, idx), (w.mT.contiguous().mT, idx.mT.contiguous().mT)]:
        got = csr_edges(*to_device(w_in, idx_in))
        for g, e in zip(got, want, strict=True):
            assert g.dtype == e.dtype and torch.equal(g.cpu(), e)


def test_diffusion_configs_few_builds_one_order():
    """On a GPU every class count maps to the same two configs (a new count compiles
    nothing new), and every candidate sums in the same order (same chunk and group)."""
    from adcam_fast.kernels.diffusion import diffusion_configs

    seen = set()
    for n_cls in range(1, 65):
        default, candidates = diffusion_configs(n_cls, torch.device("cuda"))
        assert candidates[0] == default
        assert {(c.block_n, c.block_k) for c in candidates} == {(512, 16)}
        seen.update(candidates)
    blocks = sorted((c.block_m, c.num_warps, c.parts, c.prefetch) for c in seen)
    assert blocks == [(4, 1, 0, False), (4, 1, 0, True), (4, 1, 1, False), (4, 1, 1, True)]


@needs_kernels
def test_diffusion_candidates_agree_bitwise(gen):
    """The GPU candidates (one walk per image and the split, each with sources loaded a
    chunk ahead or not; a chunk walk with partial chunks, runs that span groups and chunks:
    a node kept by every row) give bitwise the same maps, and so does another class
    count's padding."""
    from adcam_fast.kernels.diffusion import diffuse_sparse, diffusion_configs

    n_cls = 11
    w, idx, cams = hub_inputs(gen, 2, 40, 12, n_cls)
    default, candidates = diffusion_configs(n_cls, torch.device("cuda"))
    outs = [diffuse_sparse(w, idx, cams, 2, config=c) for c in candidates]
    assert len(outs) == 4
    for out in outs[1:]:
        assert torch.equal(out, outs[0])
    fewer = diffuse_sparse(w, idx, cams[:, :3].contiguous(), 2, config=default)
    assert torch.equal(fewer, outs[0][:, :3])


@needs_kernels
@pytest.mark.parametrize("steps", [1, 2])
def test_diffusion_parts_agree_bitwise(gen, steps):
    """An image's edges split over programs (parts, a launch per step) give bitwise the maps
    of one walk, also when a run spans several parts (a node kept 4 times by every row)."""
    from adcam_fast.kernels.diffusion import diffuse_sparse

    w, idx, cams = hub_inputs(gen, 2, 40, 12, 5, hub_places=4)  # a run over three chunks
    chunked = Config(block_m=8, block_n=64, block_k=4, parts=1)  # 520 edges: 9 chunks an image
    one = diffuse_sparse(w, idx, cams, steps, config=chunked)
    expected = ops.diffuse_sparse(w.double().cpu(), idx.cpu(), cams.double().cpu(), steps)
    torch.testing.assert_close(one.cpu().double(), expected, **W_TOL)
    for parts, prefetch in [(2, False), (3, False), (9, False), (3, True)]:
        cfg = dataclasses.replace(chunked, parts=parts, prefetch=prefetch)  # 9: a chunk a part
        assert torch.equal(diffuse_sparse(w, idx, cams, steps, config=cfg), one), parts


@needs_kernels
def test_autotuning_leaves_the_result_unchanged(gen, monkeypatch):
    """On a GPU, the first call of a config key runs every candidate, repeatedly, before the
    chosen one (`launch.choose_config`): each launch must leave its inputs as it found them.
    Here that autotuning is replayed under the interpreter (every candidate run twice on
    the real arguments), and the result must equal a call without it."""
    from adcam_fast.kernels import diffusion

    def autotune(key, default, candidates, run, device):
        for cfg in [default, *candidates] * 2:
            run(cfg)
        return default

    b, n, r, n_cls = 2, 40, 6, 5
    A = random_attention(b, n, n, generator=gen)
    w, idx = torch.rand(b, n, r, generator=gen), torch.randint(0, n, (b, n, r), generator=gen)
    cams = torch.rand(b, n_cls, n, generator=gen)
    A, w, idx, cams = to_device(A, w, idx, cams)
    expected = (
        coneighbor_topk.refine_sparse(A, 8, reference.EPS),
        diffusion.diffuse_sparse(w, idx, cams, 3),
    )
    monkeypatch.setattr(coneighbor_topk, "choose_config", autotune)
    monkeypatch.setattr(diffusion, "choose_config", autotune)
    w_top, idx_top = coneighbor_topk.refine_sparse(A, 8, reference.EPS)
    assert torch.equal(w_top, expected[0][0]) and torch.equal(idx_top, expected[0][1])
    assert torch.equal(diffusion.diffuse_sparse(w, idx, cams, 3), expected[1])


@needs_kernels
def test_diffusion_config_key_counts_class_blocks(gen, monkeypatch):
    """Class counts that give the same programs share a config-cache key, so a labelling
    run whose batches carry 1 to 4 labels autotunes the diffusion once per size."""
    from adcam_fast.kernels import diffusion

    keys = []

    def record(key, default, candidates, run, device):
        keys.append(key)
        return default

    monkeypatch.setattr(diffusion, "choose_config", record)
    w, idx = to_device(torch.rand(1, 8, 3, generator=gen), torch.randint(0, 8, (1, 8, 3)))
    for n_cls in (1, 3, 4, 5, 8, 9):
        (cams,) = to_device(torch.rand(1, n_cls, 8, generator=gen))
        diffusion.diffuse_sparse(w, idx, cams, 1)
    assert keys[0] == keys[1] == keys[2] != keys[3] == keys[4] != keys[5]


# ---------------------------------------------------------------- the fused op


@needs_kernels
@pytest.mark.parametrize(
    ("lead", "n", "k", "steps", "n_cls", "cams_dtype"),
    [
        ((2,), 64, 10, 2, 3, torch.float64),
        ((2, 2), 37, 5, 1, 4, torch.float32),
        ((1,), 100, 50, 0, 2, torch.float16),
        ((3,), 20, 50, 2, 5, torch.bfloat16),  # k >= N
        ((1,), 144, 50, 2, 20, torch.float32),
    ],
)
def test_adcam_triton_matches_reference(gen, lead, n, k, steps, n_cls, cams_dtype):
    A = random_attention(*lead, n, n, generator=gen, dtype=torch.float32)
    cams = torch.rand(*lead, n_cls, n, generator=gen, dtype=torch.float64).to(cams_dtype)
    A_d, cams_d = to_device(A, cams)
    out = kernels.adcam_triton(A_d, cams_d, k, steps)
    assert out.dtype == torch.float32 and out.shape == cams.shape
    w, idx = kernels.refine_sparse_triton(A_d, k)
    clear = check_refinement(A, k, w.cpu(), idx.cpu())
    expected = reference.diffuse(dense(w.cpu(), idx.cpu()), cams.double(), steps)
    torch.testing.assert_close(out.cpu().double(), expected, **W_TOL)
    if clear == 1.0:
        torch.testing.assert_close(
            out.cpu().double(), reference.adcam(A.double(), cams.double(), k, steps), **W_TOL
        )


@needs_kernels
def test_adcam_triton_matches_adcam_when_every_row_is_clear(gen):
    """k < N with every row's top-k clear of the near-tie tolerance, so the fused op must
    give `reference.adcam`'s maps: attention peaked on groups of k rows scattered over the
    row (weights in [1, 2] inside a row's group, 0.02 on every other column before the row
    sums: S > 0.97 within a group, < 0.3 across); the refinement drops the ~6 % of each
    row's mass outside its group."""
    b, n, k, steps = 2, 48, 8, 2
    group = groups(gen, b, n, k)
    inside = 1 + torch.rand(b, n, n, generator=gen, dtype=torch.float64)
    A = torch.where(group[..., :, None] == group[..., None, :], inside, 0.0) + 0.02
    A = (A / A.sum(-1, keepdim=True)).float()
    cams = torch.rand(b, 3, n, generator=gen, dtype=torch.float64)
    A_d, cams_d = to_device(A, cams)
    out = kernels.adcam_triton(A_d, cams_d, k, steps)
    w, idx = kernels.refine_sparse_triton(A_d, k)
    assert check_refinement(A, k, w.cpu(), idx.cpu()) == 1.0
    expected = reference.adcam(A.double(), cams.double(), k, steps)
    torch.testing.assert_close(out.cpu().double(), expected, **W_TOL)


@needs_kernels
def test_public_dispatch_reaches_the_kernels(gen):
    A = random_attention(2, 30, 30, generator=gen, dtype=torch.float32)
    cams = torch.rand(2, 3, 30, generator=gen)
    A_d, cams_d = to_device(A, cams)
    out = adcam_fast.adcam(A_d, cams_d, k=7, steps=2, backend="triton")
    assert torch.equal(out, kernels.adcam_triton(A_d, cams_d, 7, 2))


@needs_kernels
@pytest.mark.parametrize("shape", [(2, 0, 9), (0, 3, 9), (2, 0, 2, 9)])
def test_empty_batches_and_no_classes(gen, shape):
    """Zero images or zero classes: empty outputs of the right shape, for the fused op and
    for the diffusion alone (N = 9 throughout, k = 4 < N)."""
    lead, n = shape[:-2], shape[-1]
    A, cams = to_device(random_attention(*lead, n, n, generator=gen), torch.rand(shape))
    for steps in (0, 2):
        out = kernels.adcam_triton(A, cams, 4, steps)
        assert out.shape == shape and out.dtype == torch.float32
        w, idx = kernels.refine_sparse_triton(A, 4)
        assert w.shape == idx.shape == (*lead, n, 4)
        assert kernels.diffuse_sparse_triton(w, idx, cams, steps).shape == shape


# ---------------------------------------------------------------- bad input


def test_errors_name_the_problem(gen, monkeypatch):
    A, cams = to_device(
        random_attention(2, 16, 16, generator=gen, dtype=torch.float32),
        torch.rand(2, 3, 16, generator=gen),
    )
    with pytest.raises(ValueError, match="one device"):
        kernels.adcam_triton(A, cams.to("meta"), 4, 2)
    with pytest.raises(ValueError, match="runs on CUDA"):
        kernels.adcam_triton(A.to("meta"), cams.to("meta"), 4, 2)
    for per_row in (kernels.refine_sparse_triton, kernels.similarity_topk_triton):
        with pytest.raises(ValueError, match="runs on CUDA"):  # before any value is read
            per_row(A.to("meta"), 4)
    with pytest.raises(ValueError, match="cams is on meta but A is on"):
        adcam_fast.adcam(A, cams.to("meta"), 4, 2, backend="triton")
    with pytest.raises(ValueError, match="eps must be a finite number >= 0, got -1"):
        kernels.refine_sparse_triton(A, 4, eps=-1.0)
    huge = A.double() * 1e40  # finite in float64, not in the kernels' float32
    with pytest.raises(ValueError, match="A holds values beyond float32's range"):
        kernels.adcam_triton(huge, cams, 4, 2)
    with pytest.raises(ValueError, match="cams holds values beyond float32's range"):
        kernels.adcam_triton(A, cams.double() * 1e300, 4, 2)
    with pytest.raises(ValueError, match="cams must have shape"):
        kernels.adcam_triton(A, cams[..., :-1], 4, 2)
    with pytest.raises(ValueError, match="k must be"):
        kernels.adcam_triton(A, cams, 0, 2)
    ones, zeros = torch.ones(16, 2, device=DEVICE), torch.zeros(16, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="indices must lie"):
        kernels.diffuse_sparse_triton(ones, torch.full_like(ones, 16, dtype=torch.long), cams[0], 1)
    with pytest.raises(ValueError, match="share a shape"):
        kernels.diffuse_sparse_triton(ones, zeros.to(DEVICE), cams[0], 1)
    with pytest.raises(ValueError, match="int32 or int64"):
        kernels.diffuse_sparse_triton(ones, ones, cams[0], 1)
    with pytest.raises(ValueError, match="weights must have a floating dtype"):
        kernels.diffuse_sparse_triton(ones.long(), zeros.to(DEVICE)[:, :2], cams[0], 1)
    with pytest.raises(ValueError, match=r"indices must be a torch\.Tensor, got list"):
        kernels.diffuse_sparse_triton(ones, [[0]], cams[0], 1)
    monkeypatch.setattr(coneighbor_topk, "MAX_TOPK", 4)
    with pytest.raises(ValueError, match=r"k <= 4 \(or k >= N\), got k=5"):
        kernels.refine_sparse_triton(A, 5)
    with pytest.raises(ValueError, match="k <= 4, got k=16"):  # N = 16: every column
        kernels.similarity_topk_triton(A, 16)
    if DEVICE == "cpu":
        monkeypatch.setattr(launch, "interpreting", lambda: False)
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
            kernels.adcam_triton(A, cams, 4, 2)
    else:
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
            kernels.adcam_triton(A.cpu(), cams.cpu(), 4, 2)
        monkeypatch.setattr(launch, "interpreting", lambda: True)
        with pytest.raises(ValueError, match="built for Triton's interpreter"):
            kernels.adcam_triton(A, cams, 4, 2)


@pytest.mark.parametrize(
    ("version", "problem"),
    [
        ("3.3.1", "triton 3.3.1 is older than 3.4, the oldest the kernels build with"),
        (None, "triton is not installed"),
    ],
)
def test_a_triton_the_kernels_cannot_build_with_is_named(monkeypatch, gen, version, problem):
    """Found before anything is built: ``auto`` keeps to the torch path, and the triton
    backend says what is wrong, on either device."""
    monkeypatch.setattr(launch, "triton_version", lambda: version)
    assert launch.unusable() == problem and not kernels.triton_available()
    assert ops.resolve_backend("auto", torch.device("cuda"), 50, 576) == "torch"
    (A,) = to_device(random_attention(1, 16, 16, generator=gen))
    with pytest.raises(ValueError, match=f'cannot run.*: {problem}; use backend="torch"'):
        kernels.refine_sparse_triton(A, 4)


def test_versions_are_read_as_releases():
    assert launch.release("3.6.0") == (3, 6)
    assert launch.release("3.10.1+git1a2b3c4") == (3, 10)
    with pytest.raises(ValueError, match="not a version: 'main'"):
        launch.release("main")
    # The Gluon kernel only where its build was checked: not 3.5, whose warp_specialize
    # takes other arguments, nor a release after 3.9.
    assert [launch.gluon_builds(v) for v in ("3.5.1", "3.6.0", "3.9.0", "3.10.0")] == [
        False, True, True, False
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(block_n=48), "block_n must be a power of two >= 16, got 48"),
        (dict(block_k=8), "block_k must be a power of two >= 16, got 8"),
        (dict(num_warps=3), "num_warps must be a power of two >= 1, got 3"),
        (dict(block_n=16), r"block_n must be >= next_pow2\(k\) = 32 with slots 0, got 16"),
        (dict(slots=16), "slots must be 0 or a power of two >= block_n = 32, got 16"),
        (dict(slots=64, flat=True), "flat needs slots 0, got 64"),
        (dict(narrow=-1), "narrow must be >= 0, got -1"),
        (dict(ws=True), r"ws needs tma \(its copy warp"),
        (dict(ws=True, tma=True, narrow=16), "ws takes no narrow, got 16"),
        (dict(ws=True, tma=True), "ws needs block_m >= 64 and block_m·block_n <= 16384"),
        (dict(lane_pairs=True), "lane_pairs needs ws and block_m >= 16·num_warps"),
        (dict(mma_scales=True), r"mma_scales needs ws \(the Gluon kernel's MMA warpgroup\)"),
    ],
)
def test_a_config_the_kernel_cannot_run_is_named(gen, change, message):
    """A config passed to the top-k kernels is checked before anything is launched."""
    (A,) = to_device(random_attention(1, 40, 40, generator=gen))
    config = dataclasses.replace(Config(32, 32, 16), **change)
    with pytest.raises(ValueError, match=message):
        coneighbor_topk.refine_sparse(A, 20, reference.EPS, config=config)


@pytest.mark.skipif(
    torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9,
    reason="on Hopper the warp-specialized kernel runs",
)
def test_a_warp_specialized_config_needs_hopper(gen):
    (A,) = to_device(random_attention(1, 40, 40, generator=gen))
    config = Config(128, 128, 64, num_warps=8, tma=True, ws=True)
    with pytest.raises(ValueError, match="ws needs a Hopper GPU"):
        coneighbor_topk.refine_sparse(A, 20, reference.EPS, config=config)


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="with a CUDA GPU the kernels may well be available"
)
def test_triton_available_is_false_without_cuda():
    assert kernels.triton_available() is False


# ---------------------------------------------------------------- GPU: real sizes

GPU_SIZES = [(576, 16), (1024, 8), (1296, 4), (2304, 2), (4096, 1)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("n", "b"), GPU_SIZES)
def test_gpu_refine_full_size(n, b, dtype):
    gen = torch.Generator().manual_seed(n)
    A = random_attention(b, n, n, generator=gen, dtype=dtype).cuda()
    w, idx = kernels.refine_sparse_triton(A, 50)
    assert check_refinement(A, 50, w, idx) > 0


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n", [576, 1296, 2304, 4096, 5000])
def test_gpu_root_full_size(n, dtype):
    """`take_root` in each of its shapes (`root_shape`: a tail with no lane past N, one with
    240, none, and rows in blocks past ROOT_BLOCK): bitwise the IEEE fp32 square root of the
    scaled rows in fp16, and each row's power of four."""
    gen = torch.Generator().manual_seed(n)
    A = random_attention(2, n, n, generator=gen, dtype=torch.float32)
    A[0, 1] *= 2.0**-40 if dtype == torch.float32 else 2.0**-10  # a row far below the others
    A = A.to(dtype).cuda()
    R = torch.empty(A.shape, dtype=torch.float16, device="cuda")
    a = torch.empty(2, n, dtype=torch.int32, device="cuda")
    root.take_root(A, R, a)
    assert torch.equal(R, ieee_root(A, a))
    peak = A.float().amax(-1) * torch.exp2(-2.0 * a.float())
    assert ((peak >= 1) & (peak < 4)).all()


@pytest.mark.gpu
@pytest.mark.parametrize(("n", "b"), GPU_SIZES)
def test_gpu_similarity_topk_full_size(n, b):
    gen = torch.Generator().manual_seed(n + 2)
    A = random_attention(b, n, n, generator=gen, dtype=torch.float32).cuda()
    values, idx = kernels.similarity_topk_triton(A, 50)
    S = reference.coneighbor_similarity(A.double())
    torch.testing.assert_close(values.double(), S.gather(-1, idx), rtol=s_err(n), atol=1e-5)
    check_top_columns(S, dense(torch.ones_like(values), idx), 50)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second CUDA GPU")
def test_gpu_tensors_on_a_device_that_is_not_current():
    """Triton launches on the current device: the wrappers make the tensors' one current."""
    gen = torch.Generator().manual_seed(5)
    A = random_attention(4, 576, 576, generator=gen, dtype=torch.float32)
    cams = torch.rand(4, 20, 576, generator=gen)
    on_0 = kernels.adcam_triton(A.cuda(0), cams.cuda(0), 50, 2)
    with torch.cuda.device(0):
        on_1 = kernels.adcam_triton(A.cuda(1), cams.cuda(1), 50, 2)
    assert on_1.device == torch.device("cuda", 1)
    torch.testing.assert_close(on_1.cpu(), on_0.cpu(), **W_TOL)


@pytest.mark.gpu
@pytest.mark.parametrize("n", [576, 2304])
def test_gpu_merge_schedules_agree(n):
    """On the GPU (real CTA barriers and caches, programs side by side), the merge schedules
    (whole tiles, narrow, parked; parked in two parts of the columns, whose programs must not
    share slots) on the default tiling, and the default with its registers capped (spills),
    keep bitwise the same columns."""
    gen = torch.Generator().manual_seed(n + 1)
    A = random_attention(4, n, n, generator=gen, dtype=torch.float32).cuda()
    default = coneighbor_topk.topk_configs(64)[0]
    variants = ({"narrow": 16}, {"slots": 128}, {"maxnreg": 168}, {"parts": 2, "slots": 128})
    schedules = [default, *(dataclasses.replace(default, **v) for v in variants)]
    outs = [coneighbor_topk.refine_sparse(A, 50, reference.EPS, config=c) for c in schedules]
    check_refinement(A, 50, *outs[0])
    for w, idx in outs[1:]:
        assert torch.equal(idx, outs[0][1]) and torch.equal(w, outs[0][0])


@pytest.mark.gpu
@pytest.mark.parametrize("n", [576, 1296, 2304])
def test_gpu_tma_candidates_agree(n):
    """Each candidate that takes R by the copy engine (TMA) gives bitwise the output of its
    config with pointer loads (and no register cap, a K loop per tile, each program's own
    column order and one program per row block); at N = 1296 the last K slice holds 16 of
    its 64 columns, the rest the copy engine's zeros. Each also passes the refinement check,
    so a tiling bug both variants share is caught."""
    gen = torch.Generator().manual_seed(n + 2)
    A = random_attention(4, n, n, generator=gen, dtype=torch.float32).cuda()
    for cfg in coneighbor_topk.topk_configs(64, aligned=True)[1]:
        loads = Config(cfg.block_m, cfg.block_n, cfg.block_k, cfg.num_warps, cfg.num_stages,
                       narrow=cfg.narrow)  # fmt: skip
        w, idx = coneighbor_topk.refine_sparse(A, 50, reference.EPS, config=cfg)
        w_ref, idx_ref = coneighbor_topk.refine_sparse(A, 50, reference.EPS, config=loads)
        assert torch.equal(idx, idx_ref) and torch.equal(w, w_ref), cfg
        assert check_refinement(A, 50, w, idx) > 0, cfg


@pytest.mark.gpu
@pytest.mark.parametrize("n", [576, 1000])
def test_gpu_warp_mma_candidates(n):
    """The tiles for a warp's mma.sync (`launch.warp_mma`: Ampere, Ada; they build on any
    GPU) pass the refinement check, at a size the copy engine could read and one it could
    not (N = 1000: the last K slice holds 40 of its 64 columns)."""
    gen = torch.Generator().manual_seed(n + 3)
    A = random_attention(4, n, n, generator=gen, dtype=torch.float32).cuda()
    for cfg in coneighbor_topk.topk_configs(64, warp_mma=True)[1]:
        w, idx = coneighbor_topk.refine_sparse(A, 50, reference.EPS, config=cfg)
        assert check_refinement(A, 50, w, idx) > 0, cfg


WS_CONFIGS = [
    Config(128, 128, 64, num_warps=8, num_stages=3, tma=True, ws=True),
    Config(128, 128, 64, num_warps=4, num_stages=4, tma=True, ws=True),
    Config(64, 128, 64, num_warps=4, num_stages=4, tma=True, ws=True),
    Config(128, 128, 64, num_warps=8, num_stages=3, tma=True, ws=True, parts=2),
    Config(128, 128, 64, num_warps=8, num_stages=4, tma=True, ws=True, parts=2),
    Config(128, 128, 64, num_warps=8, num_stages=3, tma=True, ws=True, lockstep=True),
    Config(128, 128, 64, num_warps=8, num_stages=4, tma=True, ws=True, lane_pairs=True),
    coneighbor_topk.WS_CANDIDATE,
    dataclasses.replace(coneighbor_topk.WS_CANDIDATE, mma_scales=True),
]


HOPPER_ONLY = pytest.mark.skipif(
    torch.cuda.is_available() and torch.cuda.get_device_capability()[0] != 9,
    reason="the warp-specialized kernel is built for Hopper (sm_90a) only",
)


@pytest.mark.gpu
@HOPPER_ONLY
@pytest.mark.parametrize("cfg", WS_CONFIGS, ids=str)
@pytest.mark.parametrize(("n", "b"), [(64, 3), (144, 2), (576, 4), (1296, 2), (2304, 3)])
def test_gpu_warp_specialized_kernel_agrees(cfg, n, b):
    """The Gluon kernel (copy warp, MMA warpgroup and merge warps side by side; in parts of
    the column tiles, or in lockstep; the merge warps in either layout) keeps bitwise the
    columns of the Triton kernel with the same tiling, pointer loads and one program per
    row block (the same S, one k16 MMA at a time in column order, and the same keys), and
    for TOP(S, k) bitwise its values; the refined weights agree to the rounding of their
    row sums, which the two kernels reduce in different register layouts. At N = 576 and
    1296 the last column tile holds 64 and 16 of its 128 columns, and at 1296 the last K
    slice 16 of its 64; at N = 64 (one column tile) one of two parts has none, as the
    autotuner meets it at small N."""
    gen = torch.Generator().manual_seed(n + b)
    A = random_attention(b, n, n, generator=gen, dtype=torch.float32).cuda()
    loads = Config(cfg.block_m, cfg.block_n, cfg.block_k, 8, 3)
    (w, idx), (w_ref, idx_ref) = (
        coneighbor_topk.refine_sparse(A, 50, reference.EPS, config=c) for c in (cfg, loads)
    )
    assert torch.equal(idx, idx_ref)
    torch.testing.assert_close(w, w_ref, **W_TOL)
    check_refinement(A, 50, w, idx)
    (s, idx), (s_ref, idx_ref) = (
        coneighbor_topk.similarity_topk(A, 7, torch.int32, config=c) for c in (cfg, loads)
    )
    assert torch.equal(idx, idx_ref) and torch.equal(s, s_ref)


@pytest.mark.gpu
def test_gpu_chunks_that_fill_waves(monkeypatch):
    """Past the memory cap (12 images at N = 2304), the batch goes in the chunks that
    `images_per_launch` plans for the build's occupancy (read once per build): bitwise the
    output of one image at a time."""
    monkeypatch.setattr(coneighbor_topk, "_RESIDENT", {})
    gen = torch.Generator().manual_seed(7)
    A = random_attention(14, 2304, 2304, generator=gen, dtype=torch.float32).cuda()
    w, idx = coneighbor_topk.refine_sparse(A, 50, reference.EPS)
    (resident,) = coneighbor_topk._RESIDENT.values()
    assert 1 <= resident <= 8, resident
    for i in range(len(A)):
        w_i, idx_i = coneighbor_topk.refine_sparse(A[i : i + 1], 50, reference.EPS)
        assert torch.equal(idx_i, idx[i : i + 1]) and torch.equal(w_i, w[i : i + 1]), i


@pytest.mark.gpu
@pytest.mark.parametrize("b", [1, 8])
def test_gpu_diffusion_split_is_one_walk(b):
    """At small batches the split candidates cut each image over programs (a launch per
    step); on the GPU, with real concurrency, every candidate's maps (split or not, sources
    a chunk ahead or not) are bitwise those of one walk."""
    from adcam_fast.kernels.diffusion import diffuse_sparse, diffusion_configs, split

    n, k, n_cls = 576, 50, 20
    w, idx, cams = hub_inputs(torch.Generator().manual_seed(b), b, n, k, n_cls)
    default, candidates = diffusion_configs(n_cls, cams.device)  # default: the split
    sms = launch.device_properties(cams.device).multi_processor_count
    assert split(default, b, n_cls, n * (k + 1), sms)[0] > 1
    one = diffuse_sparse(w, idx, cams, 2, config=dataclasses.replace(default, parts=1))
    for cfg in candidates:
        assert torch.equal(diffuse_sparse(w, idx, cams, 2, config=cfg), one), cfg


@pytest.mark.gpu
def test_gpu_autotuned_first_call(monkeypatch):
    """With autotuning on, the first call of a config key (every candidate timed on the
    real arguments, repeatedly) gives what the chosen configs give once cached, and that
    is the reference: the chosen top-k's refinement (its key takes no index dtype, so
    `refine_sparse_triton` reuses it) passes the refinement check, and the maps are its
    diffusion in float64."""
    monkeypatch.setenv("ADCAM_AUTOTUNE", "1")
    monkeypatch.setattr(launch, "_CACHE", {})
    gen = torch.Generator().manual_seed(3)
    A = random_attention(4, 576, 576, generator=gen, dtype=torch.float32).cuda()
    cams = torch.rand(4, 20, 576, generator=gen).cuda()
    first = kernels.adcam_triton(A, cams, 50, 2)
    assert len(launch.cached_configs()) == 2  # the top-k and the diffusion
    assert torch.equal(first, kernels.adcam_triton(A, cams, 50, 2))
    w, idx = kernels.refine_sparse_triton(A, 50)
    assert len(launch.cached_configs()) == 2  # the top-k's config, not a new autotuning
    assert check_refinement(A, 50, w, idx) > 0
    expected = reference.diffuse(dense(w, idx), cams.double(), 2)
    torch.testing.assert_close(first.double(), expected, **W_TOL)


@pytest.mark.gpu
def test_gpu_adcam_large_batch():
    gen = torch.Generator().manual_seed(1)
    b, n, k, n_cls = 128, 576, 50, 20
    A = random_attention(b, n, n, generator=gen, dtype=torch.float16).cuda()
    cams = torch.rand(b, n_cls, n, generator=gen).cuda()
    out = kernels.adcam_triton(A, cams, k, 2)
    w, idx = kernels.refine_sparse_triton(A, k)
    expected = reference.diffuse(dense(w, idx), cams.double(), 2)
    torch.testing.assert_close(out.double(), expected, **W_TOL)
    auto = adcam_fast.adcam(A, cams, k=k, steps=2, backend="auto")
    assert torch.equal(auto, out)


@pytest.mark.gpu
def test_gpu_deterministic():
    gen = torch.Generator().manual_seed(2)
    A = random_attention(16, 1296, 1296, generator=gen, dtype=torch.float32).cuda()
    cams = torch.rand(16, 20, 1296, generator=gen).cuda()
    first = kernels.refine_sparse_triton(A, 50), kernels.adcam_triton(A, cams, 50, 2)
    second = kernels.refine_sparse_triton(A, 50), kernels.adcam_triton(A, cams, 50, 2)
    assert torch.equal(first[0][0], second[0][0]) and torch.equal(first[0][1], second[0][1])
    assert torch.equal(first[1], second[1])


@pytest.mark.gpu
def test_gpu_memory_is_o_of_bnk():
    b, n, k, n_cls = 32, 2304, 50, 20
    gen = torch.Generator().manual_seed(3)
    A = random_attention(b, n, n, generator=gen, dtype=torch.float16).cuda()
    cams = torch.rand(b, n_cls, n, generator=gen).cuda()
    kernels.adcam_triton(A, cams, k, 2)  # compile outside the measurement
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    kernels.adcam_triton(A, cams, k, 2)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    dense_s = b * n * n * 4
    assert extra < dense_s / 2, (
        f"{extra / 2**20:.0f} MiB extra vs dense S {dense_s / 2**20:.0f} MiB"
    )
    assert extra < 96 * b * n * (k + 1) + 16 * b * n_cls * n


@pytest.mark.gpu
def test_gpu_cuda_graph_capture():
    """No host syncs or data-dependent host code: the whole op replays from a CUDA graph."""
    gen = torch.Generator().manual_seed(4)
    A = random_attention(8, 576, 576, generator=gen, dtype=torch.bfloat16).cuda()
    cams = torch.rand(8, 20, 576, generator=gen).cuda()
    eager = kernels.adcam_triton(A, cams, 50, 2)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        kernels.adcam_triton(A, cams, 50, 2)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = kernels.adcam_triton(A, cams, 50, 2)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)

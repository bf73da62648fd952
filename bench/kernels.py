"""AD-CAM on a GPU: the Triton kernels against the reference and the torch paths.

For each (N, B), with k, T = steps and K = classes fixed: median time (CUDA events, after a
warm-up, rotating over several input sets so that repeats do not run from L2) of

- ``reference``: the dense float64 spec (skipped when its float64 S would not fit the
  budget, and said so),
- ``torch``: ``ops.adcam_torch``, the sparse portable path,
- ``torch.compile``: the same under ``torch.compile(dynamic=True)``,
- ``triton``: ``kernels.adcam_triton`` (configs autotuned on first use), and the same
  calls replayed from CUDA graphs (``triton_graph``: without the host's work, whose part
  ``triton_host_ms`` gives),

the speed-up of triton (eager, and replayed) over the best torch path (the fastest of the
three eager torch paths above), the peak extra device memory of each, and for the similarity
stage alone (kernels 1+2 with their sqrt(A) pass, ``refine_sparse``): achieved TFLOP/s at
``2·B·N³`` flops next to a dense ``torch.bmm`` of the same shape and input precision (fp16
sqrt(A)) measured in the same run, the config the autotuner chose for it
(``similarity_config``), the time of its pass before the tiles (``take_root``: sqrt(A) and
its row scales; also in programs of other shapes, `ROOT_SHAPES`, and beside it a torch cast
of A to fp16, the same bytes, ``cast_ms``) and of the diffusion (kernel 3) alone and of its
CSR, each with its host part (``<stage>_host_ms``), and the time of every autotune candidate
of kernels 1+2 (tiling, merge schedule, column parts) and of the diffusion (class block,
whether an image is split over programs, and whether sources are loaded a chunk ahead), the
candidates of a stage timed in interleaved rounds (`time_rounds`). The attention is random
(softmax of noise); the similarity stage is also timed on spatial attention and on
block-diagonal attention that needs one merge per program, the stage's floor without merges
(kinds of bench/merge_model.py), each with every candidate too. Writes ``kernels.json``,
``kernels.csv`` and ``kernels.png`` (matplotlib permitting) under ``--out``, with GPU name,
its L2 size and SM count, versions and date, and the host's unit costs: one bare Triton
launch and one small torch op (microseconds), beside each row's count of torch ops per call
(``triton_torch_ops``), and the rate of reads from L2 (``l2_read_tbps``, `l2_read_kernel`),
the ceiling of the tile loop's operand loads.

    python bench/kernels.py [--out bench/results] [--sizes 576 1296 2304 4096]
                            [--batches 1 32 128] [--dtype fp32|fp16|bf16] [--budget-s 300]
                            [--topk-config FIELD=VALUE,... ...]
    python bench/kernels.py --smoke   # CPU: Triton interpreter, N = 64, B = 2
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from unittest import mock


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--sizes", type=int, nargs="+", default=[576, 1296, 2304, 4096])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32, 128])
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--classes", type=int, default=20)
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--budget-s", type=float, default=300.0,
                   help="after this many seconds, remaining sizes run triton only")  # fmt: skip
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile path")
    p.add_argument("--topk-config", action="append", default=[], metavar="FIELD=VALUE,...",
                   help="a top-k config to time beside the autotune candidates, as launch."
                   "Config's fields (e.g. block_m=64,block_n=256,block_k=64,narrow=32,tma=1);"
                   " repeatable")  # fmt: skip
    p.add_argument("--smoke", action="store_true", help="tiny CPU run under the interpreter")
    return p.parse_args()


ARGS = parse_args()
if ARGS.smoke:  # the interpreter must be chosen before triton is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from configs import topk_config  # noqa: E402
from merge_model import KINDS, attention  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from adcam_fast import ops, reference  # noqa: E402
from adcam_fast.kernels import adcam_triton, coneighbor_topk, csr, launch, root  # noqa: E402
from adcam_fast.kernels.coneighbor_topk import refine_sparse, topk_configs  # noqa: E402
from adcam_fast.kernels.diffusion import diffuse_sparse, diffusion_configs  # noqa: E402
from adcam_fast.kernels.launch import Config, next_pow2  # noqa: E402
from adcam_fast.kernels.root import take_root  # noqa: E402
from adcam_fast.reference import EPS  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
REFERENCE_BYTES = 8 * 2**30  # float64 S + Ã of the reference must fit in this
TORCH_PATHS = ("reference", "torch", "torch.compile")  # "best torch path": the fastest of these
ROOT_SHAPES = ((4096, 4), (8192, 8), (8192, 16), (2048, 8))
"""The sqrt pass's programs timed beside its own (``root_<entries>x<warps>_ms``): entries a
program holds at once (`root.ROOT_BLOCK`; a row of N > entries is read twice) and its
warps (`root.ROOT_WARPS`)."""


def topk_label(c: Config) -> str:
    """A top-k config's name in the results (``topk_<label>_ms``, ``floor_<label>_ms``)."""
    return (f"{c.block_m}x{c.block_n}x{c.block_k}_w{c.num_warps}"
            f"_s{c.num_stages}_slots{c.slots}_narrow{c.narrow}"
            + (f"_r{c.maxnreg}" if c.maxnreg else "") + ("_tma" if c.tma else "")
            + ("_flat" if c.flat else "") + ("_lockstep" if c.lockstep else "")
            + (f"_parts{c.parts}" if c.parts > 1 else "") + ("_ws" if c.ws else "")
            + ("_lanepairs" if c.lane_pairs else "")
            + ("_mmascales" if c.mma_scales else ""))  # fmt: skip


def tuned_config(A: torch.Tensor, k: int) -> Config:
    """The top-k config that ``refine_sparse(A, k)`` runs with (the autotuner's choice,
    cached by its first call; the default without a GPU or with autotuning off)."""
    chosen = []

    def recorded(*args, **kwargs) -> Config:
        chosen.append(launch.choose_config(*args, **kwargs))
        return chosen[-1]

    with mock.patch.object(coneighbor_topk, "choose_config", recorded):
        refine_sparse(A, k, EPS)
    return chosen[0]


def elapsed_ms(fn: Callable[[int], object], i: int, cuda: bool) -> float:
    """Milliseconds of the one call ``fn(i)``: CUDA events around it, or the host clock."""
    if not cuda:
        t0 = time.perf_counter()
        fn(i)
        return (time.perf_counter() - t0) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn(i)
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def time_rounds(
    fns: dict[str, Callable[[int], object]], repeats: int, cuda: bool, rounds: int = 5
) -> dict[str, float]:
    """Median milliseconds of each ``fn(i)`` over ``repeats`` calls after two warm-ups, the
    calls of all of them in ``rounds`` interleaved rounds (each a share of its repeats per
    round): a drift of the device's speed within the run (clocks, heat) falls on every fn
    alike, where timed one after another it would pass for a difference between them (in
    `gpu9`, the same call timed twice, minutes apart, differed by up to 1.18 times)."""
    for fn in fns.values():
        fn(0), fn(1)
    share = -(-repeats // rounds)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(rounds):
        for name, fn in fns.items():
            calls = range(r * share, min(repeats, (r + 1) * share))
            times[name] += [elapsed_ms(fn, i, cuda) for i in calls]
    return {name: statistics.median(t) for name, t in times.items()}


def time_ms(fn: Callable[[int], object], repeats: int, cuda: bool) -> float:
    """Median milliseconds of ``fn(i)`` over ``repeats`` calls after two warm-ups."""
    return time_rounds({"": fn}, repeats, cuda)[""]


def host_ms(fn: Callable[[int], object], repeats: int, cuda: bool) -> float:
    """Median milliseconds until ``fn(i)`` returns to the host, the device idle at each call:
    the host's part of a call (checks, Python, launches). Where it is close to the
    `time_ms` of the same call, the host, not the GPU, sets the pace."""
    times = []
    for i in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(i)
        times.append((time.perf_counter() - t0) * 1e3)
    if cuda:
        torch.cuda.synchronize()
    return statistics.median(times)


class CountOps(TorchDispatchMode):
    """Counts the aten ops dispatched inside the block (``count``): a call's torch ops, each
    a host dispatch (and most of them a kernel launch)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def host_unit_costs(device: str, repeats: int) -> dict[str, float]:
    """Host microseconds, the device idle, of one bare launch of a Triton kernel of ours
    (`edge_keys_kernel` over 16 edges) and of one small torch op (an in-place add): the
    units that ``triton_host_ms`` and the stages' host parts are made of, with the count of
    torch ops per call (``triton_torch_ops``) and the Triton launches (five per call when a
    batch is one chunk and an image one part). Under the interpreter these are not launch
    costs, and its own tensor copies add to the count."""
    cuda = device == "cuda"
    idx = torch.zeros(4, 3, dtype=torch.int32, device=device)
    key = torch.empty(16, dtype=torch.int32, device=device)
    x = torch.zeros(1, device=device)

    def launch(i: int) -> None:
        csr.edge_keys_kernel[(1,)](idx, key, 4, 3, 16, BLOCK=csr.BLOCK)

    launch(0)  # compiles
    return {
        "triton_launch_host_us": 1e3 * host_ms(launch, repeats, cuda),
        "torch_op_host_us": 1e3 * host_ms(lambda i: x.add_(1), repeats, cuda),
    }


@triton.jit
def l2_read_kernel(X, OUT, span, reps, BLOCK: tl.constexpr):
    """Each program reads its ``span`` fp16 entries of X (a multiple of BLOCK), ``reps``
    times over, through L2 only (``.cg``: not kept in L1), and stores their sum, so that no
    read is left out (in fp16, exact for sums of ones up to 2048; as few registers as the
    loads, which leaves more for loads in flight). Each pass starts a block further on (and
    ``reps`` is no constant), so that the compiler can neither hoist a load out of the loop
    nor merge two."""
    x = X + tl.program_id(0).to(tl.int64) * span + tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), tl.float16)
    for r in range(reps):
        for i in range(0, span, BLOCK):
            start = tl.multiple_of((i + r * BLOCK) % span, BLOCK)  # one block, contiguous
            acc += tl.load(x + start, cache_modifier=".cg")
    tl.store(OUT + tl.program_id(0) * BLOCK + tl.arange(0, BLOCK), acc.to(tl.float32))


def l2_read_tbps(props, repeats: int) -> float:
    """TB/s of reads that hit L2 (`l2_read_kernel`: 8 programs of 8 warps an SM, each 16 KiB
    of fp16 a step, over a buffer of at most half the L2, 128 times): a floor under the
    L2's rate (how many loads a warp keeps in flight limits it too), against which the tile
    loop's operand loads, most of which come from L2, are read. ``props``: the GPU's
    properties; None: a tiny run under the interpreter."""
    cuda = props is not None
    device = "cuda" if cuda else "cpu"
    if cuda:
        programs, block, reps = 8 * props.multi_processor_count, 8192, 128
        span = max(block, props.L2_cache_size // 4 // programs // block * block)
    else:
        programs, block, reps, span = 2, 64, 2, 128
    x = torch.ones(programs * span, dtype=torch.float16, device=device)
    out = torch.empty(programs * block, device=device)

    def read(i: int) -> None:
        l2_read_kernel[(programs,)](x, out, span, reps, BLOCK=block, num_warps=8)

    ms = time_ms(read, repeats, cuda)
    if not torch.all(out == reps * span // block):  # every entry was read, reps times
        raise RuntimeError("l2_read_kernel: wrong sum")
    return reps * x.numel() * x.element_size() / ms / 1e9


def graphed(fn: Callable[[int], object], sets: int) -> Callable[[int], object]:
    """``fn`` for each of the ``sets`` input sets captured in a CUDA graph (after a warm-up
    call, which caches the autotuned configs): ``i -> replay of set i % sets``, the call
    without host work. The captured calls' outputs stay allocated with their graphs."""
    graphs = []
    for i in range(sets):
        fn(i)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn(i)
        graphs.append(graph)
    return lambda i: graphs[i % sets].replay()


def peak_mib(fn: Callable[[], object], cuda: bool) -> float | None:
    """Peak device memory added while ``fn()`` runs (CUDA only), MiB."""
    if not cuda:
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def run_size(n: int, b: int, args: argparse.Namespace, device: str, slow_ok: bool) -> dict:
    """All measurements for one (N, B); prints and returns one result row."""
    cuda = device == "cuda"
    dtype = DTYPES[args.dtype]
    sets = 2 if b * n * n * dtype.itemsize > 2**30 else 4  # rotating input sets
    gen = torch.Generator(device=device).manual_seed(0)
    As = [attention(b, n, "random", gen, torch.float32).to(dtype) for _ in range(sets)]
    cams = [torch.rand(b, args.classes, n, device=device) for _ in range(sets)]
    k, steps = args.k, args.steps
    row: dict = {"N": n, "B": b, "k": k, "steps": steps, "K": args.classes, "dtype": args.dtype}
    notes = []

    paths: dict[str, Callable[[int], object]] = {
        "triton": lambda i: adcam_triton(As[i % sets], cams[i % sets], k, steps)
    }
    if slow_ok:
        paths["torch"] = lambda i: ops.adcam_torch(As[i % sets], cams[i % sets], k, steps)
        if cuda and not args.no_compile:
            compiled = torch.compile(ops.adcam_torch, dynamic=True)
            paths["torch.compile"] = lambda i: compiled(As[i % sets], cams[i % sets], k, steps)
        if 3 * b * n * n * 8 <= REFERENCE_BYTES:
            paths["reference"] = lambda i: reference.adcam(
                As[i % sets].double(), cams[i % sets].double(), k, steps
            )
        else:
            notes.append("reference skipped: float64 S would exceed 8 GiB")
    else:
        notes.append("torch paths skipped: time budget spent")

    for name, fn in paths.items():
        repeats = args.repeats if name != "reference" else max(3, args.repeats // 4)
        try:
            row[f"{name}_ms"] = time_ms(fn, repeats, cuda)
            row[f"{name}_peak_mib"] = peak_mib(lambda fn=fn: fn(0), cuda)
        except torch.OutOfMemoryError:
            notes.append(f"{name}: out of memory")
            torch.cuda.empty_cache()
    # How much of the triton path is host work: its host time alone, and the same calls
    # replayed from CUDA graphs (no host work at all; the kernels are graph-capturable).
    triton_path = paths["triton"]
    row["triton_host_ms"] = host_ms(triton_path, args.repeats, cuda)
    with CountOps() as ops_in_call:
        triton_path(0)
    row["triton_torch_ops"] = ops_in_call.count
    if cuda:
        try:
            row["triton_graph_ms"] = time_ms(graphed(triton_path, sets), args.repeats, cuda)
        except RuntimeError as e:  # a capture that fails is noted, the row kept
            notes.append(f"triton graph: {str(e)[:200]}")
    torch_ms = [row[f"{p}_ms"] for p in TORCH_PATHS if f"{p}_ms" in row]
    if torch_ms and "triton_ms" in row:
        row["speedup_vs_best_torch"] = min(torch_ms) / row["triton_ms"]
    if torch_ms and "triton_graph_ms" in row:
        row["graph_speedup_vs_best_torch"] = min(torch_ms) / row["triton_graph_ms"]

    def stage(name: str, fn: Callable[[int], object]) -> float:
        """Times one stage into the row: ``<name>_ms`` and its host part ``<name>_host_ms``."""
        row[f"{name}_host_ms"] = host_ms(fn, args.repeats, cuda)
        row[f"{name}_ms"] = time_ms(fn, args.repeats, cuda)
        return row[f"{name}_ms"]

    # The similarity stage alone (kernels 1+2), against a dense bmm of the same shape; and
    # its parts: the pass before the tiles (sqrt(A) and its row scales), and the diffusion
    # after it, with the sort that makes its CSR timed apart too.
    flops = 2 * b * n**3
    sim_ms = stage("similarity", lambda i: refine_sparse(As[i % sets], k, EPS))
    row["similarity_config"] = topk_label(tuned_config(As[0], k))
    row["similarity_tflops"] = flops / sim_ms / 1e9
    r_buf = torch.empty(As[0].shape, dtype=torch.float16, device=device)
    if b * n * n > coneighbor_topk.ROOT_CHUNK:  # in chunks of images: with 4 times larger
        # ones (fewer, fuller launches, against 4 times the memory for sqrt(A)), and with
        # chunks of the memory cap instead of those that fill whole waves
        chunk4x = 4 * coneighbor_topk.ROOT_CHUNK

        def at_cap(b: int, cap: int, programs: int, slots: int) -> int:
            return cap

        for label, patch in [
            ("chunk4x", mock.patch.object(coneighbor_topk, "ROOT_CHUNK", chunk4x)),
            ("cap_chunks", mock.patch.object(coneighbor_topk, "images_per_launch", at_cap)),
        ]:
            with patch:
                row[f"similarity_{label}_ms"] = time_ms(
                    lambda i: refine_sparse(As[i % sets], k, EPS), args.repeats, cuda
                )
    exponents = torch.empty(As[0].shape[:-1], dtype=torch.int32, device=device)

    def root_pass(i: int) -> None:  # into the buffers while they are held (freed below)
        take_root(As[i % sets], r_buf, exponents)

    stage("root", root_pass)
    row["cast_ms"] = time_ms(lambda i: r_buf.copy_(As[i % sets]), args.repeats, cuda)
    for block, warps in ROOT_SHAPES:  # the pass in programs of other shapes (entries, warps)
        with mock.patch.multiple(root, ROOT_BLOCK=block, ROOT_WARPS=warps):
            row[f"root_{block}x{warps}_ms"] = time_ms(root_pass, args.repeats, cuda)
    r_buf = exponents = None
    w, idx = refine_sparse(As[0], k, EPS, torch.int32)
    stage("diffusion", lambda i: diffuse_sparse(w, idx, cams[i % sets], steps))
    stage("csr", lambda i: csr.csr_edges(w, idx))
    if cuda:
        R = [a.sqrt().half() for a in As]  # the kernel's dot reads sqrt(A) in fp16
        bmm_ms = time_ms(lambda i: torch.bmm(R[i % sets], R[i % sets].mT), args.repeats, True)
        row["bmm_ms"] = bmm_ms
        row["bmm_tflops"] = flops / bmm_ms / 1e9
        del R
    # Every autotune candidate, so that a run shows which tiling and merge schedule wins, and
    # the configs asked for (--topk-config; those with tma where N allows it, with ws on
    # Hopper).
    hopper = launch.can_warp_specialize(As[0].device)
    warp_mma = launch.warp_mma(As[0].device)
    candidates = {
        topk_label(c): c
        for aligned in ((False, True) if coneighbor_topk.tma_fits(n) else (False,))
        for c in topk_configs(next_pow2(k), aligned, hopper, warp_mma)[1]
    }
    for c in args.topk_config:
        if (coneighbor_topk.tma_fits(n) or not c.tma) and (hopper or not c.ws):
            try:  # one that cannot be built here is named in the notes, not timed
                refine_sparse(As[0], k, EPS, config=c)
            except launch.build_errors() as e:
                notes.append(f"--topk-config {topk_label(c)} not built: {str(e)[:200]}")
                continue
            candidates[topk_label(c)] = c

    def each_candidate(prefix: str, inputs: list[torch.Tensor]) -> dict[str, float]:
        """Every candidate's time on ``inputs`` (in turn), as ``<prefix>_<label>_ms``."""
        runs = {
            f"{prefix}_{label}_ms": lambda i, cfg=cfg: refine_sparse(
                inputs[i % len(inputs)], k, EPS, config=cfg
            )
            for label, cfg in candidates.items()
        }
        return time_rounds(runs, args.repeats, cuda)

    row.update(each_candidate("topk", As))
    # The stage on the other kinds of attention, with the config tuned above and with every
    # candidate: spatial, as real attention is (``spatial_<label>_ms``: which tiling would a
    # user's first call choose), and blocks, whose rows find their k best in their first
    # tile, so that a program merges once: the stage without its merges, its floor
    # (``floor_<label>_ms``). Timed against the random rows above, they split the stage into
    # its merges and the rest (the dot and the loads that feed it).
    for kind, prefix in zip(KINDS[1:], ("spatial", "floor"), strict=True):
        try:
            other = [attention(b, n, kind, gen, torch.float32).to(dtype) for _ in range(2)]
            row[f"similarity_{kind}_ms"] = time_ms(
                lambda i, other=other: refine_sparse(other[i % 2], k, EPS), args.repeats, cuda
            )
            row.update(each_candidate(prefix, other))
        except ValueError as e:  # a kind this N cannot have (spatial: N a square)
            notes.append(f"{kind} attention skipped: {e}")
        except torch.OutOfMemoryError:  # the row keeps what it measured
            notes.append(f"{kind} attention: out of memory")
        other = None  # freed before the next kind's inputs are made
    # And every diffusion candidate (class block and warps; parts 1: one program per image
    # and class block, 0: split to fill the GPU; sources loaded a chunk ahead or not).
    walks = {}
    for cfg in diffusion_configs(args.classes, torch.device(device))[1]:
        label = (f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k}_w{cfg.num_warps}_parts{cfg.parts}"
                 + ("_prefetch" if cfg.prefetch else "")
                 + (f"_r{cfg.maxnreg}" if cfg.maxnreg else ""))  # fmt: skip
        walks[f"diffusion_{label}_ms"] = lambda i, cfg=cfg: diffuse_sparse(
            w, idx, cams[i % sets], steps, config=cfg
        )
    row.update(time_rounds(walks, args.repeats, cuda))
    row["notes"] = "; ".join(notes)
    shown = {key: round(v, 3) if isinstance(v, float) else v for key, v in row.items()}
    print(json.dumps(shown), flush=True)
    return row


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not importable: no plot written")
        return
    batches = sorted({r["B"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4), squeeze=False)
    for ax, b in zip(axes[0], batches, strict=True):
        sub = sorted((r for r in rows if r["B"] == b), key=lambda r: r["N"])
        for name in ("reference", "torch", "torch.compile", "triton"):
            pts = [(r["N"], r[f"{name}_ms"]) for r in sub if f"{name}_ms" in r]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=name)
        ax.set(title=f"B = {b}", xlabel="N", ylabel="ms (median)", yscale="log")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    args = ARGS
    args.topk_config = [topk_config(text, next_pow2(args.k)) for text in args.topk_config]
    cuda = torch.cuda.is_available()
    if args.smoke:
        args.sizes, args.batches, args.repeats = [64], [2], 3
    elif not cuda:
        sys.exit("no CUDA GPU: run with --smoke for the CPU (interpreter) smoke configuration")
    device = "cuda" if cuda else "cpu"
    props = torch.cuda.get_device_properties(device) if cuda else None
    meta = {
        "device": torch.cuda.get_device_name() if cuda else "cpu (Triton interpreter)",
        "l2_mib": getattr(props, "L2_cache_size", 0) / 2**20 if props else None,
        "sms": props.multi_processor_count if props else None,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv[1:],
        "time": "median ms over repeats, CUDA events (CPU: perf_counter)",
        "similarity_tflops": "2·B·N³ / time of coneighbor_topk.refine_sparse (kernels 1+2)",
        **host_unit_costs(device, args.repeats),
        "l2_read_tbps": l2_read_tbps(props, args.repeats),
    }
    print(json.dumps(meta), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    start, rows = time.monotonic(), []
    # Largest batches first: the goal rows (B = 128) get the torch paths within the budget,
    # and the first autotuning and compiles happen at a representative size.
    for b in sorted(args.batches, reverse=True):
        for n in args.sizes:
            slow_ok = time.monotonic() - start < args.budget_s
            try:
                rows.append(run_size(n, b, args, device, slow_ok))
            except torch.OutOfMemoryError:
                print(json.dumps({"N": n, "B": b, "notes": "out of memory"}), flush=True)
                rows.append({"N": n, "B": b, "notes": "out of memory"})
                torch.cuda.empty_cache()
            save(meta, rows, args.out)  # after every row: a run cut short keeps what it measured
    plot(rows, args.out / "kernels.png")
    print(f"wrote {args.out / 'kernels.json'} and {args.out / 'kernels.csv'}")
    print(table(rows, meta["device"]))


def table(rows: list[dict], device: str) -> str:
    """A short Markdown table of the rows: times, speed-up, the S stage (rate, and time per
    attention kind), the config the autotuner chose, and the fastest on random and on spatial
    attention."""
    head = ["N", "B", "triton ms", "host ms", "graph ms", "best torch ms", "speed-up",
            "graph speed-up", "S TFLOP/s", "bmm TFLOP/s",
            "S ms", "S spatial ms", "S floor ms", "root ms", "diffusion ms",
            "tuned top-k config", "fastest top-k config", "fastest on spatial"]  # fmt: skip
    lines = [device, "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        torch_ms = [r[f"{p}_ms"] for p in TORCH_PATHS if f"{p}_ms" in r]
        fastest = [
            min(times, key=times.get) if times else None
            for times in (
                {key[len(p) : -3]: v for key, v in r.items() if key.startswith(p)}
                for p in ("topk_", "spatial_")
            )
        ]
        cells = [r["N"], r["B"], r.get("triton_ms"), r.get("triton_host_ms"),
                 r.get("triton_graph_ms"), min(torch_ms, default=None),
                 r.get("speedup_vs_best_torch"), r.get("graph_speedup_vs_best_torch"),
                 r.get("similarity_tflops"), r.get("bmm_tflops"),
                 r.get("similarity_ms"), r.get("similarity_spatial_ms"),
                 r.get("similarity_blocks_ms"), r.get("root_ms"), r.get("diffusion_ms"),
                 r.get("similarity_config"), *fastest]  # fmt: skip
        shown = [
            f"{c:.3g}" if isinstance(c, float) else "-" if c is None else str(c) for c in cells
        ]
        lines.append("| " + " | ".join(shown) + " |")
    return "\n".join(lines)


def save(meta: dict, rows: list[dict], out: Path) -> None:
    """``kernels.json`` (meta and rows) and ``kernels.csv`` (rows) under ``out``."""
    (out / "kernels.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    fields = sorted({key for r in rows for key in r}, key=lambda f: (f not in ("N", "B"), f))
    with open(out / "kernels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()

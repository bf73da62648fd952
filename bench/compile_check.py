"""Compile the Triton kernels for a GPU without one and report their resources.

Each kernel configuration (and the warp-specialized Gluon kernel's candidate, through
Gluon's source, with the Triton releases whose Gluon builds it: ``launch.GLUON_RELEASES``)
is compiled by ``triton.compile`` for a CUDA target (Hopper, sm_90a, unless ``--arch``
says another), and the PTX is assembled by the ``ptxas`` that ships with Triton and that
Triton takes for the target: registers, spill stores, shared memory (a build that takes
more than a program of the target may fails), which MMA the S tile uses (wgmma, tcgen05 or
mma.sync), how operands arrive (the copy engine, TMA; ``cp.async``; or plain loads), and
the number of SASS instructions (nvdisasm, also shipped with Triton), a static size of the
code. This is the evidence a CPU-only machine can give that the kernels build for the GPU
(the interpreter tests run them, but never compile them). It also checks that the
diffusion's launches specialize alike whatever the class count (`class_count_variants`),
so that a batch of new class counts compiles nothing.

    python bench/compile_check.py            # every default and autotune candidate (minutes)
    python bench/compile_check.py --quick    # the default configurations (seconds)
    python bench/compile_check.py --arch 80  # for an A100 (the configs that launch.warp_mma
                                             # picks there), 86 and 89 (Ampere, Ada), 100, 120

Must run without ``TRITON_INTERPRET`` (interpreted kernels cannot be compiled). Prints one
line per configuration and check, and exits non-zero if any fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Sequence

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("compile_check: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)")

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.compiler.compiler import make_backend
from triton.runtime.jit import create_function_from_signature

from adcam_fast.kernels import csr, diffusion, launch
from adcam_fast.kernels.coneighbor_topk import (
    MERGE_ENTRIES,
    WS_CANDIDATE,
    coneighbor_topk_kernel,
    merge_parts_kernel,
    topk_configs,
    topk_constants,
)
from adcam_fast.kernels.diffusion import diffusion_configs, diffusion_constants, diffusion_kernel
from adcam_fast.kernels.launch import Config
from adcam_fast.kernels.root import ROOT_BLOCK, ROOT_WARPS, root_kernel, root_shape

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")

SHARED_LIMIT = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448,
                120: 101376}  # fmt: skip
"""The most shared memory one program may take, by compute capability (×10): 163, 99 or
227 KiB (CUDA C++ Programming Guide, technical specifications per compute capability)."""


def gpu_name(arch: int) -> str:
    """ptxas's name of the target: with the ``a`` suffix from 9.0 on, whose wgmma, setmaxnreg
    and tcgen05 only the architecture-specific targets have."""
    return f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"


@functools.cache
def ptxas(arch: int) -> str:
    """The ptxas that Triton assembles code for ``arch`` with: 3.9 takes its newer
    ``ptxas-blackwell`` for Hopper too (its PTX is too new for the other), and 3.4 and 3.5
    choose without the architecture."""
    from triton.backends.nvidia import compiler

    try:
        return compiler.get_ptxas(arch).path
    except TypeError:
        return compiler.get_ptxas().path


def resources(ptx: str, arch: int) -> dict[str, int]:
    """Registers and spill-store bytes per thread, as ptxas reports them for ``arch``."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        out = subprocess.run(
            [ptxas(arch), "--gpu-name", gpu_name(arch), "-v", f.name, "-o", os.devnull],
            capture_output=True, text=True, check=True,
        ).stderr  # fmt: skip
    regs = re.search(r"Used (\d+) registers", out)
    spill = re.search(r"(\d+) bytes spill stores", out)
    return dict(
        registers=int(regs.group(1)) if regs else -1, spill=int(spill.group(1)) if spill else 0
    )


def sass_instructions(cubin: bytes) -> int:
    """Instructions in the SASS of a cubin (Triton's nvdisasm; -1 without it): a static size
    of the code, which the unrolled top-k networks dominate."""
    nvdisasm = os.path.join(BIN, "nvdisasm")
    if not os.path.exists(nvdisasm):
        return -1
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True).stdout
    return len(re.findall(r"^\s+/\*[0-9a-f]{4,}\*/\s+\S", sass, re.M))


DIVISIBLE = {"N", "NN", "E", "span"}
"""Integer arguments that are multiples of 16 at the usual sizes (N = 144, 576, 1296, 2304,
4096): Triton's launcher specializes them, and every pointer to a torch tensor, as
16-divisible, which lets loads be vectorized and software-pipelined. The builds here
assume the same (``span``, the diffusion's edges per program, is a multiple of its chunk)."""


def compile_one(
    arch: int,
    label: str,
    fn,
    sig: dict,
    constants: dict,
    cfg: Config,
    options: dict | None = None,
    source: type = ASTSource,
) -> bool:
    """Builds ``fn`` for ``arch`` from its ``source`` (a Gluon kernel's is Gluon's) with
    ``options`` (None: ``cfg.launch_options()``; a Gluon kernel needs its own) and prints
    its resources; False if the build fails or takes more shared memory than a program of
    ``arch`` may."""
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, (name, kind) in enumerate(sig.items())
        if kind.startswith("*") or name in DIVISIBLE
    }
    try:
        kernel = triton.compile(
            source(fn, sig, constants, attrs),
            target=GPUTarget("cuda", arch, 32),
            options=options or cfg.launch_options(),
        )
    except Exception as e:  # report every failure, then go on with the next configuration
        print(f"FAIL {label}: {type(e).__name__}: {str(e)[:500]}")
        return False
    ptx = kernel.asm["ptx"]
    r = resources(ptx, arch)
    mma = next((m for m in ("wgmma", "tcgen05", "mma.sync") if m in ptx), "none")
    copy = "tma" if "cp.async.bulk.tensor" in ptx else "cp.async" if "cp.async" in ptx else "ld"
    fits = kernel.metadata.shared <= SHARED_LIMIT[arch]
    print(
        f"{'OK  ' if fits else 'FAIL'} {label}: warps={cfg.num_warps} stages={cfg.num_stages} "
        f"shared={kernel.metadata.shared} registers={r['registers']} spill={r['spill']} mma={mma} "
        f"loads={copy} sass={sass_instructions(kernel.asm['cubin'])}"
        + ("" if fits else f" (over the {SHARED_LIMIT[arch]} bytes of shared memory)")
    )
    return fits


def signature(fn, **types: str) -> dict[str, str]:
    """``fn``'s parameters in order, for ``ASTSource``: each typed as in ``types`` (a pointer
    passed as None is "constexpr"), its constexpr parameters "constexpr"."""
    missing = [p.name for p in fn.params if not p.is_constexpr and p.name not in types]
    if missing:
        raise ValueError(f"no type for {fn.__name__}'s {', '.join(missing)}")
    return {p.name: types.get(p.name, "constexpr") for p in fn.params}


def _unique(default: Config, candidates: Sequence[Config]) -> list[Config]:
    return list(dict.fromkeys([default, *candidates]))


def topk_jobs(quick: bool, warp_mma: bool):
    """The top-k kernel's builds: every default and candidate, or (``quick``) the defaults at
    kp = 64 for fp16 and fp32 attention and at kp = 1 and 128 for fp32 (the network's other
    shapes: one entry kept, and a row's columns split over warps); those of a GPU whose
    ``tl.dot`` is ``mma.sync`` (``warp_mma``) or of one whose is not."""
    dtypes = ["fp16", "fp32"]
    if not quick:
        dtypes.append("bf16")
    for name in dtypes:
        kps = ((1, 64, 128) if name == "fp32" else (64,)) if quick else (1, 64, 128, 256, 1024)
        for kp in kps:
            default, candidates = topk_configs(kp, warp_mma=warp_mma)
            aligned_default, aligned = topk_configs(kp, aligned=True, warp_mma=warp_mma)
            defaults = _unique(default, [aligned_default])  # N not divisible by 8, and N that is
            for cfg in defaults if quick else _unique(default, candidates + aligned):
                # The refinement epilogue; and for the defaults, TOP(S, k) alone (full sweep).
                for refine in (True,) if quick or cfg not in defaults else (True, False):
                    rm, rn = (
                        f"tensordesc<fp16[{rows}, {cfg.block_k}]>" if cfg.tma else "constexpr"
                        for rows in (cfg.block_m, cfg.block_n)
                    )
                    parts = cfg.parts > 1
                    sig = signature(
                        coneighbor_topk_kernel, R="*fp16", RM=rm, RN=rn, A=f"*{name}",
                        EXP="*i32", BUF="*i32", W="*fp32", IDX="*i32",
                        KEYS="*i32" if parts else "constexpr", N="i32", C="i32", K_KEEP="i32",
                        eps="fp32",
                    )  # fmt: skip
                    constants = topk_constants(kp, cfg, refine)
                    if not cfg.tma:
                        constants |= dict(RM=None, RN=None)
                    if not parts:
                        constants["KEYS"] = None
                    label = f"topk {name} kp={kp} {cfg}" + ("" if refine else " TOP(S,k)")
                    yield label, coneighbor_topk_kernel, sig, constants, cfg


def ws_jobs():
    """The warp-specialized kernel's candidate (Gluon), fp32 attention, kp = 64, and its
    twin whose MMA warpgroup scales each tile by the keys' powers of two (``mma_scales``)."""
    from triton.experimental.gluon._runtime import GluonASTSource

    from adcam_fast.kernels import coneighbor_topk_ws as ws

    kernel = ws.coneighbor_topk_ws_kernel
    for cfg in (WS_CANDIDATE, dataclasses.replace(WS_CANDIDATE, mma_scales=True)):
        rm, rn = (
            f"tensordesc<fp16[{rows}, {cfg.block_k}],{ws.operand_layout(rows, cfg.block_k)!r}>"
            for rows in (cfg.block_m, cfg.block_n)
        )
        sig = signature(
            kernel, RM=rm, RN=rn, A="*fp32", EXP="*i32", W="*fp32", IDX="*i32", KEYS="*i32",
            N="i32", C="i32", K_KEEP="i32", eps="fp32",
        )  # fmt: skip
        constants = ws.ws_constants(cfg, topk_constants(64, cfg, refine=True))
        options = ws.launch_options(cfg)
        yield f"topk-ws fp32 kp=64 {cfg}", kernel, sig, constants, cfg, options, GluonASTSource


def merge_parts_jobs(warp_mma: bool):
    """`merge_parts_kernel` for the parts of the kp <= 64 candidates (fp32 attention)."""
    candidates = topk_configs(64, aligned=True, warp_mma=warp_mma)[1]
    for parts in sorted({c.parts for c in candidates if c.parts > 1}):
        sig = signature(
            merge_parts_kernel, KEYS="*i32", A="*fp32", EXP="*i32", W="*fp32", IDX="*i32",
            N="i32", C="i32", K_KEEP="i32", eps="fp32",
        )  # fmt: skip
        constants = dict(LOG_KP=6, BLOCK_M=MERGE_ENTRIES // 64, PARTS=parts, REFINE=True)
        yield f"merge parts={parts} kp=64", merge_parts_kernel, sig, constants, Config()


def diffusion_jobs(quick: bool):
    default, candidates = diffusion_configs(20, torch.device("cuda"))
    for cfg in [default] if quick else _unique(default, candidates):
        sig = signature(
            diffusion_kernel, SCR="*fp32", OUT="*fp32", SRC="*i32", DST="*i32", WGT="*fp32",
            WALK="constexpr" if cfg.parts == 1 else "*i32", N="i32", K="i32", KB="i32",
            E="i32", span="i32", step0="i32", steps="i32", last="i32",
        )  # fmt: skip
        constants = diffusion_constants(cfg) | ({"WALK": None} if cfg.parts == 1 else {})
        yield f"diffusion {cfg}", diffusion_kernel, sig, constants, cfg


def root_jobs():
    cfg = Config(num_warps=ROOT_WARPS)
    for name in ("fp32", "fp16"):
        sig = signature(root_kernel, A=f"*{name}", R="*fp16", EXP="*i32", N="i32")
        # 4 whole rows a program (N = 576: 512 + 64 columns), 1 (N = 2304: 2048 + 256), 1 in
        # blocks (N > ROOT_BLOCK)
        for n in (576, 2304, 2 * ROOT_BLOCK):
            constants = root_shape(n)
            yield f"root {name} N={n} whole={constants['WHOLE']}", root_kernel, sig, constants, cfg


def csr_jobs():
    keys = signature(csr.edge_keys_kernel, IDX="*i32", KEY="*i32", N="i32", R="i32", EDGES="i32")
    yield "csr keys", csr.edge_keys_kernel, keys, dict(BLOCK=csr.BLOCK), Config()
    arrays = signature(
        csr.edge_arrays_kernel, POS="*i64", KEY="*i32", W="*fp32", SRC="*i32", DST="*i32",
        WGT="*fp32", N="i32", R="i32", EDGES="i32",
    )  # fmt: skip
    yield "csr arrays", csr.edge_arrays_kernel, arrays, dict(BLOCK=csr.BLOCK), Config()


def class_count_variants(arch: int, batch: int = 32, n: int = 576, k: int = 50) -> tuple[int, int]:
    """Launch specializations of `diffusion_kernel` under its default config, over class
    counts K = 1..64 and for K = 20 alone (B = 32, N = 576, k = 50, T = 2, an H200's 132
    SMs), as `diffuse_sparse` launches it and Triton's launcher forms them for ``arch``:
    integer arguments equal to 1 or divisible by 16 are specialized, and each distinct
    specialization is a compile at run time. A batch's class count depends on its images,
    so it must add none: the two counts must be equal."""
    kernel = diffusion_kernel
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    f32, i32 = torch.empty(16, dtype=torch.float32), torch.empty(16, dtype=torch.int32)
    cfg = diffusion_configs(20, torch.device("cuda"))[0]
    constants = diffusion_constants(cfg)
    edges, steps = n * (k + 1), 2

    def variants(n_cls: int) -> set[str]:
        kb = triton.cdiv(n_cls, cfg.block_m)
        parts, span = diffusion.split(cfg, batch, n_cls, edges, sms=132)
        walk = None if parts == 1 else i32
        launches = [(0, steps)] if parts == 1 else [(t, 1) for t in range(steps)]
        return {
            str(binder(f32, f32, i32, i32, f32, walk, n, n_cls, kb, edges, span, step0,
                       n_steps, steps - 1, **constants)[1])
            for step0, n_steps in launches
        }  # fmt: skip

    return len(set().union(*map(variants, range(1, 65)))), len(variants(20))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="default configurations only")
    p.add_argument("--arch", type=int, default=90, choices=sorted(SHARED_LIMIT),
                   help="compute capability ×10 of the target (default 90: sm_90a)")  # fmt: skip
    args = p.parse_args()
    arch = args.arch
    warp_mma = arch // 10 in launch.WARP_MMA_MAJORS
    gluon = launch.gluon_builds(triton.__version__) and arch == 90
    jobs = [*root_jobs(), *topk_jobs(args.quick, warp_mma), *(ws_jobs() if gluon else []),
            *merge_parts_jobs(warp_mma), *csr_jobs(), *diffusion_jobs(args.quick)]  # fmt: skip
    if arch != 90:
        print("SKIP topk-ws: the warp-specialized kernel is built for sm_90a only")
    elif not gluon:
        first, last = (".".join(map(str, r)) for r in launch.GLUON_RELEASES)
        print(f"SKIP topk-ws: Gluon builds it with Triton {first} to {last}, "
              f"not {triton.__version__}")  # fmt: skip
    ok = [compile_one(arch, *job) for job in jobs]
    variants, one_count = class_count_variants(arch)
    ok.append(variants == one_count)
    print(f"{'OK  ' if ok[-1] else 'FAIL'} diffusion: {variants} launch specialization(s) "
          f"over class counts 1..64, {one_count} for one")  # fmt: skip
    print(f"{sum(ok)} of {len(ok)} checks passed for {gpu_name(arch)} "
          f"(triton {triton.__version__})")  # fmt: skip
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Launch helpers shared by the Triton kernels: device checks, shape buckets, config choice.

Where the kernels may run:

- CUDA tensors: Triton compiles the kernels for the GPU (compute capability >= 8.0, for
  tensor-core ``tl.dot`` in fp16).
- CPU tensors: only through Triton's interpreter, i.e. with ``TRITON_INTERPRET=1`` set before
  ``adcam_fast.kernels`` is first imported (the kernels are built in that mode at import).

Either way with Triton ``TRITON_LEAST`` or newer; the warp-specialized kernel (Gluon) only
with the releases of ``GLUON_RELEASES`` (`unusable` says why the kernels cannot run).

Config choice: each kernel has a heuristic default and a short list of candidates. On a GPU,
the first call for a given (kernel, N bucket, k bucket, batch bucket, dtype, device; a
bucket is the next power of two: the batch sets how many programs fill the GPU) times the
candidates with ``triton.testing.do_bench`` (a host sync; do it before CUDA-graph capture)
and caches the fastest; ``ADCAM_AUTOTUNE=0`` disables timing and always uses the default.
Under the interpreter the default is used.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor

HELP = 'use backend="torch" for the portable path'

TRITON_LEAST = (3, 4)
"""The oldest Triton release the kernels build with: the first with host TMA descriptors
(``triton.tools.tensor_descriptor``). The kernels' default builds compile for sm_90a with
3.4 to 3.9 (bench/compile_check.py --quick); the interpreter tests pass with 3.7 to 3.9,
and 3.6 under numpy < 2 (tests/test_kernels.py says why not earlier); the GPU tests ran with
3.6."""

GRID_Y = 65535
"""The most programs a CUDA grid takes along its second (and third) axis: launches that put
images there take at most this many at a time."""

GLUON_RELEASES = ((3, 6), (3, 9))
"""The first and last Triton release whose Gluon builds the warp-specialized kernel
(`coneighbor_topk_ws`; bench/compile_check.py). Gluon is experimental and moves between
releases: 3.4 has no ``warpgroup_mma`` and 3.5's ``warp_specialize`` takes other
arguments; 3.9 needed the copy engine's load by its new name and one more reshape in
`bitonic.topk_desc`. Under any other release the autotuner keeps to the Triton
kernels."""


@dataclass(frozen=True)
class Config:
    """Block sizes, merge schedule, operand loads and loops (top-k kernel: ``slots``,
    ``narrow``, ``tma``; ``flat``, one loop over (tile, K step); ``lockstep``, one column
    order for all programs; ``parts``, programs per row block, 0 or 1 for one; ``ws``, the
    warp-specialized Gluon kernel, `coneighbor_topk_ws`, ``lane_pairs``, its merge warps
    holding a tile row on two lanes instead of four, and ``mma_scales``, its MMA warpgroup
    scaling each tile by the keys' powers of two instead of its merge warps), programs
    per image and class block and loads (diffusion: ``parts``, 0 to fill the GPU;
    ``prefetch``, sources a chunk ahead) and launch options of one kernel variant (unused
    fields are 0; ``maxnreg`` 0 leaves the registers to ptxas; ``num_stages`` defaults to
    Triton's own CUDA default, so that a kernel launched without it builds as its Config
    says)."""

    block_m: int = 0
    block_n: int = 0
    block_k: int = 0
    num_warps: int = 4
    num_stages: int = 3
    slots: int = 0
    narrow: int = 0
    parts: int = 0
    maxnreg: int = 0
    tma: bool = False
    flat: bool = False
    lockstep: bool = False
    prefetch: bool = False
    ws: bool = False
    lane_pairs: bool = False
    mma_scales: bool = False

    def launch_options(self) -> dict[str, int]:
        """Triton's launch (and compile) options of this variant."""
        options = dict(num_warps=self.num_warps, num_stages=self.num_stages)
        return options | ({"maxnreg": self.maxnreg} if self.maxnreg else {})


def next_pow2(n: int) -> int:
    """The smallest power of two >= max(n, 1)."""
    return 1 << max(n - 1, 0).bit_length()


def n_bucket(n: int) -> int:
    """The bucket of a size in the config cache: the next power of two, at least 64."""
    return max(64, next_pow2(n))


@functools.cache
def release(version: str) -> tuple[int, int]:
    """(major, minor) of a version string: "3.6.0" and "3.6.0+git1a2b3c" give (3, 6)."""
    found = re.match(r"(\d+)\.(\d+)", version)
    if found is None:
        raise ValueError(f"not a version: {version!r}")
    return int(found[1]), int(found[2])


@functools.cache
def triton_version() -> str | None:
    """The installed Triton's version, None if it cannot be imported (looked up once: every
    call of the kernels asks)."""
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def gluon_builds(version: str) -> bool:
    """Whether Triton ``version``'s Gluon builds the warp-specialized kernel
    (`GLUON_RELEASES`)."""
    return GLUON_RELEASES[0] <= release(version) <= GLUON_RELEASES[1]


def _triton_problem() -> str | None:
    """Why no kernel can be built with the installed Triton, None if they can."""
    version = triton_version()
    if version is None:
        return "triton is not installed"
    if release(version) < TRITON_LEAST:
        least = ".".join(map(str, TRITON_LEAST))
        return f"triton {version} is older than {least}, the oldest the kernels build with"
    return None


def interpreting() -> bool:
    """Whether the kernels were built for Triton's CPU interpreter (``TRITON_INTERPRET=1``
    was set when ``adcam_fast.kernels`` was imported)."""
    from triton.runtime.interpreter import InterpretedFunction

    from adcam_fast.kernels.coneighbor_topk import coneighbor_topk_kernel

    return isinstance(coneighbor_topk_kernel, InterpretedFunction)


@functools.cache
def _properties(index: int):
    return torch.cuda.get_device_properties(index)


def _index(device: torch.device | None) -> int:
    """The index of a CUDA ``device`` (None, or no index: the current one)."""
    index = None if device is None else device.index
    return torch.cuda.current_device() if index is None else index


def device_properties(device: torch.device | None = None):
    """The properties of a CUDA ``device`` (None, or no index: the current one), queried once
    per process: the launchers read its capability, name and SM count on every call."""
    return _properties(_index(device))


def can_warp_specialize(device: torch.device) -> bool:
    """Whether the warp-specialized kernel can run on ``device``: a Hopper GPU (compute
    capability 9.x: wgmma, the copy engine and register reallocation between warpgroups)
    and a Triton whose Gluon builds it (`gluon_builds`)."""
    version = triton_version()
    if device.type != "cuda" or version is None or not gluon_builds(version):
        return False
    return device_properties(device).major == 9


WARP_MMA_MAJORS = (8, 12)
"""Compute capability majors whose ``tl.dot`` Triton builds from a warp's own MMA
(``mma.sync``: Ampere and Ada, and 12.x), where each warp holds its share of an S tile in
its registers, rather than from a warpgroup's (wgmma, 9.x) or the tensor memory (tcgen05,
10.x)."""


def warp_mma(device: torch.device) -> bool:
    """Whether ``device`` is a GPU of `WARP_MMA_MAJORS`: the top-k kernel takes other tiles
    there (`coneighbor_topk.topk_configs`)."""
    return device.type == "cuda" and device_properties(device).major in WARP_MMA_MAJORS


def programs_per_sm(
    n_regs: int, shared: int, num_warps: int, sm_registers: int, sm_shared: int, sm_threads: int
) -> int:
    """Programs of ``num_warps`` warps, ``n_regs`` registers per thread and ``shared`` bytes
    of shared memory that one SM (``sm_registers``, ``sm_shared`` bytes, ``sm_threads``)
    holds at once: the least of what its registers (a warp's allocated in units of 256),
    its shared memory (plus the 1 KiB the CUDA runtime reserves per block) and its thread
    slots allow; at least 1."""
    warp_registers = -(-n_regs * 32 // 256) * 256
    by_registers = sm_registers // (warp_registers * num_warps)
    by_shared = sm_shared // (shared + 1024)
    return max(1, min(by_registers, by_shared, sm_threads // (32 * num_warps)))


def resident_programs(kernel, device: torch.device) -> int:
    """`programs_per_sm` of a compiled Triton ``kernel`` on the CUDA ``device``, with the
    warps its build launches (for a warp-specialized one, every partition's, padded to
    warpgroups)."""
    from triton.runtime import driver

    kernel._init_handles()  # loads the binary: what sets n_regs
    props = device_properties(device)
    registers = driver.active.utils.get_device_properties(_index(device))["max_num_regs"]
    return programs_per_sm(
        kernel.n_regs, kernel.metadata.shared, kernel.metadata.num_warps, registers,
        props.shared_memory_per_multiprocessor, props.max_threads_per_multi_processor,
    )  # fmt: skip


def unusable(device: torch.device | None = None) -> str | None:
    """Why the Triton kernels cannot compile and run on the CUDA ``device`` (None: the
    current one), or None if they can: triton is not importable or older than
    `TRITON_LEAST`, no CUDA device is visible, the device is older than compute capability
    8.0, or the kernels were built for the CPU interpreter."""
    if (problem := _triton_problem()) is not None:
        return problem
    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    props = device_properties(device)
    if props.major < 8:
        return f"{props.name} has compute capability {props.major}.{props.minor}, below 8.0"
    if interpreting():
        return "the kernels were built for Triton's interpreter (TRITON_INTERPRET=1)"
    return None


def triton_available(device: torch.device | None = None) -> bool:
    """Whether the Triton kernels compile and run on this CUDA ``device`` (None: the current
    one); `unusable` says why not."""
    return unusable(device) is None


def on_device(device: torch.device) -> AbstractContextManager:
    """``device`` made the current CUDA device for the block (a no-op off CUDA): Triton
    launches on the current device and stream, whatever device the tensors are on."""
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()


def check_runnable(*tensors: Tensor) -> torch.device:
    """The common device of ``tensors`` if the kernels can run there, else a ValueError.

    Errors: tensors on different devices; CUDA tensors without a usable Triton; CPU tensors
    when the kernels were not built for the interpreter; any other device type.
    """
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        names = ", ".join(sorted(str(d) for d in devices))
        raise ValueError(f"the triton backend needs all tensors on one device, got {names}")
    device = devices.pop()
    if device.type == "cuda":
        if (problem := unusable(device)) is not None:
            raise ValueError(f"the triton backend cannot run on {device}: {problem}; {HELP}")
    elif device.type == "cpu":
        if (problem := _triton_problem()) is not None:
            raise ValueError(f"the triton backend cannot run: {problem}; {HELP}")
        if not interpreting():
            raise ValueError(
                "the triton backend runs CPU tensors only under Triton's interpreter: set "
                f"TRITON_INTERPRET=1 before importing adcam_fast.kernels, or {HELP}"
            )
    else:
        raise ValueError(
            f"the triton backend runs on CUDA (or CPU when interpreted), got {device}; {HELP}"
        )
    return device


_CACHE: dict[tuple, Config] = {}


def cached_configs() -> list[tuple]:
    """The config-cache keys that have a chosen config (kernel, its size buckets, device); on
    a GPU with autotuning on, each new key (a first call for its buckets) is one autotuning
    session."""
    return list(_CACHE)


def autotune_enabled() -> bool:
    """Timing of candidate configs is on unless ``ADCAM_AUTOTUNE=0``."""
    return os.environ.get("ADCAM_AUTOTUNE", "1") != "0"


def build_errors() -> tuple[type[Exception], ...]:
    """What Triton raises for a config that cannot be built on this GPU: out of shared memory
    or registers, or a kernel that this Triton cannot compile (a Gluon API that differs)."""
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources

    return OutOfResources, CompilationError


def choose_config(
    key: tuple,
    default: Config,
    candidates: Sequence[Config],
    run: Callable[[Config], None],
    device: torch.device,
) -> Config:
    """The config for ``key``: cached, else the fastest of ``candidates`` (GPU, autotune on),
    else ``default``. ``run(cfg)`` launches the kernel with ``cfg`` on the real arguments; it
    must be idempotent (the kernels only write their outputs). A candidate that fails to
    build (out of shared memory, or a Triton whose Gluon API differs) is skipped."""
    if device.type != "cuda" or not autotune_enabled():
        return default
    full_key = (*key, device.index, device_properties(device).name)
    if full_key not in _CACHE:
        from triton.testing import do_bench

        best, best_ms = default, float("inf")
        for cfg in candidates:
            try:
                ms = do_bench(lambda cfg=cfg: run(cfg), warmup=5, rep=20, return_mode="median")
            except build_errors():
                continue
            if ms < best_ms:
                best, best_ms = cfg, ms
        _CACHE[full_key] = best
    return _CACHE[full_key]

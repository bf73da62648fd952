"""The kernels compile for Hopper (sm_90a) and for the A100 (sm_80) with this Triton, no GPU
needed.

The interpreter tests run the kernels but never compile them; this builds the default
configurations (and the Gluon kernel's candidate, where this Triton's Gluon builds it)
through ``triton.compile`` and Triton's bundled ptxas (bench/compile_check.py) and requires
no register spills in them (but in the Gluon builds and one stack slot of the sqrt pass,
see below), and shared memory within what a program of the target may take.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "bench" / "compile_check.py"


def _ptxas() -> Path | None:
    try:
        import triton
    except ImportError:
        return None
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    return path if path.exists() else None


NO_PTXAS = pytest.mark.skipif(
    _ptxas() is None, reason="Triton's bundled ptxas (NVIDIA backend) is missing"
)


def _compile_check(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", *args], env=env, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    return run


def _spill(line: str) -> int:
    return int(re.search(r"spill=(\d+)", line)[1])


def _root_stack(line: str) -> int:
    """Bytes a build may keep on the stack: the sqrt pass over rows longer than ROOT_BLOCK
    may keep one value there (Triton 3.7: the row's exponent, 4 bytes stored and loaded
    once a program, around its second loop)."""
    return 4 if line.startswith("OK   root") and "whole=False" in line else 0


@NO_PTXAS
def test_default_configurations_compile_for_sm90_without_spills():
    run = _compile_check()
    import triton

    from adcam_fast.kernels import launch

    gluon = launch.gluon_builds(triton.__version__)
    lines = [line for line in run.stdout.splitlines() if line.startswith("OK ")]
    # root fp32 + fp16, each for rows read once (4 and 1 a program) and in blocks; top-k fp16 +
    # fp32, by pointers (N % 8 != 0) and TMA, and for fp32 at kp = 1 (both) and 128 (one
    # default); where this Triton's Gluon builds it (launch.GLUON_RELEASES), the
    # warp-specialized candidate and its twin whose MMA warpgroup scales the keys; the merge
    # of the candidates' column parts; CSR: the 2 kernels around the sort; diffusion
    assert len(lines) == (20 if gluon else 18), run.stdout
    assert ("SKIP topk-ws" in run.stdout) != gluon, run.stdout
    assert re.match(r"OK   diffusion: (\d+) launch .* counts 1\.\.64, \1 for one$", lines.pop())
    ws = [line for line in lines if line.startswith("OK   topk-ws")]
    assert len(ws) == (2 if gluon else 0), ws
    assert all("mma=wgmma loads=tma" in line for line in ws), ws
    # The Gluon builds spill a little with Triton 3.8 (32 and 60 bytes; 4 and 16 with the
    # GPU machines' 3.6). No other build may spill but the sqrt pass (`_root_stack`).
    for line in lines:
        if line not in ws:
            assert _spill(line) <= _root_stack(line), line
    # wgmma for every tile of 64 rows or more (kp = 128 keeps 32 rows on 8 warps: mma.sync)
    wide = [line for line in lines if line.startswith("OK   topk") and "kp=128" not in line]
    assert all("mma=wgmma" in line for line in wide), run.stdout


@NO_PTXAS
def test_default_configurations_compile_for_sm80_without_spills():
    """On an A100 the top-k kernel takes the tiles for a warp's mma.sync
    (`launch.warp_mma`), by pointer loads pipelined through cp.async, without the spills of
    the Hopper defaults there (64×128 tiles on 4 warps: 400 bytes a thread with Triton
    3.8, 1200 with 3.6)."""
    run = _compile_check("--arch", "80")
    lines = [line for line in run.stdout.splitlines() if line.startswith("OK ")]
    # root 6; top-k fp16 kp = 64, fp32 kp = 1, 64 and 128 (one default for any N); CSR 2;
    # the diffusion and its class counts; no Gluon build and no parts to merge
    assert len(lines) == 14, run.stdout
    assert "SKIP topk-ws" in run.stdout and "for sm_80 " in run.stdout, run.stdout
    topk = [line for line in lines if line.startswith("OK   topk")]
    assert len(topk) == 4 and all("mma=mma.sync loads=cp.async" in t for t in topk), topk
    # As for sm_90a, the sqrt pass may keep 4 bytes on the stack; Triton 3.7 also keeps 8
    # of the fp16 top-k build (3.4, 3.6, 3.8 and 3.9 none).
    for line in lines:
        stack = 8 if line.startswith("OK   topk fp16") else _root_stack(line)
        assert line.endswith("for one") or _spill(line) <= stack, line

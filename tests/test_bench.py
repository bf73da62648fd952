"""The benchmark scripts run end to end on CPU at tiny sizes, so that a GPU run (rare and
short: bench/gpu_check.sh) is not lost to a script error. bench/kernels.py in its smoke form
(Triton's interpreter, N = 64, B = 2); the others with the nano model at 64 px.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).parents[1] / "bench"


def _call(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    """Run bench/``script`` with ``args`` (and ``env`` added to the environment)."""
    argv = [sys.executable, str(BENCH / script), *args]
    return subprocess.run(
        argv, env=dict(os.environ, **env), capture_output=True, text=True, timeout=300
    )


def _run(script: str, *args: str, **env: str) -> str:
    """`_call` that must succeed; its stdout."""
    run = _call(script, *args, **env)
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout


def _bench_module(name: str) -> ModuleType:
    """bench/``name``.py, imported (bench/ is a folder of scripts, not a package)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module(name)


def test_kernel_benchmark_smoke(tmp_path):
    pytest.importorskip("triton")
    from adcam_fast.kernels.coneighbor_topk import topk_configs

    extra = "block_m=32,block_n=64,block_k=32,num_stages=2"  # not a candidate: timed too
    stdout = _run("kernels.py", "--smoke", "--out", str(tmp_path), "--topk-config", extra,
                  TRITON_INTERPRET="1")  # fmt: skip
    result = json.loads((tmp_path / "kernels.json").read_text())
    assert result["meta"]["device"] == "cpu (Triton interpreter)"
    assert result["meta"]["triton_launch_host_us"] > 0 and result["meta"]["torch_op_host_us"] > 0
    assert result["meta"]["l2_read_tbps"] > 0  # the L2 probe ran (and summed right)
    (row,) = result["rows"]
    assert (row["N"], row["B"], row["k"]) == (64, 2, 50)
    names = ("reference", "torch", "triton", "triton_host", "similarity", "root", "diffusion")
    for name in (*names, "csr"):
        assert row[f"{name}_ms"] > 0, name
    assert row["triton_torch_ops"] > 0  # a call's torch ops, counted
    assert row["cast_ms"] > 0  # the sqrt pass's bytes as a torch cast
    shapes = [key for key in row if re.fullmatch(r"root_\d+x\d+_ms", key)]  # ROOT_SHAPES
    assert shapes and all(row[key] > 0 for key in shapes), shapes
    for name in ("similarity", "root", "diffusion", "csr"):  # each stage's host part too
        assert row[f"{name}_host_ms"] > 0, name
    best_torch = min(row["torch_ms"], row["reference_ms"])  # no torch.compile off CUDA
    assert row["speedup_vs_best_torch"] == pytest.approx(best_torch / row["triton_ms"])
    n_candidates = len(topk_configs(64)[1] + topk_configs(64, aligned=True)[1])  # N = 64
    assert len({key for key in row if key.startswith("topk_")}) == n_candidates + 1
    assert row["topk_32x64x32_w4_s2_slots0_narrow0_ms"] > 0
    assert f"topk_{row['similarity_config']}_ms" in row  # the config the stage ran with
    for kind in ("spatial", "blocks"):  # the stage on the other kinds of attention
        assert row[f"similarity_{kind}_ms"] > 0, kind
    candidates = {key[len("topk_") :] for key in row if key.startswith("topk_")}
    for kind in ("spatial_", "floor_"):  # every candidate on spatial rows and its floor
        assert {key[len(kind) :] for key in row if key.startswith(kind)} == candidates, kind
    with open(tmp_path / "kernels.csv", newline="") as f:
        (csv_row,) = list(csv.DictReader(f))
    assert float(csv_row["triton_ms"]) == pytest.approx(row["triton_ms"])
    assert "| 64 | 2 |" in stdout  # the closing table, with the fastest on spatial rows
    assert "| fastest on spatial |" in stdout


def test_kernel_benchmark_names_a_bad_topk_config():
    """A --topk-config with an unknown field, or one the kernel cannot run (k = 50 needs
    tiles of 64 columns at least), stops the run before it times anything."""
    for config, message in [
        ("block_m=64,warps=4", "'warps=4' is not FIELD=INTEGER"),
        ("block_m=64,block_n=32,block_k=64", "config block_n must be >= next_pow2(k) = 64"),
    ]:
        run = _call("kernels.py", "--smoke", "--topk-config", config, TRITON_INTERPRET="1")
        assert run.returncode != 0 and message in run.stderr, run.stderr
        assert "| 64 | 2 |" not in run.stdout


def test_profile_script_runs_a_topk_config():
    """bench/profile_kernels.py profiles the similarity stage alone under a --topk-config
    (here the default in two parts, on spatial attention); a warp-specialized one, which
    bench/gpu_check.sh profiles on Hopper, is refused elsewhere with the reason."""
    from adcam_fast.kernels.coneighbor_topk import WS_CANDIDATE, topk_configs

    config_text = _bench_module("configs").config_text
    in_parts = dataclasses.replace(topk_configs(64, aligned=True)[0], parts=2)
    args = ["--n", "64", "--b", "2", "--kind", "spatial", "--topk-config"]
    stdout = _run("profile_kernels.py", *args, config_text(in_parts), TRITON_INTERPRET="1")
    assert "2 calls at N=64, B=2 (spatial) on cpu" in stdout
    run = _call("profile_kernels.py", *args, config_text(WS_CANDIDATE), TRITON_INTERPRET="1")
    assert run.returncode != 0 and "ws needs a Hopper GPU (sm_90)" in run.stderr, run.stderr


def test_config_text_reads_back():
    """The --topk-config text of every candidate (bench/configs.py) gives the config again."""
    from adcam_fast.kernels.coneighbor_topk import topk_configs

    configs = _bench_module("configs")
    for kp in (64, 128, 1024):
        for aligned in (False, True):
            for cfg in topk_configs(kp, aligned, hopper=True)[1]:
                assert configs.topk_config(configs.config_text(cfg), kp) == cfg


def test_merge_model_blocks_are_the_merge_floor():
    """bench/merge_model.py: on the blocks kind of attention (the kernel benchmark's floor)
    a program of 128-column tiles merges once; on random attention, every tile. In two
    parts, each part merges its first tile, so the floor is two merges per row block."""
    for parts, floor in ((1, 1.0), (2, 2.0)):
        stdout = _run("merge_model.py", "--sizes", "256", "--block-n", "128", "--slots", "0",
                      "--parts", str(parts))  # fmt: skip
        merges = {
            line.split(":")[0].split()[-1]: float(line.split("slots 0: ")[1].split(";")[0])
            for line in stdout.splitlines()
        }
        assert (merges["random"], merges["blocks"]) == (2.0, floor)  # of the 2 tiles of a row


def test_sass_regions_split_a_kernel_by_execution_count(tmp_path):
    """bench/sass_regions.py on a source page laid out as Nsight Compute prints it (profiler
    lines, then per kernel its name, a header and one row per SASS instruction): regions
    are the instructions run equally often, each with its share of the samples."""
    header = ["Address", "Source", "Warp Stall Sampling (All Samples)", "Instructions Executed",
              "stall_long_sb", "stall_wait", "stall_wait (Not Issued)"]  # fmt: skip
    rows = [  # 4 warps: an entry run once per warp, a loop body run 10 times per warp
        ["0x0", "LDC R1, c[0x0][0x28]", "10", "4", "0", "10", "9"],
        ["0x10", "HGMMA.64x128x16.F32 R24", "30", "40", "20", "10", "9"],
        ["0x20", "@!P4 BRA 0x10", "50", "40", "50", "0", "0"],
        ["0x30", "EXIT", "10", "4", "10", "0", "0"],
    ]
    log = tmp_path / "sass.log"
    with open(log, "w", newline="") as f:
        f.write("==PROF== Connected to process 1\n")
        writer = csv.writer(f, quoting=csv.QUOTE_ALL)
        writer.writerows([["Kernel Name", "topk"], header, *rows])
        writer.writerows([["Kernel Name", "diffusion"], header, rows[0]])
    lines = _run("sass_regions.py", str(log)).splitlines()
    assert lines == [
        "topk",
        "   80.0% of samples: 10 per warp, 2 sites, 80 warp instructions; long_sb 70, wait 10",
        "   20.0% of samples: 1 per warp, 2 sites, 8 warp instructions; long_sb 10, wait 10",
        "diffusion",
        "  100.0% of samples: 1 per warp, 1 sites, 4 warp instructions; wait 10",
    ]


def test_pipeline_benchmark_smoke(tmp_path):
    _run("pipeline.py", "--images", "4", "--size", "64", "--input-size", "64", "--batch-size",
         "2", "--workers", "0", "--device", "cpu", "--out", str(tmp_path))  # fmt: skip
    result = json.loads((tmp_path / "pipeline_cpu.json").read_text())
    assert (result["written"], result["failed"]) == (4, 0)
    assert result["images_per_second"] > 0
    assert result["configs_tuned_in_timed_run"] == 0  # configs are only autotuned on a GPU
    assert result["configs_tuned_in_timed_run_keys"] == []
    assert result["kernel_builds_in_timed_run"] == 0  # and no Triton kernel is built on a CPU


def test_pipeline_counts_kernel_builds(monkeypatch):
    """bench/pipeline.py counts Triton kernel builds through the post-compile hook (called
    here as Triton calls it after a build) and restores the hook it found."""
    triton = pytest.importorskip("triton")
    monkeypatch.syspath_prepend(str(BENCH))
    from pipeline import KernelBuilds

    before = triton.knobs.runtime.jit_post_compile_hook
    built = dict(key="k", repr="r", fn=None, compile={}, is_manual_warmup=False)
    with KernelBuilds() as builds:
        for _ in range(2):
            triton.knobs.runtime.jit_post_compile_hook(**built, already_compiled=False)
    assert builds.count == 2
    assert triton.knobs.runtime.jit_post_compile_hook is before


def test_train_benchmark_smoke(tmp_path):
    _run("train.py", "--steps", "1", "--warmup", "1", "--device", "cpu", "--out", str(tmp_path))
    result = json.loads((tmp_path / "train_cpu.json").read_text())
    assert result["model"] == "conformer_nano_patch16" and result["images_per_s"] > 0


def test_backends_benchmark_smoke(tmp_path):
    pytest.importorskip("onnxruntime")
    _run("backends.py", "--sizes", "64", "--batch", "1", "--repeats", "1", "--rounds", "1",
         "--warmup", "1", "--no-compile", "--device", "cpu", "--out", str(tmp_path))  # fmt: skip
    rows = json.loads((tmp_path / "backends_cpu.json").read_text())["rows"]
    names = {r["backend"] for r in rows}
    assert names == {"torch-eager", "onnxruntime-cpu-fp32", "onnxruntime-cpu-fp16"}
    assert all(r["images_per_s"] > 0 for r in rows)

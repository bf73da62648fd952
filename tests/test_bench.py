"""bench/kernels.py, whose real run needs a GPU, runs end to end on CPU in its smoke form
(Triton's interpreter, N = 64, B = 2), so that its one GPU run is not lost to a script error.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "bench" / "kernels.py"


def test_kernel_benchmark_smoke(tmp_path):
    pytest.importorskip("triton")
    from adcam_fast.kernels.coneighbor_topk import topk_configs

    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads((tmp_path / "kernels.json").read_text())
    assert result["meta"]["device"] == "cpu (Triton interpreter)"
    (row,) = result["rows"]
    assert (row["N"], row["B"], row["k"]) == (64, 2, 50)
    for name in ("reference", "torch", "triton", "similarity", "root", "diffusion"):
        assert row[f"{name}_ms"] > 0, name
    assert row["speedup_vs_best_torch"] == pytest.approx(row["torch_ms"] / row["triton_ms"])
    timed = {key for key in row if key.startswith("topk_")}
    assert len(timed) == len(topk_configs(64)[1])  # every autotune candidate
    with open(tmp_path / "kernels.csv", newline="") as f:
        (csv_row,) = list(csv.DictReader(f))
    assert float(csv_row["triton_ms"]) == pytest.approx(row["triton_ms"])
    assert "| 64 | 2 |" in run.stdout  # the closing table

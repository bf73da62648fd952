"""Reference vs torch backend of ``adcam_fast.adcam`` on CPU.

For each (N, B): median wall time over repeats (after one warm-up), the speed-up of the
torch path, and the peak resident memory the call added (Linux VmHWM, reset through
/proc/self/clear_refs before each call; the script re-executes itself with a fixed glibc
mmap threshold so that freed tensors leave the resident set instead of being reused).
Writes bench/results/ops_cpu.{json,md}.

    python bench/ops_cpu.py [--sizes 144 576 1296] [--batches 1 4 16] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

import adcam_fast


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def peak_extra_mib(fn) -> float:
    """Peak resident memory added while ``fn()`` runs, in MiB."""
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _rss_kib("VmRSS")
    fn()
    return (_rss_kib("VmHWM") - before) / 1024


def median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":
        env = os.environ | {"MALLOC_MMAP_THRESHOLD_": "65536"}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[144, 576, 1296])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--classes", type=int, default=3)
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args()

    torch.manual_seed(0)
    rows = []
    for n in args.sizes:
        for b in args.batches:
            A = (torch.randn(b, n, n) * 3).softmax(-1)
            cams = torch.rand(b, args.classes, n)
            row = dict(N=n, B=b)
            for backend in ("reference", "torch"):

                def run(backend=backend, A=A, cams=cams):
                    return adcam_fast.adcam(A, cams, k=args.k, steps=args.steps, backend=backend)

                row[f"{backend}_ms"] = 1e3 * median_seconds(run, args.repeats)
                row[f"{backend}_peak_mib"] = peak_extra_mib(run)
            row["speedup"] = row["reference_ms"] / row["torch_ms"]
            row["S_mib"] = b * n * n * 4 / 2**20
            rows.append(row)
            print(
                f"N={n:5d} B={b:3d}  reference {row['reference_ms']:9.2f} ms "
                f"({row['reference_peak_mib']:7.1f} MiB)  torch {row['torch_ms']:9.2f} ms "
                f"({row['torch_peak_mib']:7.1f} MiB)  x{row['speedup']:.2f}  "
                f"[S alone: {row['S_mib']:.1f} MiB]",
                flush=True,
            )

    meta = dict(
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        machine=f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        torch=torch.__version__,
        dtype="float32",
        K=args.classes,
        k=args.k,
        steps=args.steps,
        repeats=args.repeats,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ops_cpu.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    lines = [
        f"# adcam on CPU: reference vs torch ({meta['date']}, {meta['machine']}, "
        f"torch {meta['torch']}, K={args.classes}, k={args.k}, T={args.steps})",
        "",
        "| N | B | reference ms | torch ms | speed-up | reference peak MiB "
        "| torch peak MiB | S MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['N']} | {r['B']} | {r['reference_ms']:.2f} | {r['torch_ms']:.2f} "
        f"| {r['speedup']:.2f} | {r['reference_peak_mib']:.1f} | {r['torch_peak_mib']:.1f} "
        f"| {r['S_mib']:.1f} |"
        for r in rows
    ]
    (args.out / "ops_cpu.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

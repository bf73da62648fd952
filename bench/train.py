"""Classifier training throughput (images/s of full optimiser steps, the paper recipe).

One configuration per device, on random inputs and multi-hot targets (the loader is left
out: this measures the model, loss, backward and AdamW step):

- CPU: ``conformer_nano_patch16``, 128 x 128 crops, batch 8, fp32;
- CUDA (when available): Conformer-S at 384 x 384, batch 16, bf16 autocast, channels-last
  (the recipe's settings), the card named in the result.

Each runs ``--warmup`` untimed steps, then times ``--steps`` steps one by one (CUDA
synchronised after each); ``images_per_s`` is batch / median step time (robust to other load
on a shared machine; the mean is kept as ``images_per_s_mean``, and the 1-minute load
average is recorded). Writes ``<out>/train_<device>.json`` (default bench/results) per
device measured.

    python bench/train.py [--steps 30] [--warmup 5] [--device cpu|cuda|all] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import timm
import torch

import adcam_fast
from adcam_fast.training.classifier import build_optimizer, classification_loss
from adcam_fast.training.engine import DistInfo, prepare_model, to_device, train_step

RESULTS = Path(__file__).parent / "results"
CONFIGS = {
    "cpu": {"model": "conformer_nano_patch16", "crop": 128, "batch_size": 8, "amp": False},
    "cuda": {"model": "conformer_small_patch16", "crop": 384, "batch_size": 16, "amp": True},
}
NUM_CLASSES = 20


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else ``platform.machine()``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def measure(device: str, steps: int, warmup: int) -> dict:
    """Time ``steps`` training steps of ``CONFIGS[device]``; returns the result record."""
    cfg = CONFIGS[device]
    dev = torch.device(device)
    torch.manual_seed(0)
    model = timm.create_model(
        cfg["model"], num_classes=NUM_CLASSES, drop_last_block=True, detach_branches=True
    )
    model = prepare_model(model, DistInfo(0, 1, 0, dev)).train()
    optimizer, scheduler = build_optimizer(model, max_it=warmup + steps)
    b, s = cfg["batch_size"], cfg["crop"]
    batch = to_device(
        {
            "image": torch.randn(b, 3, s, s),
            "labels": (torch.rand(b, NUM_CLASSES) < 0.15).float(),
        },
        dev,
    )

    def step() -> float:
        t0 = time.perf_counter()
        train_step(model, batch, classification_loss, optimizer, scheduler, cfg["amp"])
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for _ in range(warmup):
        step()
    times = [step() for _ in range(steps)]
    median = statistics.median(times)
    record = {
        **cfg,
        "device": device,
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_name(),
        "load_average_1min": os.getloadavg()[0],
        "torch_threads": torch.get_num_threads(),
        "steps": steps,
        "warmup": warmup,
        "ms_per_step_median": 1000 * median,
        "ms_per_step_min": 1000 * min(times),
        "images_per_s": b / median,
        "images_per_s_mean": b * steps / sum(times),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "adcam_fast": adcam_fast.__version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if dev.type == "cuda":
        record["peak_memory_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
    return record


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", choices=("cpu", "cuda", "all"), default="all")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU is visible")
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    if not torch.cuda.is_available():
        devices = [d for d in devices if d != "cuda"]
    for device in devices:
        record = measure(device, args.steps, args.warmup)
        args.out.mkdir(parents=True, exist_ok=True)
        out = args.out / f"train_{device}.json"
        out.write_text(json.dumps(record, indent=2) + "\n")
        print(
            f"{device} ({record['device_name']}): {record['model']} {record['crop']}px "
            f"batch {record['batch_size']}: {record['images_per_s']:.1f} images/s "
            f"(median {record['ms_per_step_median']:.0f} ms/step) -> {out}"
        )


if __name__ == "__main__":
    main()

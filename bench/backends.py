"""Extractor throughput by backend: torch eager, torch.compile, ONNX Runtime (fp32, fp16).

One random-weight model, exported once per precision through ``adcam export``'s own code
(:func:`adcam_fast.export.onnx.export_checkpoint`); the same input batch for every backend;
images/s from the median (and the best) of ``--repeats`` timed calls after warm-up, taken
in ``--rounds`` rounds of one block per backend (see :func:`_block_seconds`);
``torch.compile``, with static shapes as ``adcam label``'s fixed scales give, compiles
during its warm-up, reported separately. Ratios are of medians against torch eager of the
same run. Each row also gives the largest differences from float32 torch eager on that batch
(attention absolute, CAM maps relative to their largest magnitude).

On CPU: ONNX Runtime's CPU provider. On CUDA: torch eager and compile with bf16 autocast (as
``adcam label`` runs them), and ONNX Runtime through every GPU provider that this
onnxruntime has (none with the CPU-only build). Writes
``bench/results/backends_<device>.{json,md}``.

    python bench/backends.py [--model conformer_nano_patch16] [--sizes 128 224] [--batch 4]
                             [--threads 1]

On a small machine shared with other jobs, give ``--threads 1``: with 2 threads on 2 busy
cores, eager torch's many small parallel regions wait on descheduled threads and slow down
10-15x, at random (seen on the dev machine: 6 vs 100 images/s at 128²).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import re
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import timm
import torch

import adcam_fast
from adcam_fast.export.backends import Extraction, OnnxExtractor, TorchExtractor
from adcam_fast.export.onnx import export_checkpoint
from adcam_fast.training.augment import IMAGENET_MEAN as MEAN
from adcam_fast.training.augment import IMAGENET_STD as STD
from adcam_fast.training.checkpoint import classifier_config, save_classifier


def _checkpoint(path: Path, model_name: str, classes: int, crop: int) -> tuple[Path, list[str]]:
    torch.manual_seed(0)
    names = [f"class{i}" for i in range(classes)]
    model = timm.create_model(model_name, num_classes=classes, drop_last_block=True)
    config = classifier_config(model_name, classes, crop)
    return save_classifier(model, config, names, path), names


def _block_seconds(
    calls: dict[str, Callable[[], Extraction]], device: torch.device, repeats: int, rounds: int
) -> dict[str, list[float]]:
    """Seconds of ``repeats`` calls of each entry, in ``rounds`` rounds that run a block of
    calls of each entry in turn, each block after one untimed call. Blocks rather than
    alternating calls: on a CPU, the thread pool of the runtime that ran last still spins for
    a while and would slow the next one down; rounds spread slow drifts in the machine's load
    over all entries."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    per_block = max(1, repeats // rounds)
    for _ in range(rounds):
        for name, fn in calls.items():
            fn()
            for _ in range(per_block):
                t0 = time.perf_counter()
                fn()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times[name].append(time.perf_counter() - t0)
    return times


def _errors(out: Extraction, ref: Extraction) -> dict[str, float]:
    cams_rel = (out.cams.float().cpu() - ref.cams).abs().max() / ref.cams.abs().max()
    attn_abs = (out.attention.float().cpu() - ref.attention).abs().max()
    return dict(attention_abs=attn_abs.item(), cams_rel=cams_rel.item())


def _device_name(device: torch.device) -> str:
    if device.type == "cpu":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def _ort_providers(device: torch.device) -> list[str]:
    import onnxruntime

    if device.type == "cpu":
        return ["CPUExecutionProvider"]
    gpu = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
    return [p for p in onnxruntime.get_available_providers() if p in gpu]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="conformer_nano_patch16")
    p.add_argument("--classes", type=int, default=20)
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 224])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads of torch and ONNX Runtime (default: their own defaults)",
    )
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args()
    if any(size < 16 or size % 16 for size in args.sizes):  # the Conformers' patch size
        p.error(f"--sizes must be multiples of 16, got {args.sizes}")
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, names = _checkpoint(Path(tmp) / "model.pth", args.model, args.classes, args.sizes[0])
        providers = _ort_providers(device)
        onnx_files = {}
        for precision in ("fp32", "fp16") if providers else ():  # exports take up to a minute
            path = Path(tmp) / f"{precision}.onnx"
            export_checkpoint(ckpt, "extractor", path, fp16=precision == "fp16", verify=False)
            onnx_files[precision] = path
        from adcam_fast.training.checkpoint import load_classifier

        model, _ = load_classifier(ckpt)
        # Its own copy: an extractor moves its model to its device in place.
        reference = TorchExtractor(copy.deepcopy(model), names, MEAN, STD, "cpu", amp=False)
        extractors: dict[str, Callable[[torch.Tensor], Extraction]] = {
            "torch-eager": TorchExtractor(model, names, MEAN, STD, device),
        }
        if args.compile:
            compiled = TorchExtractor(model, names, MEAN, STD, device)
            compiled.graph = torch.compile(compiled.graph, dynamic=False)
            extractors["torch-compile"] = compiled
        for provider in providers:
            short = provider.removesuffix("ExecutionProvider").lower()
            for precision, path in onnx_files.items():
                extractors[f"onnxruntime-{short}-{precision}"] = OnnxExtractor(
                    path, device, providers=[provider], threads=args.threads
                )
        for size in args.sizes:
            x = torch.randn(args.batch, 3, size, size, generator=torch.Generator().manual_seed(0))
            ref = reference(x)
            xd = x.to(device)
            found = {}
            for name, ex in extractors.items():
                t0 = time.perf_counter()
                for _ in range(args.warmup):
                    out = ex(xd)
                found[name] = dict(warmup_s=time.perf_counter() - t0, **_errors(out, ref))
            calls = {name: (lambda ex=ex, xd=xd: ex(xd)) for name, ex in extractors.items()}
            times = _block_seconds(calls, device, args.repeats, args.rounds)
            eager = statistics.median(times["torch-eager"])
            for name, t in times.items():
                sec = statistics.median(t)
                row = dict(
                    backend=name, size=size, batch=args.batch, ms_per_batch=1e3 * sec,
                    images_per_s=args.batch / sec, best_images_per_s=args.batch / min(t),
                    vs_torch_eager=eager / sec, **found[name],
                )  # fmt: skip
                rows.append(row)
                print(
                    f"{size:4d}² B={args.batch} {name:34s} {row['images_per_s']:8.1f} img/s "
                    f"x{row['vs_torch_eager']:.2f}  (warm-up {row['warmup_s']:.1f} s; A err "
                    f"{row['attention_abs']:.1e}, CAM rel {row['cams_rel']:.1e})",
                    flush=True,
                )

    import onnxruntime

    dev_name = _device_name(device)
    meta = dict(
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        device=dev_name if device.type == "cuda" else f"{platform.machine()} CPU",
        torch_threads=torch.get_num_threads(),
        onnxruntime_threads=args.threads or "default (one per physical core)",
        torch=torch.__version__,
        onnxruntime=onnxruntime.__version__,
        adcam_fast=adcam_fast.__version__,
        model=args.model,
        classes=args.classes,
        repeats=args.repeats,
        rounds=args.rounds,
        amp="bf16 autocast (torch on CUDA)" if device.type == "cuda" else "none (fp32)",
    )
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"backends_{dev_name}"
    stem.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    lines = [
        f"# Extractor throughput by backend ({meta['date']}, {meta['device']}, "
        f"torch {meta['torch']} with {meta['torch_threads']} threads, onnxruntime "
        f"{meta['onnxruntime']} with {meta['onnxruntime_threads']} threads, {args.model}, "
        f"K={args.classes}, {meta['amp']})",
        "",
        "| size | batch | backend | images/s (median) | images/s (best) | × torch eager "
        "| warm-up s | A max abs err | CAM max rel err |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['size']} | {r['batch']} | {r['backend']} | {r['images_per_s']:.1f} "
        f"| {r['best_images_per_s']:.1f} | {r['vs_torch_eager']:.2f} | {r['warmup_s']:.1f} "
        f"| {r['attention_abs']:.1e} | {r['cams_rel']:.1e} |"
        for r in rows
    ]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"-> {stem}.json, {stem}.md")


if __name__ == "__main__":
    main()

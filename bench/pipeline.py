"""End-to-end ``adcam label`` throughput: images/s and seconds per stage.

Writes a synthetic collection to disk (so decoding is real), builds a random-weight
classifier checkpoint of the chosen variant, and labels the collection through the same
code as the command (DataLoader decode -> extractor per scale and flip -> AD-CAM -> merge ->
writer threads). Stage times come from the run's summary.json: ``forward`` and ``adcam``
are device times (synchronised per batch), ``decode_wait`` / ``write_wait`` are the time the
main loop waited for the loader / the writers; ``configs_tuned_in_timed_run`` counts the
Triton kernel configs first chosen (autotuned) inside the timed run (``..._keys``: their
config keys, kernel and size buckets), and
``kernel_builds_in_timed_run`` the Triton kernels built there (compiled, or loaded from
Triton's disk cache: a launch specialization not met before), whose cost that run then
includes. Results: bench/results/pipeline_<device>.json.

    python bench/pipeline.py                      # CPU: nano model, 64 images of 128 px
    python bench/pipeline.py --model conformer_small_patch16 --images 512 --size 448 \\
        --input-size 384 --batch-size 16 --workers 8    # GPU, VOC-sized images
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import timm
import torch

from adcam_fast.data import make_synthetic, open_dataset
from adcam_fast.export.backends import create_extractor
from adcam_fast.kernels.launch import cached_configs
from adcam_fast.pipeline.label import LabelConfig, label_dataset
from adcam_fast.training.checkpoint import classifier_config, save_classifier


def random_checkpoint(model: str, class_names: list[str], crop: int, path: Path) -> Path:
    """A classifier checkpoint of timm ``model`` with random weights, saved at ``path``."""
    net = timm.create_model(model, num_classes=len(class_names), drop_last_block=True)
    return save_classifier(net, classifier_config(model, len(class_names), crop), class_names, path)


class KernelBuilds:
    """Counts Triton kernel builds (in-process cache misses) while active, through Triton's
    post-compile hook; the previous hook is restored on exit."""

    def __init__(self) -> None:
        self.count = 0

    def __enter__(self) -> KernelBuilds:
        import triton

        self._knobs = triton.knobs.runtime
        self._previous = self._knobs.jit_post_compile_hook
        self._knobs.jit_post_compile_hook = self._hook
        return self

    def _hook(self, **kwargs: object) -> None:
        self.count += 1

    def __exit__(self, *exc: object) -> None:
        self._knobs.jit_post_compile_hook = self._previous


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="conformer_nano_patch16")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--size", type=int, default=128, help="side of the synthetic images")
    p.add_argument("--input-size", type=int, default=128)
    p.add_argument("--scales", default="1.0,0.5,1.5,2.0")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--adcam-backend", default="auto")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = make_synthetic(tmp / "data", args.images, seed=0, size=args.size, val_fraction=0)
        dataset = open_dataset(f"synthetic:{data}")
        names = dataset.class_names
        ckpt = random_checkpoint(args.model, names, args.input_size, tmp / "model.pth")
        extractor = create_extractor("torch", str(ckpt), device=args.device)
        cfg = LabelConfig(
            scales=tuple(float(s) for s in args.scales.split(",")),
            input_size=args.input_size,
            batch_size=args.batch_size,
            workers=args.workers,
            adcam_backend=args.adcam_backend,
        )
        # Warm-up on a small collection of the same kind (kernels, allocator), then timing.
        warm = make_synthetic(tmp / "warm", 2 * args.batch_size, seed=1, size=args.size)
        t0 = time.perf_counter()
        label_dataset(open_dataset(f"synthetic:{warm}"), extractor, tmp / "w", cfg, progress=False)
        warmup_seconds = time.perf_counter() - t0
        configs_before = set(cached_configs())
        with KernelBuilds() as builds:
            summary = label_dataset(dataset, extractor, tmp / "out", cfg, progress=False)
        # Kernel configs first chosen inside the timed run (autotuning, and any compiles it
        # needs, counted in its time): shape buckets the warm-up did not meet.
        tuned_in_run = [str(key) for key in cached_configs() if key not in configs_before]

    cuda = torch.device(args.device).type == "cuda"
    device = torch.cuda.get_device_name(args.device) if cuda else platform.processor()
    result = dict(
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        device=device or platform.machine(),
        torch=torch.__version__,
        model=args.model,
        images=args.images,
        image_size=args.size,
        config=dict(
            input_size=cfg.input_size,
            scales=cfg.scales,
            flip=cfg.flip,
            k=cfg.k,
            steps=cfg.steps,
            batch_size=cfg.batch_size,
            workers=cfg.workers,
            adcam_backend=cfg.adcam_backend,
        ),
        warmup_seconds=warmup_seconds,
        configs_tuned_in_timed_run=len(tuned_in_run),
        configs_tuned_in_timed_run_keys=tuned_in_run,
        kernel_builds_in_timed_run=builds.count,
        images_per_second=summary.images_per_second,
        seconds=summary.seconds,
        stage_seconds=summary.stage_seconds,
        written=summary.written,
        failed=summary.failed,
    )
    print(json.dumps(result, indent=2))
    args.out.mkdir(parents=True, exist_ok=True)
    tag = "cuda" if cuda else "cpu"
    (args.out / f"pipeline_{tag}.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

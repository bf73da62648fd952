"""Ray engine scaling: images/s with 1..N actors, and its cost against the local engine.

Writes a synthetic collection (so decoding is real) and a random-weight classifier checkpoint
under ``--root``, then labels it with the local engine (torch at its default thread count,
and at one thread, as a CPU actor with one CPU runs) and with the Ray engine at each fixed
pool size of ``--actors``, each into a fresh output directory. Per run, from its wall time
and its summary.json:

    end_to_end  images / wall seconds of the whole call (local: with the model load; Ray:
                with the checkpoint probe, actor start and model loads)
    startup     seconds from the run's start to its first finished batch
    steady      (images - one batch) / (seconds - startup): the rate once images flow

Scaling: steady rate with N actors over 1 actor. Overhead: the Ray engine with 1 actor
against the local engine at one thread (the same compute per image): steady ratio, extra
startup, end-to-end ratio. One warm-up run of each engine on a small collection comes first
(process start, file cache). Results: ``bench/results/scale_<cpu|cuda>.json`` and a table.

Without ``--address`` a local Ray instance is started with ``--cpus`` logical CPUs (default:
the largest pool + 1, so a decode task has a CPU beside the actors even when the actors
outnumber the cores; they then share the cores: see ``cpu_count`` in the results).

On a real cluster, join it and put ``--root`` on a filesystem every node sees at the same
path (the collection, the checkpoint and the outputs go there; every node needs
``pip install "adcam_fast[ray]"``), e.g. GPU actors, VOC-sized images:

    python bench/scale.py --address auto --root /shared/adcam-bench --gpus-per-worker 1 \\
        --actors 1,2,4,8 --model conformer_small_patch16 --size 448 --input-size 384 \\
        --images 4096 --batch-size 16

The local engine rows then run on the driver's machine (its GPU when it has one).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import ray
import torch
from pipeline import random_checkpoint

from adcam_fast.data import make_synthetic, open_dataset
from adcam_fast.export.backends import create_extractor
from adcam_fast.pipeline.label import LabelConfig, Summary, label_dataset
from adcam_fast.pipeline.ray_engine import ExtractorSpec, RayOptions, label_dataset_ray


def _ints(text: str) -> list[int]:
    return [int(s) for s in text.split(",")]


def _measure(run: Callable[[Path], Summary], out: Path, batch: int) -> dict:
    t = time.perf_counter()
    s = run(out)
    wall = time.perf_counter() - t
    assert s.failed == 0 and s.written == s.total, f"{out}: {s.written} of {s.total} written"
    return dict(
        wall_seconds=wall,
        seconds=s.seconds,
        startup_seconds=s.startup_seconds,
        end_to_end=s.written / wall,
        steady=(s.written - batch) / (s.seconds - s.startup_seconds),
        workers=s.workers,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--address", default=None, help="auto | ray://HOST:PORT (default: local)")
    p.add_argument("--root", type=Path, default=None, help="shared dir (default: a temp dir)")
    p.add_argument("--actors", type=_ints, default=[1, 2], help="pool sizes, e.g. 1,2,4")
    p.add_argument("--gpus-per-worker", type=float, default=0.0)
    p.add_argument("--cpus", type=int, default=None, help="local Ray instance's CPUs")
    p.add_argument("--model", default="conformer_nano_patch16")
    p.add_argument("--images", type=int, default=96)
    p.add_argument("--size", type=int, default=128, help="side of the synthetic images")
    p.add_argument("--input-size", type=int, default=128)
    p.add_argument("--scales", default="1.0,0.5,1.5,2.0")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or Path(tmp)
        synthetic = dict(size=args.size, val_fraction=0.0)
        warm = 2 * args.batch_size
        sets = {
            n: open_dataset(f"synthetic:{make_synthetic(root / str(n), n, **synthetic)}")
            for n in (warm, args.images)
        }
        names = sets[args.images].class_names
        ckpt = random_checkpoint(args.model, names, args.input_size, root / "model.pth")
        cfg = LabelConfig(
            scales=tuple(float(s) for s in args.scales.split(",")),
            input_size=args.input_size,
            batch_size=args.batch_size,
        )
        device = "cuda" if torch.cuda.is_available() else "cpu"
        gpus = args.gpus_per_worker

        def local(n: int, threads: int | None) -> Callable[[Path], Summary]:
            def run(out: Path) -> Summary:
                default = torch.get_num_threads()
                torch.set_num_threads(threads or default)
                try:
                    ex = create_extractor("torch", str(ckpt), device=device)
                    return label_dataset(sets[n], ex, out, cfg, progress=False)
                finally:
                    torch.set_num_threads(default)

            return run

        def on_ray(n: int, actors: int) -> Callable[[Path], Summary]:
            options = RayOptions(gpus_per_worker=gpus, workers=(actors, actors))
            spec = ExtractorSpec("torch", str(ckpt))
            return lambda out: label_dataset_ray(sets[n], spec, out, cfg, options, False)

        if args.address:
            ray.init(address=args.address)
        else:
            ray.init(num_cpus=args.cpus or max(args.actors) + 1, include_dashboard=False)
        local(warm, None)(root / "warm-local")
        on_ray(warm, 1)(root / "warm-ray")
        runs = {f"local, {torch.get_num_threads()} threads": local(args.images, None)}
        runs["local, 1 thread"] = local(args.images, 1)
        for a in args.actors:
            runs[f"ray, {a} actor{'s' if a > 1 else ''}"] = on_ray(args.images, a)
        rows = {
            name: _measure(run, root / f"out{k}", args.batch_size)
            for k, (name, run) in enumerate(runs.items())
        }
        cluster = ray.cluster_resources()
        ray.shutdown()

    ray_rows = {name: r for name, r in rows.items() if name.startswith("ray")}
    one, local1 = next(iter(ray_rows.values())), rows["local, 1 thread"]
    result = dict(
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        device=torch.cuda.get_device_name() if device == "cuda" else platform.machine(),
        cpu_count=os.cpu_count(),
        cluster=cluster,
        torch=torch.__version__,
        ray=ray.__version__,
        model=args.model,
        images=args.images,
        image_size=args.size,
        config=dict(
            input_size=cfg.input_size,
            scales=cfg.scales,
            flip=cfg.flip,
            batch_size=cfg.batch_size,
            gpus_per_worker=gpus,
        ),
        runs=rows,
        scaling={name: r["steady"] / one["steady"] for name, r in ray_rows.items()},
        ray_1_actor_vs_local_1_thread=dict(
            steady_ratio=one["steady"] / local1["steady"],
            extra_startup_seconds=one["startup_seconds"] - local1["startup_seconds"],
            end_to_end_ratio=one["end_to_end"] / local1["end_to_end"],
        ),
    )
    print(f"{'run':<18} {'wall s':>7} {'startup s':>9} {'steady img/s':>12} {'e2e img/s':>9}")
    for name, r in rows.items():
        print(
            f"{name:<18} {r['wall_seconds']:>7.1f} {r['startup_seconds']:>9.1f} "
            f"{r['steady']:>12.2f} {r['end_to_end']:>9.2f}"
        )
    print(json.dumps(dict(scaling=result["scaling"]) | result["ray_1_actor_vs_local_1_thread"]))
    args.out.mkdir(parents=True, exist_ok=True)
    tag = "cuda" if gpus > 0 else "cpu"
    (args.out / f"scale_{tag}.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

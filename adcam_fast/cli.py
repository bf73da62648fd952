"""The ``adcam`` command: label, eval, demo, make-synthetic, train-classifier,
train-segmenter, export, info."""

from __future__ import annotations

import argparse
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from adcam_fast.export.tensorrt import Profile
    from adcam_fast.pipeline.label import LabelConfig, Summary


def _info(args: argparse.Namespace) -> int:
    import timm
    import torch

    import adcam_fast
    from adcam_fast.kernels.launch import unusable

    print(f"adcam_fast {adcam_fast.__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__}, timm {timm.__version__}")
    cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    print(f"cuda device: {cuda}")
    problem = unusable()
    print(f"triton kernels: {'usable' if problem is None else f'not usable ({problem})'}")
    print(f"models: {', '.join(timm.list_models('conformer_*'))}")
    return 0


def _scales(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None


def _min_max(text: str) -> tuple[int, int]:
    """``MIN,MAX`` (or ``N`` for N,N) as two integers."""
    try:
        parts = [int(s) for s in text.split(",")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX or N, got {text!r}")
    return parts[0], parts[1]


def _add_label(sub) -> None:
    from adcam_fast.pipeline.label import LabelConfig
    from adcam_fast.pipeline.methods import METHODS

    d = LabelConfig()
    p = sub.add_parser("label", help="pseudo-label a collection")
    p.add_argument(
        "--data",
        required=True,
        help="voc:ROOT[:SPLIT] | coco:IMAGES:ANN.json | "
        "folder:DIR[:LABELS[:CLASSES]] | synthetic:ROOT[:SPLIT]",
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help="classifier checkpoint (.pth); with --backend onnx (onnxruntime) an exported "
        ".onnx, with tensorrt an engine or an .onnx (built into an engine for this run's "
        "batches and sides)",
    )
    p.add_argument("--out", required=True, type=Path, help="output folder (resumable)")
    p.add_argument(
        "--backend",
        default="torch",
        help="extractor: torch | onnx (or onnxruntime) | tensorrt",
    )
    p.add_argument(
        "--device", default=None, help="local engine; default: cuda if available, else cpu"
    )

    def field(flag: str, about: str = "", **kw) -> None:
        """An option of the LabelConfig field that ``flag`` names, its default said in its
        help."""
        default = getattr(d, flag.removeprefix("--").replace("-", "_"))
        shown = ",".join(f"{v:g}" for v in default) if isinstance(default, tuple) else default
        p.add_argument(flag, default=default, help=f"{about} (default {shown})".lstrip(), **kw)

    field("--method", choices=METHODS)
    field("--scales", type=_scales)
    p.add_argument("--no-flip", dest="flip", action="store_false", help="no flipped copies")
    field("--input-size", "square side at scale 1 (N = (side / 16)² tokens)", type=int)
    field("--k", "co-neighbours kept", type=int)
    field("--steps", "diffusion steps", type=int)
    field("--bg-threshold", type=float)
    field("--classes-from", choices=("labels", "predictions"))
    field("--pred-threshold", "class probability kept with --classes-from predictions", type=float)
    field("--adcam-backend", "auto: triton on CUDA, else torch",
          choices=("auto", "reference", "torch", "triton"))  # fmt: skip
    field("--batch-size", type=int)
    field("--workers", "local engine: DataLoader decode workers", type=int)
    field("--writers", "writer threads, per actor", type=int)
    field("--max-side", "longer sides are brought down to this on load", type=int)
    p.add_argument("--save-cams", dest="cams", action="store_true", help="write cams/<id>.npz")
    p.add_argument("--coco-json", dest="coco", action="store_true", help="write coco.json")
    p.add_argument("--overlays", action="store_true", help="write overlays/<id>.png")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="redo every image (a stopped overwrite is resumed by the command without it)",
    )
    p.add_argument(
        "--no-amp",
        dest="amp",
        action="store_false",
        help="no bf16 autocast (torch on CUDA), no float16 in a TensorRT build",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    ray = p.add_argument_group(
        "Ray engine",
        "--engine ray: decode in Ray CPU tasks, label and write in an autoscaling pool of "
        "actors (one model each). The collection, the checkpoint and --out must be at the "
        "same paths on every node (a shared filesystem).",
    )
    ray.add_argument("--engine", choices=("local", "ray"), default="local")
    ray.add_argument(
        "--address",
        default=None,
        help="auto | ray://HOST:PORT (default: $RAY_ADDRESS, else a local Ray instance)",
    )
    ray.add_argument(
        "--gpus-per-worker",
        type=float,
        default=None,
        help="GPUs per actor, 0 for CPU actors (default: 1 if the cluster has GPUs, else 0)",
    )
    ray.add_argument(
        "--cpus-per-worker", type=float, default=None, help="CPUs per actor (default: 1)"
    )
    ray.add_argument(
        "--ray-workers",
        type=_min_max,
        default=None,
        metavar="MIN,MAX",
        help="actor pool size (default: 1 to one per GPU, or to half the CPUs for CPU actors)",
    )
    p.set_defaults(func=_label)


def _label(args: argparse.Namespace) -> int:
    from adcam_fast.data import open_dataset
    from adcam_fast.pipeline.label import LabelConfig, tensorrt_profile

    cfg = LabelConfig(**{k: getattr(args, k) for k in LabelConfig.__dataclass_fields__})
    ray_only = ("address", "gpus_per_worker", "cpus_per_worker", "ray_workers")
    given = [f"--{name.replace('_', '-')}" for name in ray_only if getattr(args, name) is not None]
    if given and args.engine != "ray":
        raise ValueError(f"{', '.join(given)}: for --engine ray (this run is --engine local)")
    profile = None  # an engine built here takes exactly this run's batches and sides
    if args.backend == "tensorrt" and Path(args.checkpoint).suffix.lower() == ".onnx":
        profile = tensorrt_profile(cfg, args.checkpoint)
    if args.engine == "ray":
        summary = _label_ray(args, cfg, profile)
    else:
        import torch

        from adcam_fast.export.backends import create_extractor
        from adcam_fast.pipeline.label import label_dataset

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        extractor = create_extractor(args.backend, args.checkpoint, device, args.amp, profile)
        dataset = open_dataset(args.data, strict=False, max_side=cfg.max_side)
        summary = label_dataset(
            dataset,
            extractor,
            args.out,
            cfg,
            checkpoint=args.checkpoint,
            progress=not args.quiet,
            **_coco_ids(dataset),
        )
    print(
        f"{summary.written} written, {summary.skipped_complete} already complete, "
        f"{summary.failed} failed of {summary.total} in {summary.seconds:.1f} s "
        f"({summary.images_per_second:.1f} images/s) -> {args.out}"
    )
    if summary.failed:
        print(f"failures are listed in {args.out / summary.failures_file}", file=sys.stderr)
    if summary.interrupted:
        again = "without --overwrite" if cfg.overwrite else "again"
        print(f"interrupted: run the same command {again} to resume", file=sys.stderr)
        return 130
    return 1 if summary.failed else 0


def _label_ray(args: argparse.Namespace, cfg: LabelConfig, profile: Profile | None) -> Summary:
    """``adcam label --engine ray``: the actors' device follows ``--gpus-per-worker``."""
    from adcam_fast.data import open_dataset
    from adcam_fast.pipeline.ray_engine import ExtractorSpec, RayOptions, label_dataset_ray

    if args.device is not None:
        raise ValueError("--device is for --engine local; Ray actors use --gpus-per-worker")
    cpus = args.cpus_per_worker
    options = RayOptions(
        address=args.address,
        gpus_per_worker=args.gpus_per_worker,
        cpus_per_worker=RayOptions.cpus_per_worker if cpus is None else cpus,
        workers=args.ray_workers,
    )
    dataset = open_dataset(args.data, strict=False, max_side=cfg.max_side)
    return label_dataset_ray(
        dataset,
        ExtractorSpec(args.backend, str(args.checkpoint), args.amp, profile),
        args.out,
        cfg,
        options,
        progress=not args.quiet,
        **_coco_ids(dataset),
    )


def _coco_ids(dataset) -> dict:
    """COCO's own image and category ids, when the collection is COCO."""
    numeric = getattr(dataset, "image_ids", None)
    cats = getattr(dataset, "category_ids", None)
    return dict(
        numeric_ids=dict(zip(dataset.ids, numeric, strict=True)) if numeric else None,
        category_ids=list(cats) if cats else None,
    )


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="score masks (mIoU, FP, FN) against ground truth")
    p.add_argument("--pred", required=True, type=Path, help="output directory of adcam label")
    p.add_argument("--data", required=True)
    p.add_argument(
        "--sweep",
        action="store_true",
        help="also sweep the background threshold over the saved CAMs",
    )
    p.add_argument("--json", type=Path, default=None, help="default: PRED/eval.json")
    p.set_defaults(func=_eval)


def _eval(args: argparse.Namespace) -> int:
    from adcam_fast.data import open_dataset
    from adcam_fast.io import atomic_write_json, writable_file
    from adcam_fast.pipeline.evaluate import evaluate_masks, format_table, saved_maps, sweep_cams

    if not (args.pred / "masks").is_dir():
        raise ValueError(f"{args.pred}: no masks/ folder (--pred is the --out of adcam label)")
    if args.sweep:
        saved_maps(args.pred)
    out = writable_file(args.json or args.pred / "eval.json", "--json" if args.json else "--pred")
    dataset = open_dataset(args.data)
    if not len(dataset):
        raise ValueError(f"{args.data}: the collection is empty: nothing to score")
    names = ["background", *dataset.class_names]
    scores, missing = evaluate_masks(args.pred, dataset)
    result = dict(masks=scores.as_dict(names), missing=missing)
    rows = {"masks": scores}
    if args.sweep:
        thr, best, curve, no_maps = sweep_cams(args.pred, dataset)
        result["sweep"] = dict(
            best_threshold=thr, best=best.as_dict(names), curve=curve, missing=no_maps
        )
        rows[f"cams @ {thr:.2f}"] = best
        if no_maps:
            print(f"{len(no_maps)} images had no maps (seeds as background)", file=sys.stderr)
    print(format_table(rows))
    if missing:
        print(f"{len(missing)} images had no mask (scored as background)", file=sys.stderr)
    atomic_write_json(out, result)
    print(f"-> {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adcam", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_label(sub)
    _add_eval(sub)
    from adcam_fast.data.synthetic import add_make_synthetic_arguments, run_make_synthetic

    synth = sub.add_parser("make-synthetic", help="write the synthetic collection (VOC layout)")
    add_make_synthetic_arguments(synth)
    synth.set_defaults(func=run_make_synthetic)
    from adcam_fast import demo
    from adcam_fast.export import command as export_command
    from adcam_fast.training import classifier, segmenter

    for name, module, text in (
        ("train-classifier", classifier, "train the multi-label Conformer classifier"),
        ("train-segmenter", segmenter, "train the segmenter on pseudo-masks"),
    ):
        cmd = sub.add_parser(name, help=text)
        module.add_arguments(cmd)
        cmd.set_defaults(func=module.run)

    demo_parser = sub.add_parser("demo", help="the whole pipeline on a synthetic set, on CPU")
    demo.add_arguments(demo_parser)
    demo_parser.set_defaults(func=demo.run)
    export_parser = sub.add_parser(
        "export", help="export the extractor or the segmenter to ONNX / TensorRT"
    )
    export_command.add_arguments(export_parser)
    export_parser.set_defaults(func=export_command.run)
    info = sub.add_parser("info", help="versions, devices and available backends")
    info.set_defaults(func=_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:
        print(f"adcam {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""``adcam export``: a classifier or segmenter checkpoint to ONNX, or to a TensorRT engine.

    adcam export --checkpoint best.pth --what extractor --format onnx --out extractor.onnx
    adcam export --checkpoint best.pth --what extractor --format tensorrt --fp16 \\
        --out extractor.engine            # also writes extractor.onnx and extractor.engine.json

``--format onnx`` exports (see :mod:`adcam_fast.export.onnx`), checks and, unless
``--no-verify``, compares ONNX Runtime with PyTorch at two input shapes. ``--format tensorrt``
exports the float32 ONNX next to ``--out`` (or takes ``--checkpoint X.onnx`` as it is) and
builds the engine (see :mod:`adcam_fast.export.tensorrt`; that path has not been run here).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from adcam_fast.export.onnx import (
    DEFAULT_OPSET,
    EXPORTERS,
    KINDS,
    expect_kind,
    export_checkpoint,
    read_info,
)
from adcam_fast.io import writable_file


def _triple(text: str) -> tuple[int, int, int]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected MIN,OPT,MAX integers, got {text!r}")
    return values  # type: ignore[return-value]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``adcam export`` arguments."""
    parser.add_argument(
        "--checkpoint",
        required=True,
        type=Path,
        help="classifier or segmenter checkpoint (.pth); with --format tensorrt also an "
        "exported .onnx",
    )
    parser.add_argument("--what", choices=KINDS, default="extractor")
    parser.add_argument("--format", choices=("onnx", "tensorrt"), default="onnx")
    parser.add_argument("--out", required=True, type=Path, help=".onnx or .engine file")
    parser.add_argument(
        "--fp16",
        action="store_true",
        help="onnx: body in float16 (outputs float32); tensorrt: allow float16 layers "
        "(softmax, LayerNorm and the attention/CAM outputs stay float32)",
    )
    parser.add_argument("--exporter", choices=EXPORTERS, default="torchscript")
    parser.add_argument(
        "--opset", type=int, default=DEFAULT_OPSET, help="17 up to the exporter's newest"
    )
    parser.add_argument(
        "--with-labels",
        action="store_true",
        help="segmenter: also output the argmax labels at the input size",
    )
    parser.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="skip the ONNX Runtime vs PyTorch comparison",
    )
    trt = parser.add_argument_group("tensorrt")
    trt.add_argument("--batch", type=_triple, default=(1, 16, 32), help="MIN,OPT,MAX batch")
    trt.add_argument(
        "--sizes",
        type=_triple,
        default=None,
        help="MIN,OPT,MAX square image side (default: half, one and two times the input size)",
    )
    trt.add_argument("--cache-dir", type=Path, default=None, help="timing cache and engines")
    trt.add_argument("--workspace-gib", type=float, default=None)


def run(args: argparse.Namespace) -> int:
    """Run ``adcam export``; returns the exit status. Raises ValueError (and its subclass
    :class:`~adcam_fast.export.onnx.MissingDependencyError`) for unusable inputs."""
    if args.format == "onnx":
        info, errors = export_checkpoint(
            args.checkpoint,
            args.what,
            args.out,
            fp16=args.fp16,
            exporter=args.exporter,
            opset=args.opset,
            with_labels=args.with_labels,
            verify=args.verify,
        )
        size = "dynamic size" if info.dynamic_size else f"fixed size {info.input_size}"
        print(
            f"{args.out}: {info.kind} of {info.model}, {len(info.class_names)} classes, "
            f"{info.precision}, {size}, opset {info.opset}, {info.exporter} exporter"
        )
        if errors:
            worst = ", ".join(f"{k} {v:.2g}" for k, v in errors.items())
            print(f"ONNX Runtime vs PyTorch (worst of two input shapes): {worst}")
        return 0

    from adcam_fast.export.tensorrt import Profile, build_engine, import_tensorrt

    import_tensorrt()  # before a possibly long export
    if args.out.suffix == ".onnx":
        raise ValueError(f"--out {args.out}: a TensorRT engine needs another suffix (.engine)")
    writable_file(args.out, "--out")
    if args.checkpoint.suffix == ".onnx":
        onnx_path = args.checkpoint
    else:
        onnx_path = args.out.with_suffix(".onnx")
        export_checkpoint(
            args.checkpoint,
            args.what,
            onnx_path,
            exporter=args.exporter,
            opset=args.opset,
            with_labels=args.with_labels,
            verify=args.verify,
        )
    info = read_info(onnx_path)
    expect_kind(info, args.what, onnx_path)
    profile = Profile.for_info(info, args.batch, args.sizes)
    engine = build_engine(
        onnx_path,
        args.out,
        profile,
        fp16=args.fp16,
        cache_dir=args.cache_dir,
        workspace_gib=args.workspace_gib,
    )
    print(f"{engine}: TensorRT engine of {onnx_path}, profile {profile}, fp16 {args.fp16}")
    return 0

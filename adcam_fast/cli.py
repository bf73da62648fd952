"""The ``adcam`` command."""

from __future__ import annotations

import argparse
import platform
import sys
from collections.abc import Sequence


def _info(args: argparse.Namespace) -> int:
    import timm
    import torch

    import adcam_fast
    from adcam_fast.kernels import triton_available

    print(f"adcam_fast {adcam_fast.__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__}, timm {timm.__version__}")
    cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    print(f"cuda device: {cuda}")
    print(f"triton kernels usable: {triton_available()}")
    print(f"models: {', '.join(timm.list_models('conformer_*'))}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adcam", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions, devices and available backends")
    info.set_defaults(func=_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

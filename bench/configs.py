"""``--topk-config`` of bench/kernels.py and bench/profile_kernels.py: a top-k `Config`."""

from __future__ import annotations

import dataclasses

from adcam_fast.kernels.coneighbor_topk import check_config
from adcam_fast.kernels.launch import Config


def topk_config(text: str, kp: int) -> Config:
    """A `Config` from ``field=value,...`` (integers; booleans as 0 or 1; the other fields at
    their defaults) that the top-k kernel can run for a running top-``kp``
    (`coneighbor_topk.check_config`); SystemExit naming the item or field that is wrong."""
    fields = {f.name: f.type for f in dataclasses.fields(Config)}  # types as strings
    kwargs = {}
    for item in text.split(","):
        name, _, value = item.partition("=")
        if name not in fields or not value.isdigit():
            raise SystemExit(f"--topk-config: {item!r} is not FIELD=INTEGER with FIELD one of "
                             f"{', '.join(fields)}")  # fmt: skip
        kwargs[name] = bool(int(value)) if fields[name] == "bool" else int(value)
    config = Config(**kwargs)
    try:
        check_config(config, kp)
    except ValueError as e:
        raise SystemExit(f"--topk-config: {e}") from None
    return config


def config_text(config: Config) -> str:
    """The ``field=value,...`` form of ``config`` that `topk_config` reads back."""
    return ",".join(f"{f.name}={int(getattr(config, f.name))}" for f in dataclasses.fields(config))

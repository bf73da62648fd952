"""Training checkpoints: atomic save, validated load, RNG state, and model loaders.

A checkpoint is a ``torch.save``'d dict (readable with ``torch.load(weights_only=True)``):

========================  ===================================================================
``format``                ``"adcam_fast.classifier"`` or ``"adcam_fast.segmenter"``
``version``               :data:`VERSION`
``model``                 the model's ``state_dict()`` (unwrapped: no DDP ``module.`` prefix)
``config``                what rebuilds the model and its input pipeline (see below)
``class_names``           the K foreground class names (segmenter class c + 1 = name c)
``epoch``                 completed epochs
``iteration``             completed optimiser steps
``metrics``               validation results of that epoch (``{}`` without validation)
``best``                  ``{"metric": name, "value": float or None, "epoch": int or None}``
``recipe``                the hyper-parameters a resumed run must share
``optimizer``             ``optimizer.state_dict()``          (``last.pth`` only)
``scheduler``             ``LambdaLR.state_dict()``           (``last.pth`` only)
``rng``                   :func:`rng_state` at the end of the epoch (``last.pth`` only)
========================  ===================================================================

``config`` of a classifier: ``model`` (timm name), ``num_classes``, ``drop_last_block``,
``detach_branches``, ``crop``, ``mean``, ``std``. Of a segmenter: ``backbone``,
``num_classes`` (K + 1, background included), ``output_stride``, ``crop``, ``mean``, ``std``.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from torch import nn

from adcam_fast.io import atomic_write
from adcam_fast.models.conformer import Conformer
from adcam_fast.models.segmenter import Segmenter
from adcam_fast.training.augment import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "CLASSIFIER",
    "SEGMENTER",
    "VERSION",
    "classifier_config",
    "classifier_from_config",
    "load_checkpoint",
    "load_classifier",
    "load_segmenter",
    "read_weights",
    "rng_state",
    "save_checkpoint",
    "save_classifier",
    "segmenter_from_config",
    "set_rng_state",
]

CLASSIFIER = "adcam_fast.classifier"
SEGMENTER = "adcam_fast.segmenter"
VERSION = 1
_REQUIRED = ("model", "config", "class_names")


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """``torch.save(state)`` to ``path`` atomically: a temporary sibling is written, fsynced
    and renamed over ``path``, so a crash mid-save leaves the previous file intact."""
    return atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(
    path: str | os.PathLike[str], kind: str, map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Load a checkpoint of format ``kind`` (:data:`CLASSIFIER` or :data:`SEGMENTER`).

    Uses ``torch.load(weights_only=True)``: no code in the file runs. Raises ValueError naming
    the file when it is missing, unreadable or corrupt, not a checkpoint of ``kind``, or of a
    newer version.
    """
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch.load raises many types for bad files
        raise ValueError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from e
    found = ckpt.get("format") if isinstance(ckpt, dict) else None
    if found != kind:
        what = f"a {found!r} checkpoint" if found else "not an adcam_fast checkpoint"
        raise ValueError(f"{path}: {what}, expected format {kind!r}")
    if not isinstance(ckpt.get("version"), int) or ckpt["version"] > VERSION:
        raise ValueError(f"{path}: checkpoint version {ckpt.get('version')!r} is not supported")
    missing = [k for k in _REQUIRED if k not in ckpt]
    if missing:
        raise ValueError(f"{path}: corrupt checkpoint, missing {missing}")
    return ckpt


def read_weights(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The state dict in a weights file (``.pth``/``.pt``/``.bin`` through
    ``torch.load(weights_only=True)``, or ``.safetensors``), as timm reads it: a
    ``state_dict``/``model`` wrapper is unwrapped and a DDP ``module.`` prefix stripped.
    Raises ValueError naming the file when it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        return timm.models.load_state_dict(str(path))
    except Exception as e:  # torch.load / safetensors raise many types for bad files
        raise ValueError(f"{path}: cannot read weights ({type(e).__name__}: {e})") from e


def classifier_config(
    model: str, num_classes: int, crop: int, drop_last_block: bool = True
) -> dict[str, Any]:
    """The ``config`` of a classifier checkpoint: timm ``model`` with the paper's
    stop-gradient (``detach_branches``), trained on ``crop``² crops with ImageNet mean/std."""
    return {
        "model": model,
        "num_classes": num_classes,
        "drop_last_block": drop_last_block,
        "detach_branches": True,
        "crop": crop,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
    }


def save_classifier(
    model: nn.Module, config: dict[str, Any], class_names: list[str], path: str | os.PathLike[str]
) -> Path:
    """Save ``model`` as an untrained (epoch 0) classifier checkpoint that
    :func:`load_classifier` reads: what tests and benchmarks label with."""
    state = {
        "format": CLASSIFIER,
        "version": VERSION,
        "model": model.state_dict(),
        "config": config,
        "class_names": list(class_names),
        "epoch": 0,
        "iteration": 0,
    }
    return save_checkpoint(state, path)


def classifier_from_config(config: dict[str, Any]) -> Conformer:
    """A freshly initialised Conformer classifier as ``config`` describes it."""
    return timm.create_model(
        config["model"],
        num_classes=config["num_classes"],
        drop_last_block=config["drop_last_block"],
        detach_branches=config["detach_branches"],
    )


def segmenter_from_config(config: dict[str, Any]) -> Segmenter:
    """A freshly initialised :class:`Segmenter` as ``config`` describes it."""
    return Segmenter(config["backbone"], config["num_classes"], config["output_stride"])


def _load_model(
    path: str | os.PathLike[str], kind: str, build: Any, device: str | torch.device
) -> tuple[nn.Module, dict[str, Any]]:
    ckpt = load_checkpoint(path, kind)
    try:
        model = build(ckpt["config"])
        model.load_state_dict(ckpt["model"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise ValueError(f"{path}: corrupt checkpoint ({type(e).__name__}: {e})") from e
    meta = {
        k: ckpt.get(k) for k in ("config", "class_names", "epoch", "iteration", "metrics", "best")
    }
    return model.to(device).eval(), meta


def load_classifier(
    path: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> tuple[Conformer, dict[str, Any]]:
    """Rebuild the trained classifier of a checkpoint, in eval mode on ``device``.

    Returns ``(model, meta)``; ``meta`` holds ``config`` (model name, num_classes, crop, mean,
    std, ...), ``class_names``, ``epoch``, ``iteration``, ``metrics`` and ``best``. Raises
    ValueError naming the file when it is not a classifier checkpoint or is corrupt.
    """
    return _load_model(path, CLASSIFIER, classifier_from_config, device)


def load_segmenter(
    path: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> tuple[Segmenter, dict[str, Any]]:
    """Rebuild the trained segmenter of a checkpoint, in eval mode on ``device``; ``meta`` as
    :func:`load_classifier` (``config["num_classes"]`` counts the background). Raises
    ValueError naming the file when it is not a segmenter checkpoint or is corrupt."""
    return _load_model(path, SEGMENTER, segmenter_from_config, device)


def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """The Python, NumPy (legacy global) and torch CPU RNG states, and the CUDA ``device``'s
    (when it is one and CUDA is initialised), in a form ``torch.load(weights_only=True)``
    accepts."""
    name, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002 (saved as is)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if device is not None and device.type == "cuda" and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Restore what :func:`rng_state` captured; the CUDA state onto the CUDA ``device``, when
    both sides have one."""
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    state_np = (name, keys.numpy().astype(np.uint32), pos, has_gauss, cached)
    np.random.set_state(state_np)  # noqa: NPY002 (the legacy global RNG is what user code sees)
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is None or device is None or device.type != "cuda":
        return
    if isinstance(cuda, list):  # older checkpoints hold every visible GPU's state
        index = torch.cuda.current_device() if device.index is None else device.index
        if index >= len(cuda):
            return
        cuda = cuda[index]
    torch.cuda.set_rng_state(cuda, device)

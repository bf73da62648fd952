"""The training loop shared by ``adcam train-classifier`` and ``adcam train-segmenter``.

A task (classifier or segmenter) builds its datasets, model, optimiser and scheduler with the
helpers here, describes itself as a :class:`Task` and calls :func:`fit`, which owns
everything the two share: devices and DDP, the epoch loop, AMP, progress, validation,
checkpoints, resume and the JSON-lines log.

Reproducibility contract (single process, CPU): a run is a function of its arguments.

* Augmentation draws from ``numpy.random.default_rng((seed, epoch, index))`` per item
  (:class:`TransformedDataset`), so it does not depend on workers or order.
* The shuffle order is ``DistributedSampler``'s (a function of ``(seed, epoch)``), also
  with one process; the DataLoader's own generator (which seeds the workers) is reseeded
  from ``(seed, epoch)`` each epoch, so no loader touches the global RNGs.
* The global Python / NumPy / torch RNGs (dropout, drop-path) are seeded once and saved in
  every ``last.pth``; ``--resume`` restores them with the model, optimiser and scheduler,
  so training resumed at an epoch boundary ends with the same weights as an uninterrupted
  run. (With DDP, rank 0 restores the saved state and every other rank is seeded afresh
  with ``seed + rank + world_size · epoch``: ranks keep distinct dropout and drop-path
  streams, and a resumed DDP run is reproducible but not bitwise the uninterrupted one.)

Distributed: launched by ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) the process
group is set up from the environment (NCCL on CUDA, gloo on CPU), each rank trains on its
``DistributedSampler`` shard with ``DistributedDataParallel``, and only rank 0 validates and
writes files (the others wait at a barrier).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from adcam_fast.data import Sample
from adcam_fast.training.checkpoint import (
    VERSION,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)

__all__ = [
    "DistInfo",
    "Task",
    "TransformedDataset",
    "add_common_arguments",
    "autocast",
    "base_recipe",
    "check_train_loader",
    "fit",
    "init_distributed",
    "launch",
    "make_evaluator",
    "make_loader",
    "open_collections",
    "param_groups",
    "prepare_model",
    "seed_everything",
    "to_device",
    "train_step",
]

DIST_TIMEOUT = timedelta(hours=2)
"""Collective timeout: the other ranks wait at a barrier while rank 0 validates and writes
checkpoints (full-resolution validation of a large set takes far longer than the default
10 minutes)."""

LossFn = Callable[[nn.Module, dict[str, Tensor]], Tensor]
"""``loss(model, batch)``: the scalar training loss of one batch already on the device."""


@dataclass(frozen=True)
class DistInfo:
    """Where this process runs: ``rank`` of ``world_size`` (1 without torchrun)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        """Whether this process validates, logs and writes files (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | None = None) -> DistInfo:
    """Read torchrun's environment and set up the process group when ``WORLD_SIZE`` > 1.

    ``device``: ``"cpu"``, ``"cuda"`` or None (CUDA when available). Under torchrun a CUDA
    rank uses ``cuda:LOCAL_RANK`` and NCCL; a CPU rank uses gloo.
    """
    kind = device or ("cuda" if torch.cuda.is_available() else "cpu")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo(0, 1, 0, torch.device(kind))
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.device(kind).type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl", device_id=dev, timeout=DIST_TIMEOUT)
    else:
        dev = torch.device(kind)
        dist.init_process_group(backend="gloo", timeout=DIST_TIMEOUT)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's legacy global and torch's (all devices) RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 (the legacy global RNG is what user code sees)
    torch.manual_seed(seed)


def _seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: derive the worker's NumPy / Python seeds from the seed
    torch gave it (itself from the loader's generator)."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)  # noqa: NPY002
    random.seed(seed)


class TransformedDataset(Dataset):
    """Applies ``transform(image, mask, rng)`` to a dataset of :class:`Sample`.

    Items are dicts of tensors: ``image`` always, ``labels`` ((K,) float32) and ``mask``
    ((h, w) int64) when the sample has them. ``require`` names fields every sample must have
    (``"labels"``, ``"mask"``); a sample without one raises ValueError naming it, and the
    first item is checked at construction so a collection without them fails early.
    ``rng`` is ``numpy.random.default_rng((seed, epoch, index))``; call :meth:`set_epoch`
    before creating each epoch's iterator (workers are not persistent, so they receive the
    updated epoch).
    """

    def __init__(
        self,
        base: Dataset,
        transform: Callable[..., tuple[Tensor, Tensor | None]],
        seed: int = 0,
        require: Iterable[str] = (),
    ) -> None:
        self.base = base
        self.transform = transform
        self.seed = seed
        self.require = tuple(require)
        self.epoch = 0
        if self.require and len(base):
            self[0]  # raises ValueError when a required field is missing

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        sample: Sample = self.base[index]
        for name in self.require:
            if getattr(sample, name) is None:
                raise ValueError(f"item {sample.id!r} has no {name}")
        rng = np.random.default_rng((self.seed, self.epoch, index))
        image, mask = self.transform(sample.image, sample.mask, rng)
        item = {"image": image}
        if sample.labels is not None:
            item["labels"] = torch.from_numpy(sample.labels)
        if mask is not None:
            item["mask"] = mask
        return item


def make_loader(
    dataset: Dataset,
    batch_size: int,
    workers: int,
    dist_info: DistInfo,
    seed: int,
    train: bool,
) -> DataLoader:
    """A DataLoader with an explicit generator and worker seeding.

    ``train``: shuffled by a ``DistributedSampler`` over ``dist_info``'s ranks (seed ``seed``)
    and incomplete last batches dropped (BatchNorm needs > 1 item). Otherwise: in order, all
    items, in this process only (validation runs on rank 0).
    """
    sampler = (
        DistributedSampler(
            dataset, num_replicas=dist_info.world_size, rank=dist_info.rank, seed=seed
        )
        if train
        else None
    )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        num_workers=workers,
        pin_memory=dist_info.device.type == "cuda",
        drop_last=train,
        worker_init_fn=_seed_worker,
        generator=torch.Generator().manual_seed(seed),
    )


def check_train_loader(loader: DataLoader, dist_info: DistInfo) -> int:
    """Batches per epoch; raises ValueError when the training set gives none."""
    if len(loader) == 0:
        raise ValueError(
            f"the training set has {len(loader.dataset)} items: fewer than one batch of "
            f"{loader.batch_size} per process ({dist_info.world_size} processes)"
        )
    return len(loader)


def param_groups(
    model: nn.Module, split: dict[str, list[nn.Parameter]], weight_decay: float
) -> list[dict[str, Any]]:
    """Optimiser groups: for each named part of ``split`` (in its order), one group with
    weight decay (tensors of >= 2 dims) and one without (biases, norm weights, and the
    names in ``model.no_weight_decay()`` if defined); empty groups are left out.

    Each group carries ``"name"`` (the part) and ``"weight_decay"``; the caller sets ``lr``.
    """
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    names = {id(p): n for n, p in model.named_parameters()}
    groups: list[dict[str, Any]] = []
    for part, params in split.items():
        decay = [p for p in params if p.ndim >= 2 and names[id(p)] not in skip]
        plain = [p for p in params if not (p.ndim >= 2 and names[id(p)] not in skip)]
        for ps, wd in ((decay, weight_decay), (plain, 0.0)):
            if ps:
                groups.append({"params": ps, "name": part, "weight_decay": wd})
    return groups


def prepare_model(model: nn.Module, dist_info: DistInfo) -> nn.Module:
    """Move ``model`` to the device (channels-last on CUDA); returns it."""
    if dist_info.device.type == "cuda":
        return model.to(dist_info.device, memory_format=torch.channels_last)
    return model.to(dist_info.device)


def autocast(device: torch.device, amp: bool) -> AbstractContextManager:
    """bf16 autocast on CUDA when ``amp``; a no-op context otherwise."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda")


def to_device(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """Move a batch to ``device`` (images channels-last on CUDA)."""
    out = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    if device.type == "cuda":
        out["image"] = out["image"].contiguous(memory_format=torch.channels_last)
    return out


def train_step(
    model: nn.Module,
    batch: dict[str, Tensor],
    loss_fn: LossFn,
    optimizer: Optimizer,
    scheduler: LambdaLR,
    amp: bool = True,
) -> Tensor:
    """One optimiser step on a batch already on the device; returns the detached loss."""
    device = batch["image"].device
    with autocast(device, amp):
        loss = loss_fn(model, batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()
    return loss.detach()


@dataclass
class Task:
    """What :func:`fit` trains.

    kind: checkpoint format (:data:`~training.checkpoint.CLASSIFIER` / ``SEGMENTER``).
    evaluate: ``evaluate(model) -> {metric: float}`` on the unwrapped model in eval mode under
        ``torch.no_grad``, run on rank 0 after each epoch; None without validation data.
    best_metric: the key of ``evaluate``'s result that picks ``best.pth`` (higher is better).
    config / class_names: stored in every checkpoint (see :mod:`training.checkpoint`).
    recipe: hyper-parameters a ``--resume`` must match exactly (JSON-serialisable).
    """

    kind: str
    model: nn.Module
    optimizer: Optimizer
    scheduler: LambdaLR
    loss_fn: LossFn
    train_loader: DataLoader
    config: dict[str, Any]
    class_names: list[str]
    recipe: dict[str, Any]
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None
    best_metric: str = ""


def add_common_arguments(
    parser: argparse.ArgumentParser, *, epochs: int, batch_size: int, crop: int
) -> None:
    """Arguments every training command takes (defaults of the per-task recipe given)."""
    parser.add_argument("--data", required=True, help="training collection SPEC (see adcam label)")
    parser.add_argument("--val-data", default=None, help="validation collection SPEC (optional)")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--init", type=Path, default=None, help="ImageNet weights to start from")
    parser.add_argument("--epochs", type=int, default=epochs, help=f"default {epochs}")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=batch_size,
        help=f"images per step and process (default {batch_size})",
    )
    parser.add_argument("--crop", type=int, default=crop, help=f"crop side (default {crop})")
    parser.add_argument("--workers", type=int, default=4, help="loader processes (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="default 0")
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    parser.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="bf16 autocast on CUDA (default on)",
    )
    parser.add_argument("--resume", action="store_true", help="continue from OUT/last.pth")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or epoch lines")


def open_collections(
    args: argparse.Namespace, dist_info: DistInfo
) -> tuple[Dataset, Dataset | None]:
    """Open ``--data`` and, on rank 0, ``--val-data`` (None otherwise); raises ValueError when
    their class lists differ."""
    from adcam_fast.data import open_dataset

    train = open_dataset(args.data)
    if not (args.val_data and dist_info.main):
        return train, None
    val = open_dataset(args.val_data)
    if not len(val):
        raise ValueError(f"--val-data {args.val_data!r} holds no images")
    if list(val.class_names) != list(train.class_names):
        raise ValueError(f"--val-data {args.val_data!r} has other classes than --data")
    return train, val


def make_evaluator(
    evaluate: Callable[..., dict[str, float]],
    val: Dataset | None,
    transform: Callable[..., tuple[Tensor, Tensor | None]],
    require: str,
    batch_size: int,
    args: argparse.Namespace,
    dist_info: DistInfo,
) -> Callable[[nn.Module], dict[str, float]] | None:
    """``model -> evaluate(model, loader, device, amp)`` over ``val`` (None without it)."""
    if val is None:
        return None
    val_set = TransformedDataset(val, transform, args.seed, (require,))
    loader = make_loader(val_set, batch_size, args.workers, dist_info, args.seed, False)
    return partial(evaluate, loader=loader, device=dist_info.device, amp=args.amp)


def base_recipe(args: argparse.Namespace, dist_info: DistInfo) -> dict[str, Any]:
    """The settings every task's ``--resume`` must match; tasks add their own."""
    return {
        "data": args.data,
        "val_data": args.val_data,
        "init": None if args.init is None else str(args.init),
        **{k: getattr(args, k) for k in ("epochs", "batch_size", "crop", "seed", "amp")},
        "world_size": dist_info.world_size,
        "device": dist_info.device.type,
    }


def _by(metric: str) -> str:
    return f"by {metric}" if metric else "as the last epoch"


def _restore(task: Task, path: Path, device: torch.device) -> tuple[int, dict[str, Any]]:
    ckpt = load_checkpoint(path, task.kind)
    if "optimizer" not in ckpt:
        raise ValueError(f"{path}: holds no training state to resume from")
    saved = ckpt["recipe"]  # settings it did not record (an older version's) are not compared
    diff = {k: (saved[k], v) for k, v in task.recipe.items() if k in saved and saved[k] != v}
    if diff:
        raise ValueError(f"{path}: --resume with other settings (saved, now): {diff}")
    if ckpt["class_names"] != task.class_names:
        raise ValueError(
            f"{path}: --resume with other classes: saved {ckpt['class_names']}, "
            f"now {task.class_names}"
        )
    chosen_by = task.best_metric if task.evaluate else ""
    if ckpt["best"]["metric"] != chosen_by:  # an older checkpoint's recipe may not say
        raise ValueError(
            f"{path}: --resume {'with' if chosen_by else 'without'} validation data, but "
            f"best.pth was chosen {_by(ckpt['best']['metric'])} so far, not {_by(chosen_by)}"
        )
    task.model.load_state_dict(ckpt["model"])
    task.optimizer.load_state_dict(ckpt["optimizer"])
    task.scheduler.load_state_dict(ckpt["scheduler"])
    set_rng_state(ckpt["rng"], device)
    return ckpt["epoch"], ckpt["best"]


def _run_epoch(
    task: Task, model: nn.Module, epoch: int, args: argparse.Namespace, dist_info: DistInfo
) -> dict[str, float]:
    loader = task.train_loader
    loader.sampler.set_epoch(epoch)
    loader.dataset.set_epoch(epoch)
    loader.generator.manual_seed(args.seed * 100_003 + epoch)
    task.model.train()
    total = torch.zeros((), device=dist_info.device)
    steps = 0
    start = time.perf_counter()
    bar = tqdm(
        loader,
        desc=f"epoch {epoch + 1}/{args.epochs}",
        unit="batch",
        dynamic_ncols=True,
        disable=args.quiet or not dist_info.main,
    )
    for batch in bar:
        batch = to_device(batch, dist_info.device)
        total += train_step(model, batch, task.loss_fn, task.optimizer, task.scheduler, args.amp)
        steps += 1
        if not bar.disable and (steps % 10 == 0 or steps == len(loader)):
            seen = steps * loader.batch_size * dist_info.world_size
            rate = seen / (time.perf_counter() - start)
            bar.set_postfix(loss=f"{total.item() / steps:.4f}", img_s=f"{rate:.1f}")
    if dist_info.distributed:
        dist.all_reduce(total)
    seconds = time.perf_counter() - start
    return {
        "train_loss": total.item() / (steps * dist_info.world_size),
        "images_per_s": steps * loader.batch_size * dist_info.world_size / seconds,
        "seconds": seconds,
    }


def _improved(best: dict[str, Any], metrics: dict[str, float]) -> bool:
    """Whether this epoch becomes ``best.pth``: always without a metric; otherwise when the
    metric beats the best so far. A NaN best (no positives yet, or a diverged model) is
    beaten by anything; a NaN metric never beats a number."""
    if not best["metric"]:
        return True
    old = best["value"]
    return old is None or math.isnan(old) or metrics[best["metric"]] > old


def fit(task: Task, args: argparse.Namespace, dist_info: DistInfo) -> int:
    """Train ``task`` for ``args.epochs`` epochs (continuing ``OUT/last.pth`` with
    ``args.resume``), validating and checkpointing after each; returns 0.

    Uses ``args``: ``out``, ``epochs``, ``seed``, ``amp``, ``resume``, ``quiet``. Per epoch,
    rank 0 writes ``OUT/last.pth`` (full training state; with validation twice, before it
    and then with its metrics, so that a failed validation loses no epoch), ``OUT/best.pth``
    (model only, when ``best_metric`` improved; every epoch without validation) and a line
    in ``OUT/log.jsonl``.
    """
    out: Path = args.out
    start_epoch = 0
    best: dict[str, Any] = {
        "metric": task.best_metric if task.evaluate else "",
        "value": None,
        "epoch": None,
    }
    if args.resume:
        start_epoch, best = _restore(task, out / "last.pth", dist_info.device)
        if dist_info.rank > 0:  # the saved streams are rank 0's
            seed_everything(args.seed + dist_info.rank + dist_info.world_size * start_epoch)
    model: nn.Module = task.model
    if dist_info.distributed:
        ids = [dist_info.device.index] if dist_info.device.type == "cuda" else None
        model = DistributedDataParallel(task.model, device_ids=ids)
    if dist_info.main:
        out.mkdir(parents=True, exist_ok=True)

    for epoch in range(start_epoch, args.epochs):
        stats = _run_epoch(task, model, epoch, args, dist_info)
        if dist_info.main:
            state = {
                "format": task.kind,
                "version": VERSION,
                "model": task.model.state_dict(),
                "config": task.config,
                "class_names": task.class_names,
                "epoch": epoch + 1,
                "iteration": task.scheduler.last_epoch,
                "metrics": {},
                "best": best,
                "recipe": task.recipe,
                "optimizer": task.optimizer.state_dict(),
                "scheduler": task.scheduler.state_dict(),
                "rng": rng_state(dist_info.device),
            }
            metrics: dict[str, float] = {}
            if task.evaluate is not None:
                save_checkpoint(state, out / "last.pth")  # the epoch, whatever validation does
                task.model.eval()
                with torch.no_grad():
                    metrics = {k: float(v) for k, v in task.evaluate(task.model).items()}
                task.model.train()
            if _improved(best, metrics):
                best = {
                    **best,
                    "epoch": epoch + 1,
                    "value": metrics[best["metric"]] if best["metric"] else None,
                }
                model_only = ("optimizer", "scheduler", "rng")
                weights = {k: v for k, v in state.items() if k not in model_only}
                save_checkpoint(weights | dict(metrics=metrics, best=best), out / "best.pth")
            save_checkpoint(state | dict(metrics=metrics, best=best), out / "last.pth")
            lrs = {f"lr_{g['name']}": g["lr"] for g in task.optimizer.param_groups}
            record = {
                "epoch": epoch + 1,
                "iteration": task.scheduler.last_epoch,
                **stats,
                **lrs,
                **metrics,
            }
            with open(out / "log.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            if not args.quiet:
                shown = ", ".join(f"{k} {v:.4g}" for k, v in record.items() if k != "epoch")
                tqdm.write(f"epoch {epoch + 1}/{args.epochs}: {shown}")
        if dist_info.distributed:
            dist.barrier()
    return 0


def launch(
    args: argparse.Namespace, build_task: Callable[[argparse.Namespace, DistInfo], Task]
) -> int:
    """The body of a training command: set up the process (group) from the environment, seed
    (``args.seed + rank``), build the task, :func:`fit` it, and tear the group down."""
    for name in ("epochs", "batch_size", "crop"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    for name in ("lr", "lr_cnn", "lr_vit", "head_lr_mult", "weight_decay"):
        value = getattr(args, name, None)  # the task's own rates, where it has them
        if value is None:
            continue
        zero_ok = name == "weight_decay"
        if not (math.isfinite(value) and (value >= 0 if zero_ok else value > 0)):
            bound = ">= 0" if zero_ok else "> 0"
            raise ValueError(f"--{name.replace('_', '-')} must be finite and {bound}, got {value}")
    if not args.resume and (args.out / "last.pth").exists():
        raise ValueError(f"{args.out / 'last.pth'} exists: pass --resume or another --out")
    dist_info = init_distributed(args.device)
    try:
        seed_everything(args.seed + dist_info.rank)
        return fit(build_task(args, dist_info), args, dist_info)
    finally:
        if dist_info.distributed:
            dist.destroy_process_group()

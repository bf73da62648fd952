"""Segmenter training on pseudo-masks (``adcam train-segmenter``), DeepLab v2 conventions.

Data: the images of ``--data`` with the masks ``--masks DIR/<id>.png`` (indexed PNGs as
``adcam label`` writes them: 0 background, c + 1 class c, 255 ignore); IRN-style augmentation
(:class:`~adcam_fast.training.augment.TrainTransform`, 321 x 321 crops, mask pad 255).
Validation (``--val-data`` with ground-truth masks) predicts every image at full resolution
(batch 1) and reports mIoU over K + 1 classes; ``best.pth`` follows ``miou``.

Model: :class:`~adcam_fast.models.segmenter.Segmenter` (ResNet-101 at output stride 8 + the
DeepLab v2 ASPP head), optionally initialised from ImageNet backbone weights (``--init``).
BatchNorm layers train normally.

Loss (paper Eq. 3): pixel cross-entropy of the logits upsampled bilinearly to the crop,
ignoring 255, averaged over the non-ignored pixels of the batch (0, with zero gradient,
when every pixel is ignored).

Optimiser: SGD (momentum 0.9, weight decay 5e-4) at lr 2.5e-4 for the backbone and 10x for
the ASPP head, poly decay (power 0.9) over all iterations, as DeepLab v2; ``--optimizer
adamw`` swaps in AdamW with the same groups and schedule. No weight decay on biases and
norm weights. 20 epochs of batch 10 (about 21k iterations on VOC train_aug).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import SGD, AdamW, Optimizer
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, Dataset

from adcam_fast.data.base import IGNORE_INDEX, Sample, fit_mask, labels_from_mask
from adcam_fast.data.images import load_mask
from adcam_fast.models.segmenter import Segmenter
from adcam_fast.training.augment import IMAGENET_MEAN, IMAGENET_STD, TrainTransform, ValTransform
from adcam_fast.training.checkpoint import SEGMENTER, read_weights, segmenter_from_config
from adcam_fast.training.engine import (
    DistInfo,
    Task,
    TransformedDataset,
    add_common_arguments,
    autocast,
    base_recipe,
    check_train_loader,
    launch,
    make_evaluator,
    make_loader,
    open_collections,
    param_groups,
    prepare_model,
    to_device,
)
from adcam_fast.training.metrics import ConfusionMatrix
from adcam_fast.training.schedules import Poly, build_scheduler

__all__ = [
    "PseudoMaskDataset",
    "add_arguments",
    "build_optimizer",
    "evaluate",
    "run",
    "segmentation_loss",
]

LR = 2.5e-4
HEAD_LR_MULT = 10.0
WEIGHT_DECAY = 5e-4
MOMENTUM = 0.9


class PseudoMaskDataset(Dataset):
    """The samples of ``base`` with ``mask`` read from ``mask_dir/<id>.png``.

    A mask must match its image's size (or the size before the reader's ``max_side``
    downscale) and hold only 0, 1..K and 255. Raises ValueError naming the folder when masks
    are missing, and naming the file when one is bad.
    """

    def __init__(self, base: Dataset, mask_dir: str | os.PathLike[str]) -> None:
        self.base = base
        self.mask_dir = Path(mask_dir)
        if not self.mask_dir.is_dir():
            raise ValueError(f"{self.mask_dir}: no such mask folder")
        missing = [i for i in base.ids if not self._path(i).is_file()]
        if missing:
            raise ValueError(
                f"{self.mask_dir}: no mask for {len(missing)} of {len(base.ids)} images "
                f"(first: {missing[0]}.png)"
            )

    def _path(self, item_id: str) -> Path:
        return self.mask_dir / f"{item_id}.png"

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> Sample:
        sample: Sample = self.base[index]
        path = self._path(sample.id)
        mask = fit_mask(
            load_mask(path), sample.image, getattr(self.base, "max_side", None), str(path)
        )
        labels_from_mask(mask, len(self.base.class_names), path)  # validates the values
        return dataclasses.replace(sample, mask=mask)


def segmentation_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Cross-entropy of the logits (upsampled to the mask size) over non-ignored pixels."""
    target = batch["mask"]
    logits = F.interpolate(
        model(batch["image"]), size=target.shape[-2:], mode="bilinear", align_corners=False
    )
    total = F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (target != IGNORE_INDEX).sum().clamp_min(1)


def build_optimizer(
    model: Segmenter,
    max_it: int,
    optimizer: str = "sgd",
    lr: float = LR,
    head_lr_mult: float = HEAD_LR_MULT,
    weight_decay: float = WEIGHT_DECAY,
) -> tuple[Optimizer, LambdaLR]:
    """SGD (momentum 0.9) or AdamW over the backbone (``lr``) and head (``lr *
    head_lr_mult``) groups, poly decay over ``max_it`` iterations for all."""
    groups = param_groups(model, model.param_groups_split(), weight_decay)
    for g in groups:
        g["lr"] = lr * (head_lr_mult if g["name"] == "head" else 1.0)
    if optimizer == "sgd":
        opt: Optimizer = SGD(groups, momentum=MOMENTUM)
    elif optimizer == "adamw":
        opt = AdamW(groups)
    else:
        raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {optimizer!r}")
    return opt, build_scheduler(opt, [Poly(max_it) for _ in groups])


def evaluate(
    model: Segmenter, loader: DataLoader, device: torch.device, amp: bool
) -> dict[str, float]:
    """``{"miou": ...}`` of ``model.predict`` against the loader's masks over
    ``model.num_classes`` classes (255 ignored). Call in eval mode under ``torch.no_grad``."""
    matrix = ConfusionMatrix(model.num_classes)
    for batch in loader:
        batch = to_device(batch, device)
        with autocast(device, amp):
            pred = model.predict(batch["image"])
        matrix.update(pred, batch["mask"])
    return {"miou": matrix.miou()}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``adcam train-segmenter`` (defaults: DeepLab v2 conventions)."""
    add_common_arguments(parser, epochs=20, batch_size=10, crop=321)
    parser.add_argument(
        "--masks",
        required=True,
        type=Path,
        help="pseudo-mask folder: <id>.png per training image (255 = ignore)",
    )
    parser.add_argument(
        "--backbone",
        default="resnet101",
        help="timm backbone with features_only/output_stride (default resnet101)",
    )
    parser.add_argument("--output-stride", type=int, choices=(8, 16), default=8, help="default 8")
    parser.add_argument(
        "--optimizer", choices=("sgd", "adamw"), default="sgd", help="default sgd (momentum 0.9)"
    )
    parser.add_argument("--lr", type=float, default=LR, help=f"backbone lr (default {LR})")
    parser.add_argument(
        "--head-lr-mult",
        type=float,
        default=HEAD_LR_MULT,
        help=f"ASPP head lr multiplier (default {HEAD_LR_MULT:g})",
    )
    parser.add_argument(
        "--weight-decay", type=float, default=WEIGHT_DECAY, help=f"default {WEIGHT_DECAY}"
    )


def _build_task(args: argparse.Namespace, dist_info: DistInfo) -> Task:
    train_base, val_base = open_collections(args, dist_info)
    class_names = list(train_base.class_names)
    config = {
        "backbone": args.backbone,
        "num_classes": len(class_names) + 1,
        "output_stride": args.output_stride,
        "crop": args.crop,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
    }
    model = segmenter_from_config(config)
    if args.init is not None:
        weights = read_weights(args.init)  # its errors name the file
        try:
            model.load_backbone(weights)
        except ValueError as e:
            raise ValueError(f"{args.init}: {e}") from e
    model = prepare_model(model, dist_info)

    train_set = TransformedDataset(
        PseudoMaskDataset(train_base, args.masks), TrainTransform(args.crop), args.seed, ("mask",)
    )
    loader = make_loader(train_set, args.batch_size, args.workers, dist_info, args.seed, True)
    max_it = args.epochs * check_train_loader(loader, dist_info)
    optimizer, scheduler = build_optimizer(
        model, max_it, args.optimizer, args.lr, args.head_lr_mult, args.weight_decay
    )

    evaluator = make_evaluator(evaluate, val_base, ValTransform(None), "mask", 1, args, dist_info)
    recipe = {
        **base_recipe(args, dist_info),
        "masks": str(args.masks),
        **{k: getattr(args, k) for k in ("backbone", "output_stride", "optimizer", "lr")},
        **{k: getattr(args, k) for k in ("head_lr_mult", "weight_decay")},
    }
    return Task(
        kind=SEGMENTER,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        loss_fn=segmentation_loss,
        train_loader=loader,
        config=config,
        class_names=class_names,
        recipe=recipe,
        evaluate=evaluator,
        best_metric="miou",
    )


def run(args: argparse.Namespace) -> int:
    """``adcam train-segmenter``: train, writing ``OUT/{last,best}.pth`` and
    ``OUT/log.jsonl``; returns 0. Raises ValueError for bad arguments or data."""
    return launch(args, _build_task)

"""Multi-label classifier training (``adcam train-classifier``), the AD-CAM paper recipe.

Model: Conformer-S (``conformer_small_patch16``; ``conformer_nano_patch16`` for CPU work)
built with ``drop_last_block=True`` (CNN map at stride 16) and ``detach_branches=True``
(stop-gradient between the branches), optionally initialised from an official ImageNet
checkpoint (``--init``, through :func:`~adcam_fast.models.conformer.checkpoint_filter_fn`;
the heads keep their fresh init when the class count differs).

Loss (paper Eq. 1, 4, 5): ``BCE(conv_logits, y) + BCE(trans_logits, y)``, each the mean
binary cross-entropy with logits over batch and classes; ``conv_logits`` come from GAP + FC
on the CNN branch, ``trans_logits`` from FC on the ViT class token.

Optimiser: AdamW (betas 0.9, 0.999), parameters split by
:meth:`~adcam_fast.models.conformer.Conformer.branch_parameters`:

* CNN branch (stem, ``conv_1``, every ``cnn_block`` / ``med_block`` / ``fusion_block``,
  ``expand_block`` (token -> CNN coupling), ``conv_cls_head``): lr 5e-4 with poly decay
  ``(1 - it / max_it) ** 0.9`` over all iterations;
* ViT branch (``cls_token``, ``trans_patch_conv``, ``trans_1``, every ``trans_block`` and
  ``squeeze_block`` (CNN -> token coupling), ``trans_norm``, ``trans_cls_head``): constant
  lr 2e-4.

Weight decay 0.05 (timm's convention) on weights of >= 2 dims; none on biases, norm weights
and ``cls_token``. So there are up to four groups, named ``"cnn"`` / ``"vit"``.

Data: IRN-style augmentation (:class:`~adcam_fast.training.augment.TrainTransform`), 384 x 384
crops, 5 epochs; validation (``--val-data``) resizes the long side to the crop and pads, and
reports mAP and F1 at 0.5 (micro and macro) of both heads; ``best.pth`` follows ``cnn_map``
(the CNN head makes the CAMs).
"""

from __future__ import annotations

import argparse

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import AdamW
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader

from adcam_fast.models.conformer import Conformer, checkpoint_filter_fn
from adcam_fast.training.augment import TrainTransform, ValTransform
from adcam_fast.training.checkpoint import (
    CLASSIFIER,
    classifier_config,
    classifier_from_config,
    read_weights,
)
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
from adcam_fast.training.metrics import f1_scores, mean_average_precision
from adcam_fast.training.schedules import Constant, Poly, build_scheduler

__all__ = [
    "add_arguments",
    "build_optimizer",
    "classification_loss",
    "evaluate",
    "run",
]

LR_CNN = 5e-4
LR_VIT = 2e-4
WEIGHT_DECAY = 0.05


def classification_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """``BCE(conv_logits, labels) + BCE(trans_logits, labels)`` (means, computed in fp32)."""
    conv_logits, trans_logits = model(batch["image"])
    y = batch["labels"]
    return F.binary_cross_entropy_with_logits(
        conv_logits.float(), y
    ) + F.binary_cross_entropy_with_logits(trans_logits.float(), y)


def build_optimizer(
    model: Conformer,
    max_it: int,
    lr_cnn: float = LR_CNN,
    lr_vit: float = LR_VIT,
    weight_decay: float = WEIGHT_DECAY,
) -> tuple[AdamW, LambdaLR]:
    """The recipe's AdamW and per-iteration scheduler (CNN groups poly over ``max_it``
    iterations, ViT groups constant); see the module docstring."""
    groups = param_groups(model, model.branch_parameters(), weight_decay)
    lrs = {"cnn": lr_cnn, "vit": lr_vit}
    for g in groups:
        g["lr"] = lrs[g["name"]]
    optimizer = AdamW(groups, betas=(0.9, 0.999))
    factors = [Poly(max_it) if g["name"] == "cnn" else Constant() for g in groups]
    return optimizer, build_scheduler(optimizer, factors)


def evaluate(
    model: nn.Module, loader: DataLoader, device: torch.device, amp: bool
) -> dict[str, float]:
    """mAP and F1 at 0.5 (micro, macro) of both heads' sigmoid scores over ``loader``:
    keys ``{cnn,vit}_map``, ``{cnn,vit}_f1_micro``, ``{cnn,vit}_f1_macro``. Call in eval
    mode under ``torch.no_grad``."""
    scores: dict[str, list[Tensor]] = {"cnn": [], "vit": []}
    targets = []
    for batch in loader:
        batch = to_device(batch, device)
        with autocast(device, amp):
            conv_logits, trans_logits = model(batch["image"])
        scores["cnn"].append(conv_logits.float().sigmoid().cpu())
        scores["vit"].append(trans_logits.float().sigmoid().cpu())
        targets.append(batch["labels"].cpu())
    y = torch.cat(targets)
    out: dict[str, float] = {}
    for head, parts in scores.items():
        p = torch.cat(parts)
        f1 = f1_scores(p, y, 0.5)
        out[f"{head}_map"] = mean_average_precision(p, y)
        out[f"{head}_f1_micro"] = f1["micro"]
        out[f"{head}_f1_macro"] = f1["macro"]
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``adcam train-classifier`` (defaults: the paper recipe)."""
    add_common_arguments(parser, epochs=5, batch_size=16, crop=384)
    parser.add_argument(
        "--model",
        default="conformer_small_patch16",
        choices=timm.list_models("conformer_*"),
        help="default conformer_small_patch16 (nano: CPU tests and demos)",
    )
    parser.add_argument(
        "--lr-cnn", type=float, default=LR_CNN, help=f"CNN-branch lr, poly decay (default {LR_CNN})"
    )
    parser.add_argument(
        "--lr-vit", type=float, default=LR_VIT, help=f"ViT-branch lr, constant (default {LR_VIT})"
    )
    parser.add_argument(
        "--weight-decay",
        type=float,
        default=WEIGHT_DECAY,
        help=f"AdamW weight decay (default {WEIGHT_DECAY})",
    )


def _build_task(args: argparse.Namespace, dist_info: DistInfo) -> Task:
    if args.crop % 16:
        raise ValueError(f"--crop must be a multiple of 16 (the patch size), got {args.crop}")
    train_base, val_base = open_collections(args, dist_info)
    class_names = list(train_base.class_names)
    config = classifier_config(args.model, len(class_names), args.crop)
    model = classifier_from_config(config)
    if args.init is not None:
        weights = read_weights(args.init)  # its errors name the file
        try:
            weights = checkpoint_filter_fn(weights, model)
        except ValueError as e:
            raise ValueError(f"{args.init}: not {args.model} weights: {e}") from e
        model.load_state_dict(weights, strict=False)  # heads may be missing (class count)
    model = prepare_model(model, dist_info)

    train_set = TransformedDataset(train_base, TrainTransform(args.crop), args.seed, ("labels",))
    loader = make_loader(train_set, args.batch_size, args.workers, dist_info, args.seed, True)
    max_it = args.epochs * check_train_loader(loader, dist_info)
    optimizer, scheduler = build_optimizer(
        model, max_it, args.lr_cnn, args.lr_vit, args.weight_decay
    )

    evaluator = make_evaluator(
        evaluate, val_base, ValTransform(args.crop), "labels", args.batch_size, args, dist_info
    )
    recipe = {
        **base_recipe(args, dist_info),
        **{k: getattr(args, k) for k in ("model", "lr_cnn", "lr_vit", "weight_decay")},
    }
    return Task(
        kind=CLASSIFIER,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        loss_fn=classification_loss,
        train_loader=loader,
        config=config,
        class_names=class_names,
        recipe=recipe,
        evaluate=evaluator,
        best_metric="cnn_map",
    )


def run(args: argparse.Namespace) -> int:
    """``adcam train-classifier``: train, writing ``OUT/{last,best}.pth`` and
    ``OUT/log.jsonl``; returns 0. Raises ValueError for bad arguments or data."""
    return launch(args, _build_task)

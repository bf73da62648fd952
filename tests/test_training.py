"""Training: recipe, loss, resume, checkpoints, metrics, augmentation (CPU, tiny data)."""

from __future__ import annotations

import argparse
import itertools
import math
import re
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from torch.utils.data import DataLoader

from adcam_fast.data import SyntheticDataset, make_synthetic
from adcam_fast.models.conformer import checkpoint_filter_fn
from adcam_fast.models.segmenter import Segmenter
from adcam_fast.training import classifier, engine, segmenter
from adcam_fast.training.augment import TrainTransform, ValTransform
from adcam_fast.training.checkpoint import load_classifier, load_segmenter, save_checkpoint
from adcam_fast.training.engine import TransformedDataset, train_step
from adcam_fast.training.metrics import (
    ConfusionMatrix,
    average_precision,
    f1_scores,
    mean_average_precision,
)
from adcam_fast.training.schedules import Poly, poly_lr

NANO = "conformer_nano_patch16"


def _nano(num_classes: int = 8):
    torch.manual_seed(0)
    return timm.create_model(
        NANO, num_classes=num_classes, drop_last_block=True, detach_branches=True
    )


def _fixed_batch(size: int, n: int, require: str) -> dict[str, torch.Tensor]:
    data = TransformedDataset(SyntheticDataset(n, seed=1, size=size), ValTransform(size), 0)
    batch = next(iter(DataLoader(data, batch_size=n)))
    assert require in batch
    return batch


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: these tiny models gain nothing from more, and on a shared 2-core
    machine spinning OpenMP threads slow down by an order of magnitude."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory) -> Path:
    # 10 scenes: 9 train, 1 val.
    return make_synthetic(tmp_path_factory.mktemp("syn"), n=10, size=64)


def _args(add_arguments, root: Path, out: Path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    common = ["--data", f"synthetic:{root}:train", "--val-data", f"synthetic:{root}:val"]
    common += ["--out", str(out), "--batch-size", "4", "--crop", "32", "--workers", "0"]
    return parser.parse_args([*common, "--quiet", *extra])


# --- classifier -------------------------------------------------------------------------


def test_classifier_steps_lower_the_loss():
    model = _nano()
    batch = _fixed_batch(32, 4, "labels")
    optimizer, scheduler = classifier.build_optimizer(model, max_it=100)
    losses = [
        float(train_step(model, batch, classifier.classification_loss, optimizer, scheduler, False))
        for _ in range(12)
    ]  # the recipe's learning rates, on a fixed batch: a steady descent
    assert all(b < a for a, b in itertools.pairwise(losses)), losses
    assert losses[-1] < 0.9 * losses[0], losses


def test_optimizer_groups_follow_the_recipe():
    model = _nano()
    max_it = 10
    optimizer, scheduler = classifier.build_optimizer(model, max_it=max_it)
    seen: dict[int, str] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            assert id(p) not in seen, "a parameter is in two groups"
            seen[id(p)] = group["name"]
    assert set(seen) == {id(p) for p in model.parameters()}
    for branch, params in model.branch_parameters().items():
        assert {i for i, b in seen.items() if b == branch} == {id(p) for p in params}
    no_decay = {
        id(p) for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]
    }
    assert id(model.cls_token) in no_decay and id(model.trans_norm.bias) in no_decay
    assert id(model.conv1.weight) not in no_decay

    for it in range(max_it):
        for group in optimizer.param_groups:
            want = 2e-4 if group["name"] == "vit" else poly_lr(5e-4, it, max_it)
            assert group["lr"] == pytest.approx(want, rel=1e-12, abs=0)
        optimizer.step()  # no gradients: parameters stay, the schedule advances
        scheduler.step()
    assert poly_lr(5e-4, 5, 10) == pytest.approx(5e-4 * 0.5**0.9)


def test_resume_matches_uninterrupted_run(synthetic_root, tmp_path, monkeypatch):
    extra = ("--model", NANO, "--epochs", "2")
    straight = tmp_path / "straight"
    assert classifier.run(_args(classifier.add_arguments, synthetic_root, straight, *extra)) == 0

    resumed = tmp_path / "resumed"
    args = _args(classifier.add_arguments, synthetic_root, resumed, *extra)
    run_epoch = engine._run_epoch
    calls = []

    def crash_in_second_epoch(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return run_epoch(*a, **kw)

    monkeypatch.setattr(engine, "_run_epoch", crash_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        classifier.run(args)
    monkeypatch.undo()
    first = torch.load(resumed / "last.pth", weights_only=True)
    assert first["epoch"] == 1
    del first["recipe"]["val_data"]  # as written before the recipe held it: not compared
    (tmp_path / "older").mkdir()
    torch.save(first, tmp_path / "older" / "last.pth")
    args.resume = True
    assert classifier.run(args) == 0

    a = torch.load(straight / "last.pth", weights_only=True)
    b = torch.load(resumed / "last.pth", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2 and a["iteration"] == b["iteration"] == 4
    assert a["model"].keys() == b["model"].keys()
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for pid, state in a["optimizer"]["state"].items():
        assert torch.equal(state["exp_avg"], b["optimizer"]["state"][pid]["exp_avg"])
    log_a = (straight / "log.jsonl").read_text().splitlines()
    log_b = (resumed / "log.jsonl").read_text().splitlines()
    assert len(log_a) == len(log_b) == 2

    model, meta = load_classifier(straight / "best.pth")
    assert meta["class_names"] == SyntheticDataset(1).class_names
    assert meta["config"]["model"] == NANO and meta["config"]["crop"] == 32
    assert not model.training

    args.resume = False  # a fresh run does not overwrite one
    with pytest.raises(ValueError, match="pass --resume"):
        classifier.run(args)
    args.resume, args.lr_cnn = True, 1e-3  # resuming with another recipe is refused
    with pytest.raises(ValueError, match="lr_cnn"):
        classifier.run(args)
    args.lr_cnn, val_data, args.val_data = 5e-4, args.val_data, None  # or without validation
    with pytest.raises(ValueError, match="val_data"):
        classifier.run(args)
    args.out = tmp_path / "older"  # whose recipe does not say: its best.pth does
    with pytest.raises(ValueError, match=r"without validation data, but best\.pth was chosen by"):
        classifier.run(args)
    args.val_data = val_data
    assert classifier.run(args) == 0
    assert torch.load(args.out / "last.pth", weights_only=True)["epoch"] == 2


def test_an_epoch_outlives_a_failed_validation(synthetic_root, tmp_path, monkeypatch):
    """last.pth holds each epoch before validation runs, so an error there loses nothing."""
    out = tmp_path / "out"
    args = _args(classifier.add_arguments, synthetic_root, out, "--model", NANO, "--epochs", "1")

    def broken(*a, **kw):
        raise OSError("the validation set went away")

    monkeypatch.setattr(classifier, "evaluate", broken)
    with pytest.raises(OSError, match="went away"):
        classifier.run(args)
    assert torch.load(out / "last.pth", weights_only=True)["epoch"] == 1


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--lr-vit", "nan"], r"--lr-vit must be finite and > 0, got nan"),
        (["--lr-cnn", "-1"], r"--lr-cnn must be finite and > 0"),
        (["--weight-decay", "-0.1"], r"--weight-decay must be finite and >= 0"),
        (["--seed", "-1"], r"--seed must be >= 0"),
        (["--val-data", "synthetic:{root}:empty"], r"--val-data .* holds no images"),
    ],
)
def test_bad_hyper_parameters_stop_before_training(synthetic_root, tmp_path, extra, message):
    (synthetic_root / "ImageSets" / "Segmentation" / "empty.txt").write_text("")
    extra = [e.format(root=synthetic_root) for e in extra]
    args = _args(classifier.add_arguments, synthetic_root, tmp_path / "o", "--model", NANO, *extra)
    with pytest.raises(ValueError, match=message):
        classifier.run(args)
    assert not (tmp_path / "o").exists()


def test_init_weights_of_another_model_are_named(tmp_path):
    """Weights whose keys match but whose shapes do not (another variant) are refused by
    name, for the classifier's filter and the segmenter's backbone."""
    small = timm.create_model(NANO, num_classes=8).state_dict()
    wide = {k: torch.zeros(v.shape[0] + 1, *v.shape[1:]) if v.ndim else v for k, v in small.items()}
    with pytest.raises(ValueError, match=r"of other shapes \['"):
        checkpoint_filter_fn(wide, _nano())
    backbone = timm.create_model("resnet18").state_dict()
    backbone["conv1.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"not resnet18 weights: .* other shapes \['conv1"):
        _small_segmenter().load_backbone(backbone)


# --- segmenter --------------------------------------------------------------------------


def _small_segmenter() -> Segmenter:
    torch.manual_seed(0)
    return Segmenter("resnet18", num_classes=9, output_stride=16)


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenetv3_small_050", "regnetx_002"])
def test_segmenter_loads_plain_imagenet_weights(backbone):
    """Whatever the plain model calls its classifier (fc, classifier and conv_head, head.fc)."""
    torch.manual_seed(0)
    weights = timm.create_model(backbone).state_dict()
    model = Segmenter(backbone, num_classes=3, output_stride=16)
    model.load_backbone(weights)
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, weights[key]), key


def test_segmenter_refuses_weights_it_cannot_map():
    """convnext's features_only model renames the stages: refused by name, not half loaded."""
    with torch.device("meta"):
        weights = timm.create_model("convnext_atto").state_dict()
        model = Segmenter("convnext_atto", num_classes=3, output_stride=16)
    with pytest.raises(ValueError, match="convnext_atto with features_only names its weights"):
        model.load_backbone(weights)


def test_segmenter_steps_lower_the_loss():
    model = _small_segmenter()
    batch = _fixed_batch(32, 2, "mask")
    optimizer, scheduler = segmenter.build_optimizer(model, 100, "adamw", lr=1e-3)
    losses = [
        float(train_step(model, batch, segmenter.segmentation_loss, optimizer, scheduler, False))
        for _ in range(6)
    ]
    assert losses[-1] < 0.7 * losses[0], losses
    assert model(batch["image"]).shape == (2, 9, 2, 2)
    assert model.predict(batch["image"][:, :, :30, :20]).shape == (2, 30, 20)


def test_segmentation_loss_ignores_255():
    model = _small_segmenter()
    image = torch.randn(2, 3, 32, 32)
    ignored = {"image": image, "mask": torch.full((2, 32, 32), 255)}
    loss = segmenter.segmentation_loss(model, ignored)
    assert loss.item() == 0.0
    loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())

    mask = torch.randint(0, 9, (2, 32, 32))
    mask[:, :16] = 255
    logits = torch.nn.functional.interpolate(
        model(image), size=(32, 32), mode="bilinear", align_corners=False
    )
    want = torch.nn.functional.cross_entropy(logits[:, :, 16:], mask[:, 16:])
    got = segmenter.segmentation_loss(model, {"image": image, "mask": mask})
    torch.testing.assert_close(got, want)


def test_segmenter_run_and_load(synthetic_root, tmp_path):
    out = tmp_path / "seg"
    masks = synthetic_root / "SegmentationClass"
    args = _args(
        segmenter.add_arguments,
        synthetic_root,
        out,
        *("--masks", str(masks), "--backbone", "resnet18", "--output-stride", "16"),
        *("--epochs", "1", "--optimizer", "adamw", "--lr", "1e-3"),
    )
    assert segmenter.run(args) == 0
    model, meta = load_segmenter(out / "best.pth")
    assert meta["config"]["num_classes"] == 9 and meta["epoch"] == 1
    assert 0.0 <= meta["metrics"]["miou"] <= 1.0
    assert isinstance(model, Segmenter) and not model.training

    args.out, args.masks = tmp_path / "seg2", tmp_path / "empty"
    args.masks.mkdir()
    with pytest.raises(ValueError, match="no mask for 9 of 9"):
        segmenter.run(args)


# --- checkpoints ------------------------------------------------------------------------


def test_checkpoint_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "last.pth"
    save_checkpoint({"epoch": 1, "w": torch.ones(3)}, path)
    real_save = torch.save

    def crash_midway(obj, f):
        f.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"epoch": 2, "w": torch.zeros(3)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    kept = torch.load(path, weights_only=True)
    assert kept["epoch"] == 1 and torch.equal(kept["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pth"]


def test_load_classifier_rejects_other_files(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match=re.escape(str(junk))):
        load_classifier(junk)
    foreign = tmp_path / "foreign.pth"
    torch.save({"state_dict": {"w": torch.ones(1)}}, foreign)
    with pytest.raises(ValueError, match=re.escape(str(foreign))):
        load_classifier(foreign)
    missing = tmp_path / "missing.pth"
    with pytest.raises(ValueError, match=re.escape(str(missing))):
        load_classifier(missing)


# --- metrics ----------------------------------------------------------------------------


def test_average_precision_by_hand():
    scores = np.array([[0.9, 0.5, 0.3], [0.8, 0.5, 0.2], [0.7, 0.2, 0.1], [0.6, 0.1, 0.0]])
    targets = np.array([[1, 1, 0], [0, 0, 0], [1, 0, 0], [0, 1, 0]])
    # class 0: hits at ranks 1 and 3 -> (1 + 2/3) / 2; class 1: the tie at 0.5 is one
    # threshold (P 1/2, R 1/2), then R 1 at P 2/4 -> 0.5; class 2: no positive -> NaN.
    ap = average_precision(scores, targets)
    assert ap[0] == pytest.approx(5 / 6) and ap[1] == pytest.approx(0.5) and math.isnan(ap[2])
    assert mean_average_precision(torch.tensor(scores), torch.tensor(targets)) == pytest.approx(
        (5 / 6 + 0.5) / 2
    )


def test_average_precision_of_a_diverged_model_is_nan():
    """NaN scores rank nothing (np.diff of NaNs is not zero, so they would form runs): a
    diverged model's mAP is NaN, which never takes best.pth from a model with a number."""
    targets = np.array([[1, 0], [0, 1], [1, 1]])
    scores = np.array([[0.9, 0.1], [0.2, np.nan], [0.8, 0.7]])
    ap = average_precision(scores, targets)
    assert ap[0] == pytest.approx(1.0) and math.isnan(ap[1])
    diverged = mean_average_precision(scores, targets)
    assert math.isnan(diverged)
    best = dict(metric="cnn_map", value=0.5, epoch=1)
    assert not engine._improved(best, dict(cnn_map=diverged))
    assert engine._improved(best | dict(value=math.nan), dict(cnn_map=0.1))


def test_f1_by_hand():
    probs = np.array([[0.9, 0.6, 0.1], [0.2, 0.7, 0.4], [0.8, 0.3, 0.2]])
    targets = np.array([[1, 0, 0], [0, 1, 0], [0, 1, 0]])
    # class 0: TP 1, FP 1 -> 2/3; class 1: TP 1, FP 1, FN 1 -> 1/2; class 2: nothing -> NaN.
    f1 = f1_scores(probs, targets, 0.5)
    assert f1["macro"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert f1["micro"] == pytest.approx(2 * 2 / (2 * 2 + 2 + 1))


def test_miou_by_hand():
    target = np.array([[0, 0, 1, 1], [0, 2, 2, 255]])
    pred = np.array([[0, 1, 1, 1], [0, 2, 0, 2]])
    cm = ConfusionMatrix(4)
    cm.update(torch.from_numpy(pred), torch.from_numpy(target))
    # class 0: TP 2, FP 1, FN 1 -> 1/2; class 1: TP 2, FP 1 -> 2/3; class 2: TP 1, FN 1 -> 1/2
    iou = cm.iou()
    assert iou[:3] == pytest.approx([0.5, 2 / 3, 0.5]) and math.isnan(iou[3])
    assert cm.miou() == pytest.approx((0.5 + 2 / 3 + 0.5) / 3)


# --- augmentation and schedules ---------------------------------------------------------


def test_train_transform_crops_flips_and_pads():
    h, w = 20, 30
    image = np.zeros((h, w, 3), np.uint8)
    image[..., 0] = np.arange(w, dtype=np.uint8)[None, :] * 8  # red encodes the column
    mask = np.tile(np.arange(w, dtype=np.uint8)[None, :], (h, 1))
    transform = TrainTransform(crop=48, scale=(1.0, 1.0))  # long side 48 -> 32 x 48
    x, m = transform(image, mask, np.random.default_rng(3))
    y, n = transform(image, mask, np.random.default_rng(3))
    assert x.shape == (3, 48, 48) and m.shape == (48, 48) and m.dtype == torch.int64
    assert torch.equal(x, y) and torch.equal(m, n)
    rows = (m != 255).any(1)
    assert int(rows.sum()) == 32 and (m[~rows] == 255).all() and (x[:, ~rows] == 0).all()
    # monotone along the row (flipped or not), and the image flipped with the mask; over
    # seeds, both ways
    directions = set()
    for seed in range(12):
        x, m = transform(image, mask, np.random.default_rng(seed))
        rows = (m != 255).any(1)
        cols, red = m[rows][0].float(), x[0][rows][0]
        direction = torch.sign(cols[-1] - cols[0])
        assert direction != 0
        assert (cols.diff() * direction >= 0).all() and (red.diff() * direction >= -1e-5).all()
        directions.add(int(direction))
    assert directions == {-1, 1}


def test_val_transform_and_poly():
    image = np.full((30, 60, 3), 255, np.uint8)
    x, m = ValTransform(32)(image, np.ones((30, 60), np.uint8))
    assert x.shape == (3, 32, 32) and (m[:16] == 1).all() and (m[16:] == 255).all()
    x, m = ValTransform(None)(image, None)
    assert x.shape == (3, 30, 60) and m is None
    assert Poly(10)(10) == 0.0 and Poly(10)(0) == 1.0
    with pytest.raises(ValueError):
        Poly(0)

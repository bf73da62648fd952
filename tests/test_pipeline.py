"""`adcam label` / `adcam eval` end to end on tiny collections made by the tests."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import adcam_fast.pipeline.label as label_module
from adcam_fast.cli import main
from adcam_fast.data import (
    ImageDataset,
    SyntheticDataset,
    load_mask,
    make_synthetic,
    open_dataset,
)
from adcam_fast.pipeline.label import (
    OVERWRITE_MARK,
    FailureLog,
    LabelConfig,
    StopFlag,
    begin_run,
)
from adcam_fast.pipeline.methods import localise
from adcam_fast.pipeline.writers import Outputs, coco_image_ids

FAST = ["--input-size", "64", "--scales", "1.0,0.5", "--batch-size", "2", "--workers", "0"]


def label(data: str, checkpoint: Path, out: Path, *extra: str) -> int:
    argv = ["label", "--data", data, "--checkpoint", str(checkpoint), "--out", str(out)]
    return main([*argv, *FAST, "--quiet", *extra])


def test_label_writes_every_output_consistently(checkpoint, collection, tmp_path):
    out = tmp_path / "out"
    outputs = ("--save-cams", "--coco-json", "--overlays")
    assert label(f"synthetic:{collection}", checkpoint, out, *outputs) == 0
    ds = open_dataset(f"synthetic:{collection}")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["written"] == len(ds) and summary["failed"] == 0
    assert summary["checkpoint"]["sha256"] and summary["config"]["method"] == "adcam"
    assert summary["precision"] == "fp32"  # the torch extractor on the CPU
    coco_gt = dict(
        images=[dict(id=i, width=64, height=64) for i in range(len(ds))],
        categories=[dict(id=c + 1, name=n) for c, n in enumerate(ds.class_names)],
        annotations=[],
    )
    from pycocotools.coco import COCO

    gt = COCO()
    gt.dataset = coco_gt
    gt.createIndex()
    results = gt.loadRes(str(out / "coco.json"))
    for i, image_id in enumerate(ds.ids):
        mask = load_mask(out / "masks" / f"{image_id}.png")
        classes = np.flatnonzero(ds.labels(i)) + 1
        assert set(np.unique(mask)) <= {0, *classes.tolist()}
        z = np.load(out / "cams" / f"{image_id}.npz")
        assert z["maps"].dtype == np.float16 and z["maps"].shape[0] == len(classes)
        np.testing.assert_array_equal(z["class_ids"], classes)
        assert tuple(z["size"]) == mask.shape
        assert Image.open(out / "overlays" / f"{image_id}.png").size == (64, 64)
        for ann in results.loadAnns(results.getAnnIds(imgIds=[i])):
            np.testing.assert_array_equal(results.annToMask(ann), mask == ann["category_id"])
        present = sorted(a["category_id"] for a in results.loadAnns(results.getAnnIds([i])))
        assert present == sorted(set(np.unique(mask).tolist()) - {0})


def test_rerun_skips_complete_images(checkpoint, collection, tmp_path):
    out = tmp_path / "out"
    assert label(f"synthetic:{collection}", checkpoint, out) == 0
    stamp = {p: p.stat().st_mtime_ns for p in (out / "masks").iterdir()}
    assert label(f"synthetic:{collection}", checkpoint, out) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_complete"] == len(stamp) and summary["written"] == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "masks").iterdir()} == stamp


def test_eval_scores_masks_and_sweeps(checkpoint, collection, tmp_path, capsys):
    out = tmp_path / "out"
    assert label(f"synthetic:{collection}", checkpoint, out, "--save-cams") == 0
    assert main(["eval", "--pred", str(out), "--data", f"synthetic:{collection}", "--sweep"]) == 0
    result = json.loads((out / "eval.json").read_text())
    m = result["masks"]
    assert m["miou"] + m["fp"] + m["fn"] == pytest.approx(1.0)
    assert 0.0 <= result["sweep"]["best_threshold"] <= 0.6
    best = max(result["sweep"]["curve"].values())
    assert result["sweep"]["best"]["miou"] == pytest.approx(best)
    assert "mIoU" in capsys.readouterr().out


def test_eval_takes_downscaled_masks_and_missing_maps(checkpoint, collection, tmp_path, capsys):
    """Masks written under --max-side are scored at the ground truth's size; an image without
    maps (it failed to label) has background seeds in the sweep; a --pred that is no output
    folder is named."""
    out = tmp_path / "out"
    assert label(f"synthetic:{collection}", checkpoint, out, "--save-cams", "--max-side", "32") == 0
    first = open_dataset(f"synthetic:{collection}").ids[0]
    (out / "cams" / f"{first}.npz").unlink()
    assert main(["eval", "--pred", str(out), "--data", f"synthetic:{collection}", "--sweep"]) == 0
    result = json.loads((out / "eval.json").read_text())
    assert result["missing"] == [] and result["sweep"]["missing"] == [first]
    assert "1 images had no maps" in capsys.readouterr().err
    typo = ["eval", "--pred", str(tmp_path / "typo"), "--data", f"synthetic:{collection}"]
    assert main(typo) == 2
    assert "typo: no masks/ folder" in capsys.readouterr().err
    (tmp_path / "other" / "masks").mkdir(parents=True)  # labelled another collection
    other = ["eval", "--pred", str(tmp_path / "other"), "--data", f"synthetic:{collection}"]
    assert main(other) == 2
    assert "no mask for any of the" in capsys.readouterr().err
    assert main([*other, "--sweep"]) == 2  # named before the masks are scored
    assert "other/cams: no saved maps" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert main([*other, "--json", str(tmp_path / "file" / "eval.json")]) == 2
    assert "--json " in capsys.readouterr().err
    for p in (out / "cams").iterdir():
        p.rename(tmp_path / "other" / p.name)  # out's masks, with maps of none of them
    sweep = ["eval", "--pred", str(out), "--data", f"synthetic:{collection}", "--sweep"]
    assert main(sweep) == 2
    assert "no maps for any of the" in capsys.readouterr().err


def test_failure_log_keeps_this_runs_failures(tmp_path):
    """An image this run failed stays listed though it has (older) outputs, as under
    --overwrite, unless a retry wrote it; earlier runs' failures go once complete."""
    log = FailureLog(tmp_path / "failures.jsonl")
    for image_id in ("a", "b", "c"):
        log.add(dict(id=image_id, stage="decode", error="bad"))
    log.close(done=lambda image_id: True)
    assert [json.loads(x)["id"] for x in log.path.read_text().splitlines()] == ["a", "b", "c"]
    log = FailureLog(tmp_path / "failures.jsonl")
    log.add(dict(id="b", stage="write", error="disk full"))
    log.add(dict(id="c", stage="forward", error="oom"))
    log.recovered("c")
    log.close(done=lambda image_id: image_id != "a")
    kept = [json.loads(x) for x in log.path.read_text().splitlines()]
    assert [(x["id"], x["stage"]) for x in kept] == [("a", "decode"), ("b", "write")]
    assert log.count == 1


def test_resume_with_other_settings_is_refused(checkpoint, collection, tmp_path, capsys):
    out = tmp_path / "out"
    assert label(f"synthetic:{collection}", checkpoint, out, "--method", "cam") == 0
    masks = {p.name: p.read_bytes() for p in (out / "masks").iterdir()}
    assert label(f"synthetic:{collection}", checkpoint, out, "--bg-threshold", "0.5") == 2
    err = capsys.readouterr().err
    assert "method: 'cam' -> 'adcam'" in err and "bg_threshold: 0.3 -> 0.5" in err
    assert {p.name: p.read_bytes() for p in (out / "masks").iterdir()} == masks
    assert label(f"synthetic:{collection}", checkpoint, out, "--overwrite") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["written"] == len(masks) and summary["skipped_complete"] == 0  # all redone
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["method"] == "adcam" and run["overwriting"] is False
    assert not (out / OVERWRITE_MARK).exists()
    assert label(f"synthetic:{collection}", checkpoint, out, "--workers", "1") == 0  # speed only


@pytest.fixture
def one_image(tmp_path) -> ImageDataset:
    """A folder collection of one black image, ``a``, without labels."""
    (tmp_path / "imgs").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "imgs" / "a.png")
    return open_dataset(f"folder:{tmp_path / 'imgs'}")


def test_resume_with_another_precision_is_refused(one_image, tmp_path):
    """The extractor's arithmetic shifts the maps, so a resume must keep it; where it is
    not known (an extractor without it, a run.json written before it was recorded) any
    resumes."""
    dataset = one_image
    cfg, out = LabelConfig(classes_from="predictions"), tmp_path / "out"
    with begin_run(dataset, ["cat"], out, cfg, precision="bf16-autocast") as (_, summary, _):
        assert summary.precision == "bf16-autocast"
    with pytest.raises(ValueError, match="precision: 'bf16-autocast' -> 'fp32'"):
        with begin_run(dataset, ["cat"], out, cfg, precision="fp32"):
            pass
    run = json.loads((out / "run.json").read_text())
    assert run.pop("precision") == "bf16-autocast"
    (out / "run.json").write_text(json.dumps(run))
    with begin_run(dataset, ["cat"], out, cfg, precision="fp32"):
        pass
    assert json.loads((out / "run.json").read_text())["precision"] == "fp32"
    with begin_run(dataset, ["cat"], out, cfg, precision=None):
        pass
    assert json.loads((out / "run.json").read_text())["precision"] == "fp32"  # kept
    with pytest.raises(ValueError, match="precision: 'fp32' -> 'bf16-autocast'"):
        with begin_run(dataset, ["cat"], out, cfg, precision="bf16-autocast"):
            pass


def test_a_stopped_overwrite_resumes_with_only_what_it_had_not_redone(checkpoint, tmp_path):
    """An --overwrite with a failed image stops with that image's old outputs in place; run
    again with --overwrite it starts over, without it it redoes that image only, and then
    the folder resumes as any other. Files of a kind the overwrite does not write (an
    earlier run's maps) go with each redone image: a later run asking for them redoes it."""
    root = make_synthetic(tmp_path / "syn", 6, seed=2, size=64, val_fraction=0.0)
    data, out = f"synthetic:{root}", tmp_path / "out"
    assert label(data, checkpoint, out, "--method", "cam", "--save-cams") == 0
    broken = root / "JPEGImages" / "syn_000003.png"
    image = broken.read_bytes()
    broken.write_bytes(b"not an image")

    def summary() -> tuple[int, int, int]:
        s = json.loads((out / "summary.json").read_text())
        return s["written"], s["skipped_complete"], s["failed"]

    assert label(data, checkpoint, out, "--overwrite") == 1  # the others redone with adcam
    assert json.loads((out / "run.json").read_text())["overwriting"] is True
    began = (out / OVERWRITE_MARK).stat().st_mtime_ns
    assert (out / "masks" / "syn_000003.png").stat().st_mtime_ns < began  # the cam run's
    assert [p.stem for p in (out / "cams").iterdir()] == ["syn_000003"]  # not redone yet
    assert label(data, checkpoint, out, "--overwrite") == 1 and summary() == (5, 0, 1)
    assert (out / OVERWRITE_MARK).stat().st_mtime_ns > began  # started over
    began = (out / OVERWRITE_MARK).stat().st_mtime_ns
    broken.write_bytes(image)
    # a copy that kept its files' times (cp -a) carries on; one that did not (cp -r) has
    # outputs whose times say nothing, and starts over
    for name, copy, counts in (("kept", shutil.copy2, [1, 5]), ("lost", shutil.copyfile, [6, 0])):
        shutil.copytree(out, tmp_path / name, copy_function=copy)
        if name == "lost":  # copied just after the mark, as a listing order may have them
            later = (tmp_path / name / OVERWRITE_MARK).stat().st_mtime_ns + 1
            for path in (tmp_path / name / "masks").iterdir():
                os.utime(path, ns=(later, later))
        assert label(data, checkpoint, tmp_path / name) == 0
        s = json.loads((tmp_path / name / "summary.json").read_text())
        assert [s["written"], s["skipped_complete"]] == counts, name
    assert label(data, checkpoint, out) == 0 and summary() == (1, 5, 0)
    assert (out / "masks" / "syn_000003.png").stat().st_mtime_ns > began
    assert json.loads((out / "run.json").read_text())["overwriting"] is False
    assert not (out / OVERWRITE_MARK).exists() and not (out / "failures.jsonl").read_text()
    assert label(data, checkpoint, out) == 0 and summary() == (0, 6, 0)
    assert not any((out / "cams").iterdir())
    assert label(data, checkpoint, out, "--save-cams") == 0 and summary() == (6, 0, 0)


def test_an_overwrite_stopped_as_it_begins_is_in_force(one_image, tmp_path, monkeypatch):
    """A stop between an overwrite's mark and run.json's record of its time (a Ctrl-C, a
    crash) leaves the overwrite in force: the next run without --overwrite redoes all."""
    dataset, out = one_image, tmp_path / "out"
    cfg = LabelConfig(classes_from="predictions")
    with begin_run(dataset, ["cat"], out, cfg) as (outputs, _, todo):
        assert todo == [0]
        outputs.file("masks", "a").parent.mkdir()
        outputs.file("masks", "a").write_bytes(b"an earlier run's")
    write = label_module.atomic_write_json

    def stop_after_the_mark(path, *args, **kwargs):
        if Path(path).name == "run.json" and (out / OVERWRITE_MARK).exists():
            raise KeyboardInterrupt
        return write(path, *args, **kwargs)

    monkeypatch.setattr(label_module, "atomic_write_json", stop_after_the_mark)
    overwrite = dataclasses.replace(cfg, overwrite=True)
    with pytest.raises(KeyboardInterrupt), begin_run(dataset, ["cat"], out, overwrite):
        pass
    monkeypatch.undo()
    with begin_run(dataset, ["cat"], out, cfg) as (outputs, _, todo):
        assert todo == [0] and outputs.redo_before is not None


def test_a_folder_being_labelled_is_refused(checkpoint, collection, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".lock", "a") as held:  # as another process's run holds it
        fcntl.flock(held, fcntl.LOCK_EX)
        assert label(f"synthetic:{collection}", checkpoint, out) == 2
    assert "another adcam label run is writing there" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == [".lock"]
    assert label(f"synthetic:{collection}", checkpoint, out) == 0  # once it is let go


def test_a_run_that_raises_lets_go_of_its_folder(checkpoint, collection, tmp_path, monkeypatch):
    """An error after the folder is locked (here: the COCO join, as on a full disk) releases
    it, so that another process may label there."""
    out = tmp_path / "out"

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Outputs, "finish", full)
    with pytest.raises(OSError, match="No space left"):
        label(f"synthetic:{collection}", checkpoint, out)
    with open(out / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if still held


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--k", "0"], r"k \(--k\) must be >= 1, got 0"),
        (["--steps", "-1"], r"steps \(--steps\) must be >= 0"),
        (["--max-side", "0"], r"max_side \(--max-side\) must be >= 1"),
        (["--writers", "0"], r"writers \(--writers\) must be >= 1"),
        (["--bg-threshold", "1.5"], r"bg_threshold \(--bg-threshold\) must be in \[0, 1\]"),
        (["--scales", "1,inf"], r"scales \(--scales\) must be finite and positive"),
        (["--scales", "1,nan"], r"scales \(--scales\) must be finite and positive"),
        (["--cpus-per-worker", "2", "--ray-workers", "1,2"], "--cpus-per-worker, --ray-workers: "),
        # a device that the kernels never run on (CPU tensors do under the interpreter)
        (["--adcam-backend", "triton", "--device", "meta"], "the triton backend runs on CUDA"),
        (["--device", "cpux"], "device 'cpux' is not a torch device"),
        (["--device", "cuda:99"], r"device cuda:99: (no CUDA device is|only \d+ CUDA)"),
    ],
)
def test_bad_options_fail_before_any_work(
    checkpoint, collection, tmp_path, capsys, option, message
):
    assert label(f"synthetic:{collection}", checkpoint, tmp_path / "out", *option) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", ["cam", "product", "diffusion"])
def test_ablation_methods_run(checkpoint, collection, tmp_path, method):
    assert label(f"synthetic:{collection}", checkpoint, tmp_path / method, "--method", method) == 0


def _bad_collection(root: Path) -> Path:
    """A folder of images, good and bad, with a labels file naming them."""
    d = root / "images"
    d.mkdir()
    rng = np.random.default_rng(0)

    def rgb(h: int, w: int) -> np.ndarray:
        return rng.integers(0, 255, (h, w, 3), dtype=np.uint8)

    Image.fromarray(rgb(40, 50)).save(d / "good.jpg")
    (d / "empty.jpg").write_bytes(b"")
    buf = (d / "good.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(buf[: len(buf) // 3])
    (d / "text.jpg").write_text("not an image")
    Image.fromarray(rgb(30, 30)[..., 0]).save(d / "gray.png")
    Image.fromarray(rgb(30, 40)).convert("CMYK").save(d / "cmyk.jpg")
    Image.fromarray((rng.integers(0, 65535, (20, 20))).astype(np.uint16)).save(d / "deep.png")
    Image.fromarray(np.dstack([rgb(25, 25), rgb(25, 25)[..., :1]])).save(d / "rgba.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    Image.fromarray(rgb(20, 40)).save(d / "rotated.jpg", exif=exif)
    Image.fromarray(rgb(1, 1)).save(d / "tiny.png")
    Image.fromarray(rgb(300, 200)).save(d / "huge.png")
    names = SyntheticDataset(1).class_names
    rows = [f"{f.name},{names[0]}" for f in sorted(d.iterdir())]
    rows.append(f"good.jpg_copy.png,{names[1]}")  # missing image
    Image.fromarray(rgb(10, 10)).save(d / "unknown.png")
    rows.append(f"unknown.png,{names[0]};zebra")  # a class not in the list
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    (root / "classes.txt").write_text("\n".join(names) + "\n")
    return root


def test_bad_inputs_are_reported_and_the_rest_goes_on(checkpoint, tmp_path):
    root = _bad_collection(tmp_path)
    out = tmp_path / "out"
    data = f"folder:{root / 'images'}:{root / 'labels.csv'}:{root / 'classes.txt'}"
    rc = label(data, checkpoint, out, "--max-side", "128")
    assert rc == 1
    failed = {json.loads(line)["id"] for line in (out / "failures.jsonl").read_text().splitlines()}
    assert failed == {"empty", "truncated", "text", "good.jpg_copy", "unknown"}
    ok = {"good", "gray", "cmyk", "deep", "rgba", "rotated", "tiny", "huge"}
    assert {p.stem for p in (out / "masks").iterdir()} == ok
    assert load_mask(out / "masks" / "rotated.png").shape == (40, 20)  # EXIF applied
    assert load_mask(out / "masks" / "huge.png").shape == (128, 85)  # bounded by --max-side
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failed"] == 5 and summary["written"] == 8
    # mended, an image leaves failures.jsonl; the others are listed once, not once a run
    Image.fromarray(np.zeros((9, 9, 3), np.uint8)).save(root / "images" / "text.jpg", "PNG")
    assert label(data, checkpoint, out, "--max-side", "128") == 1
    failed = [json.loads(line)["id"] for line in (out / "failures.jsonl").read_text().splitlines()]
    assert sorted(failed) == ["empty", "good.jpg_copy", "truncated", "unknown"]


def test_unlabeled_collection_uses_predictions(checkpoint, tmp_path):
    d = tmp_path / "plain"
    d.mkdir()
    for i in range(3):
        Image.fromarray(SyntheticDataset(3, size=64)[i].image).save(d / f"{i}.png")
    out = tmp_path / "out"
    names = SyntheticDataset(1).class_names
    (tmp_path / "classes.txt").write_text("\n".join(names))
    data = f"folder:{d}::{tmp_path / 'classes.txt'}"
    assert label(data, checkpoint, out) == 2  # labels needed unless predictions are asked for
    assert label(data, checkpoint, out, "--classes-from", "predictions") == 0
    assert len(list((out / "masks").iterdir())) == 3


def test_wrong_checkpoint_fails_before_any_work(collection, tmp_path, capsys):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"nope")
    assert label(f"synthetic:{collection}", junk, tmp_path / "out") == 2
    assert "junk.pth" in capsys.readouterr().err
    exported = tmp_path / "model.onnx"  # an export, given to the default torch backend
    exported.write_bytes(b"nope")
    assert label(f"synthetic:{collection}", exported, tmp_path / "out") == 2
    assert "model.onnx: an exported file: pass --backend onnx" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_class_mismatch_fails_before_any_work(checkpoint, tmp_path, capsys):
    d = tmp_path / "imgs"
    d.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(d / "a.png")
    (tmp_path / "l.csv").write_text("a.png,cat\n")
    assert label(f"folder:{d}:{tmp_path / 'l.csv'}", checkpoint, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "the checkpoint's 8 classes ['boat'" in err
    assert "differ from the dataset's 1 ['cat']" in err
    assert not (tmp_path / "out" / "masks").exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killed_run_resumes_without_loss_or_rework(checkpoint, tmp_path, sig):
    root = make_synthetic(tmp_path / "syn", 40, seed=5, size=64, val_fraction=0.0)
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "adcam_fast.cli", "label", "--data", f"synthetic:{root}"]
    argv += ["--checkpoint", str(checkpoint), "--out", str(out), *FAST, "--quiet"]
    argv[argv.index("--batch-size") + 1] = "1"
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    masks = out / "masks"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(masks.glob("*.png"))) < 3:
        time.sleep(0.05)
    os.kill(proc.pid, sig)
    proc.wait(timeout=60)
    done = {p: p.stat().st_mtime_ns for p in masks.glob("*.png")}
    assert 3 <= len(done) < 40, "the run must be stopped mid-way"
    if sig == signal.SIGTERM:
        assert proc.returncode == 130
        assert json.loads((out / "summary.json").read_text())["interrupted"]
    for p in done:
        load_mask(p)  # every finished file is whole
    rerun = subprocess.run(argv, capture_output=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr.decode()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_complete"] == len(done)
    assert summary["written"] == 40 - len(done)
    assert len(list(masks.glob("*.png"))) == 40
    assert {p: p.stat().st_mtime_ns for p in done} == done


def test_output_files_and_coco_ids(tmp_path):
    outputs = Outputs(tmp_path, ["cat"], cams=True)
    assert outputs.files("a/b") == [tmp_path / "masks" / "a/b.png", tmp_path / "cams" / "a/b.npz"]
    for bad in ("/etc/x", "../x", "a/../../x", ""):
        with pytest.raises(ValueError, match="would write outside"):
            outputs.files(bad)
    assert coco_image_ids(["7", "12"]) == {"7": 7, "12": 12}
    # numbers only where no id would take another's: else every id by position
    assert coco_image_ids(["1", "2", "cat"]) == {"1": 0, "2": 1, "cat": 2}
    assert coco_image_ids(["1", "01"]) == {"1": 0, "01": 1}
    assert coco_image_ids(["²"]) == {"²": 0}


def test_coco_categories_follow_the_checkpoint_classes(tmp_path):
    """With classes from predictions, a dataset's own categories apply only where its
    classes are the checkpoint's."""
    d = tmp_path / "imgs"
    d.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(d / "a.png")
    (tmp_path / "c.txt").write_text("cat\ndog\n")
    dataset = open_dataset(f"folder:{d}::{tmp_path / 'c.txt'}")
    cfg = LabelConfig(classes_from="predictions", coco=True)
    for names, ids in ((["cat", "dog"], [17, 18]), (["boat"], [1])):
        with begin_run(dataset, names, tmp_path / "_".join(names), cfg, None, [17, 18]) as run:
            assert run[0].category_ids == ids


def test_product_weighs_every_scale_alike():
    """Under uniform attention every token receives the same attention: ``product`` is the
    CAM itself at any N, so the scales' sum is not tilted toward small grids."""
    for n in (4, 16, 144):
        A = torch.full((1, n, n), 1.0 / n, dtype=torch.float64)
        cams = torch.rand(1, 2, n, dtype=torch.float64)
        torch.testing.assert_close(localise("product", A, cams, 5, 2), cams)


def test_info_names_versions_device_kernels_and_models(capsys):
    import adcam_fast
    from adcam_fast.kernels.launch import unusable

    assert main(["info"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"adcam_fast {adcam_fast.__version__}"
    assert f"torch {torch.__version__}" in out[1]
    problem = unusable()
    assert out[3] == f"triton kernels: {'usable' if problem is None else f'not usable ({problem})'}"
    models = out[4].removeprefix("models: ").split(", ")
    assert {"conformer_tiny_patch16", "conformer_small_patch16"} <= set(models)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_stop_flag_takes_sigint_and_sigterm_then_restores_the_handlers(sig):
    """Ctrl-C stops a run as SIGTERM does (the subprocess test above sends SIGTERM)."""
    before = signal.getsignal(sig)
    with StopFlag() as stop:
        os.kill(os.getpid(), sig)
        assert stop.event.wait(5)
    assert signal.getsignal(sig) is before

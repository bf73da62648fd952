"""``adcam label``: pseudo-label a collection, fast and without losing work (DESIGN.md §5).

Data path, one direction only:

    DataLoader workers: decode (robust), resize to input_size², uint8   [failures recorded]
    device, per scale s and its flip: extractor -> F, A at N_s tokens
        CAM = Eq. 2 of F for the image's classes; M = localise(method, A, CAM)
        un-flip, resize to the merge grid, sum over scales and flips
    Eq. 2 of the sum -> one host copy per batch
    writer threads: resize to the image, seeds with bg_threshold, atomic outputs

Images are resized to a square ``input_size`` (at scale s: the nearest multiple of the patch
size to ``s · input_size``), so every batch has one shape per scale and scale 1 of a 384
input has N = 576 tokens. Outputs are written to temporary names and renamed; a rerun skips
images whose outputs are complete; SIGINT / SIGTERM stop after the batches in flight are
written. Bad images are listed in ``failures.jsonl`` and the rest go on (a batch whose
forward pass raises is run again an image at a time, so that only the bad one fails).

The per-batch work is shared with the Ray engine (:mod:`adcam_fast.pipeline.ray_engine`):
:func:`decode_item` and :func:`collate` make a batch, :func:`forward_batch` runs the
:class:`Labeller` on it, :func:`write_record` finishes one image (:func:`label_batch` does
both, writing in the caller's thread or pool); :func:`begin_run` and :func:`end_run` check,
plan and close a run, :class:`FailureLog` keeps ``failures.jsonl``. Every function that
handles images returns per-image records: ``{"id", "status": "written"}`` or
``{"id", "status": "failed", "stage", "error"}``.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import platform
import signal
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import IO

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from adcam_fast.cam import merge_scales, normalize_cam, seed_labels
from adcam_fast.data.base import ImageDataset
from adcam_fast.export.backends import Extractor, InputRange, export_inputs
from adcam_fast.export.onnx import expect_kind, read_info
from adcam_fast.export.tensorrt import Profile
from adcam_fast.io import atomic_write, atomic_write_json, file_sha256, writable_folder
from adcam_fast.pipeline.methods import METHODS, Method, localise
from adcam_fast.pipeline.writers import LabelResult, Outputs

log = logging.getLogger(__name__)


@dataclass
class LabelConfig:
    """Everything that shapes the output of a labelling run (recorded in summary.json)."""

    method: Method = "adcam"
    scales: tuple[float, ...] = (1.0, 0.5, 1.5, 2.0)
    flip: bool = True
    input_size: int = 384
    k: int = 50
    steps: int = 2
    bg_threshold: float = 0.3
    classes_from: str = "labels"  # or "predictions"
    pred_threshold: float = 0.5
    adcam_backend: str = "auto"
    batch_size: int = 8
    workers: int = 2
    writers: int = 4
    max_side: int | None = 4096
    cams: bool = False
    coco: bool = False
    overlays: bool = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        """Raises ValueError naming the field (and its ``adcam label`` option)."""

        def check(name: str, ok: bool, rule: str) -> None:
            if not ok:
                flag = name.replace("_", "-")
                raise ValueError(f"{name} (--{flag}) must be {rule}, got {getattr(self, name)!r}")

        check("method", self.method in METHODS, f"one of {METHODS}")
        check("classes_from", self.classes_from in ("labels", "predictions"),
              "labels or predictions")  # fmt: skip
        finite = all(math.isfinite(s) and s > 0 for s in self.scales)
        check("scales", bool(self.scales) and finite, "finite and positive")
        least = dict(input_size=16, k=1, steps=0, batch_size=1, workers=0, writers=1, max_side=1)
        for name, low in least.items():
            value = getattr(self, name)
            check(name, (value is None and name == "max_side") or value >= low, f">= {low}")
        for name in ("bg_threshold", "pred_threshold"):
            check(name, 0 <= getattr(self, name) <= 1, "in [0, 1]")

    def shaping(self) -> dict:
        """The fields that decide an image's outputs (not how fast they come, nor which
        files are written): a resumed run must have the same."""
        fast = ("adcam_backend", "batch_size", "workers", "writers", "cams", "coco", "overlays")
        return {k: v for k, v in asdict(self).items() if k not in (*fast, "overwrite")}


@dataclass
class Summary:
    """The run's counts, timings and provenance, written to summary.json.

    ``startup_seconds``: from the start (extractor loaded; on Ray, after the checkpoint probe)
    to the first finished batch: loader or actor start, model load on Ray, first batch.
    ``workers``: per Ray actor id, its node, the images it reported, its busy seconds and
    images/s; empty for the local engine. ``precision``: the extractor's (``Extractor``).
    """

    engine: str = "local"
    total: int = 0
    skipped_complete: int = 0
    written: int = 0
    failed: int = 0
    interrupted: bool = False
    seconds: float = 0.0
    startup_seconds: float = 0.0
    images_per_second: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    failures_file: str = "failures.jsonl"
    config: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    checkpoint: dict = field(default_factory=dict)
    precision: str | None = None
    workers: dict[str, dict] = field(default_factory=dict)


def describe_error(e: BaseException) -> str:
    """An exception as one line of a failure record: ``Type: message``."""
    return f"{type(e).__name__}: {e}"


def decode_item(dataset: ImageDataset, index: int, size: int, keep_image: bool) -> dict:
    """Item ``index`` of ``dataset`` decoded and resized to ``size``² uint8: ``{id, x (3, size,
    size) uint8 tensor, labels, shape (H, W), image (H, W, 3) or None}``; or, when anything
    about the item fails, ``{id, error}`` (never raises for a bad item)."""
    image_id = dataset.ids[index]
    try:
        s = dataset[index]
        x = torch.from_numpy(s.image).permute(2, 0, 1)
        x = F.interpolate(x[None].float(), size=(size, size), mode="bilinear", antialias=True)[0]
        return dict(
            id=image_id,
            x=x.round().clamp(0, 255).to(torch.uint8),
            labels=s.labels,
            shape=s.image.shape[:2],
            image=s.image if keep_image else None,
        )
    except Exception as e:  # any bad item is reported, never fatal
        return dict(id=image_id, error=describe_error(e))


class _Decoded(Dataset):
    """Items of the images still to do, decoded in DataLoader workers (:func:`decode_item`)."""

    def __init__(self, dataset: ImageDataset, indices: list[int], size: int, keep: bool):
        self.dataset, self.indices, self.size, self.keep = dataset, indices, size, keep

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> dict:
        return decode_item(self.dataset, self.indices[j], self.size, self.keep)


def collate(items: list[dict]) -> dict:
    """A batch of :func:`decode_item` results: the failed items, and the ids, stacked ``x``
    (None when every item failed), labels, shapes and images of the others."""
    ok = [it for it in items if "error" not in it]
    return dict(
        failed=[it for it in items if "error" in it],
        ids=[it["id"] for it in ok],
        x=torch.stack([it["x"] for it in ok]) if ok else None,
        labels=[it["labels"] for it in ok],
        shapes=[it["shape"] for it in ok],
        images=[it["image"] for it in ok],
    )


def written(image_id: str) -> dict:
    """The record of an image whose outputs are complete."""
    return dict(id=image_id, status="written")


def failed(image_id: str, stage: str, error: str) -> dict:
    """The record of an image that failed at ``stage`` (decode, forward, write, lost)."""
    return dict(id=image_id, status="failed", stage=stage, error=error)


def _side(size: int, scale: float, patch: int) -> int:
    """The side of a ``size`` image at ``scale``, a multiple of the patch size."""
    return max(patch, round(size * scale / patch) * patch)


def _scaled(x: Tensor, scale: float, patch: int) -> Tensor:
    side = _side(x.shape[-1], scale, patch)
    if side == x.shape[-1]:
        return x
    return F.interpolate(x, size=(side, side), mode="bilinear", antialias=side < x.shape[-1])


def _class_index(classes: list[np.ndarray], device: torch.device) -> tuple[Tensor, Tensor]:
    """Padded (B, C) class indices and their validity mask from per-image index arrays."""
    width = max(1, max(len(c) for c in classes))
    idx = torch.zeros(len(classes), width, dtype=torch.long)
    valid = torch.zeros(len(classes), width, dtype=torch.bool)
    for b, c in enumerate(classes):
        idx[b, : len(c)] = torch.as_tensor(c, dtype=torch.long)
        valid[b, : len(c)] = True
    return idx.to(device), valid.to(device)


def _fed(cfg: LabelConfig, patch_size: int) -> tuple[tuple[int, int], list[int]]:
    """The batches (least, most; flipped copies included) and the sorted square image sides
    that a run with ``cfg`` feeds an extractor of ``patch_size``."""
    batches = (1, cfg.batch_size) if not cfg.flip else (2, 2 * cfg.batch_size)
    return batches, sorted({_side(cfg.input_size, s, patch_size) for s in cfg.scales})


def tensorrt_profile(cfg: LabelConfig, onnx_path: str | Path) -> Profile:
    """The TensorRT profile that takes exactly what a run with ``cfg`` feeds the extractor
    exported to ``onnx_path``: optimal at full batches of scale 1's side (the scale nearest
    1). Raises ValueError naming the file when it cannot be read or is not an extractor,
    and as `Labeller` does when the export has a fixed size the run does not feed: before
    an engine is built."""
    info = read_info(onnx_path)
    expect_kind(info, "extractor", onnx_path)
    _check_inputs(export_inputs(info, onnx_path), info.stride, cfg)
    (least, most), sides = _fed(cfg, info.stride)
    nearest = min(cfg.scales, key=lambda s: abs(s - 1.0))
    size = (sides[0], _side(cfg.input_size, nearest, info.stride), sides[-1])
    return Profile.for_info(info, (least, most, most), size)


def _check_inputs(accepts: InputRange, patch_size: int, cfg: LabelConfig) -> None:
    """Raises ValueError, naming the options, when a run would feed an extractor of
    ``patch_size`` batches or image sides it does not take (a fixed-size export, a TensorRT
    profile)."""
    (least, most), sides = _fed(cfg, patch_size)
    if not accepts.batch[0] <= least <= most <= accepts.batch[1]:
        raise ValueError(
            f"--batch-size {cfg.batch_size} feeds batches of {least} to {most} images (flipped "
            f"copies included), but {accepts.source} takes {accepts.batch[0]} to "
            f"{accepts.batch[1]}"
        )
    lo, hi = accepts.side
    if not lo <= sides[0] <= sides[-1] <= hi:
        scales = ",".join(f"{s:g}" for s in cfg.scales)
        raise ValueError(
            f"--input-size {cfg.input_size} at --scales {scales} feeds image sides {sides}, "
            f"but {accepts.source} takes sides {lo} to {hi}"
        )


class Labeller:
    """Runs :class:`LabelConfig`'s method (or several methods sharing one extraction) on
    batches: uint8 images -> merged normalised maps."""

    def __init__(
        self, extractor: Extractor, config: LabelConfig, methods: tuple[Method, ...] = ()
    ) -> None:
        self.ex, self.cfg = extractor, config
        self.methods = methods or (config.method,)
        dev = extractor.device
        if config.adcam_backend == "triton":  # else each batch would fail alike
            from adcam_fast.kernels.launch import check_runnable

            check_runnable(torch.empty(0, device=dev))
        accepts = getattr(extractor, "inputs", InputRange())  # an extractor written before it
        _check_inputs(accepts, extractor.patch_size, config)
        self.mean = torch.tensor(extractor.mean, device=dev).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(extractor.std, device=dev).view(1, 3, 1, 1) * 255
        self.grid = config.input_size // 4
        # The scale closest to 1 goes first: its logits give predicted classes.
        self.scales = sorted(config.scales, key=lambda s: abs(s - 1.0))
        self.timer: dict[str, float] = defaultdict(float)

    def _tick(self, stage: str, t0: float) -> float:
        if self.ex.device.type == "cuda":
            torch.cuda.synchronize(self.ex.device)
        t = time.perf_counter()
        self.timer[stage] += t - t0
        return t

    def classes(self, labels: list[np.ndarray | None], logits: Tensor) -> list[np.ndarray]:
        """Class indices per image: from the labels, or from the classifier's scores."""
        if self.cfg.classes_from == "labels":
            return [np.flatnonzero(lab > 0) for lab in labels]
        probs = logits.sigmoid().cpu().numpy()
        # An image holds at least one class: the most likely one when none passes.
        return [
            np.flatnonzero(p >= self.cfg.pred_threshold)
            if (p >= self.cfg.pred_threshold).any()
            else np.array([p.argmax()])
            for p in probs
        ]

    @torch.inference_mode()
    def __call__(
        self, x: Tensor, labels: list[np.ndarray | None]
    ) -> tuple[dict[str, Tensor], list[np.ndarray]]:
        """uint8 (B, 3, S, S) -> per method, merged maps (B, C, G, G) on the CPU; classes."""
        cfg, dev, n = self.cfg, self.ex.device, len(x)
        t = time.perf_counter()
        x = (x.to(dev, non_blocking=True).float() - self.mean) / self.std
        per_scale: dict[str, list[Tensor]] = {m: [] for m in self.methods}
        flipped: list[bool] = []
        classes, idx, valid = None, None, None
        for scale in self.scales:
            xs = _scaled(x, scale, self.ex.patch_size)
            if cfg.flip:
                xs = torch.cat([xs, xs.flip(-1)])
            out = self.ex(xs)
            t = self._tick("forward", t)
            if classes is None:
                classes = self.classes(labels, out.logits[:n])
                idx, valid = _class_index(classes, dev)
            b2, _, h, w = out.cams.shape
            sel = out.cams.gather(1, idx.repeat(b2 // n, 1)[..., None, None].expand(-1, -1, h, w))
            cams = normalize_cam(sel.flatten(-2), spatial_dims=1)
            for method in self.methods:
                maps = localise(method, out.attention, cams, cfg.k, cfg.steps, cfg.adcam_backend)
                per_scale[method] += maps.view(b2, -1, h, w).split(n)
            flipped += [False, True] if cfg.flip else [False]
            t = self._tick("adcam", t)
        size = (self.grid, self.grid)
        merged = {
            m: (merge_scales(v, size, flipped) * valid[..., None, None]).cpu()
            for m, v in per_scale.items()
        }
        return merged, classes


@dataclass(frozen=True, eq=False)
class ImageMaps:
    """One image's merged maps (C', G, G) on the CPU (C' >= its class count, padded), its
    class indices (C,), its size (H, W), and the decoded image when overlays need it."""

    id: str
    maps: Tensor
    classes: np.ndarray
    shape: tuple[int, int]
    image: np.ndarray | None


def forward_batch(
    labeller: Labeller, cfg: LabelConfig, batch: dict
) -> tuple[list[dict], list[ImageMaps]]:
    """Run ``labeller`` on a :func:`collate` batch: the failure records (decode failures, and
    the images whose forward raises) and the maps of the other images. Where the batch's
    forward raises, each image is run alone (the batch's memory freed first), so that one
    bad image (non-finite attention, say) fails only itself; a warning names the error."""
    records = [failed(it["id"], "decode", it["error"]) for it in batch["failed"]]
    if batch["x"] is None:
        return records, []
    try:
        maps, classes = labeller(batch["x"], batch["labels"])
    except Exception as e:  # reported, not fatal
        error = describe_error(e)  # (e, whose traceback holds the batch's tensors, goes here)
    else:
        maps = maps[cfg.method]
        images = [
            ImageMaps(image_id, maps[b], classes[b], batch["shapes"][b], batch["images"][b])
            for b, image_id in enumerate(batch["ids"])
        ]
        return records, images
    if len(batch["ids"]) == 1:
        return [*records, failed(batch["ids"][0], "forward", error)], []
    log.warning("a batch of %d images failed (%s): running each alone", len(batch["ids"]), error)
    if labeller.ex.device.type == "cuda":
        torch.cuda.empty_cache()  # after an out-of-memory error, the singles need it
    images = []
    for b in range(len(batch["ids"])):
        alone = {k: v[b : b + 1] for k, v in batch.items()} | dict(failed=[])
        more, done = forward_batch(labeller, cfg, alone)
        records, images = records + more, images + done
    return records, images


def write_image(outputs: Outputs, cfg: LabelConfig, item: ImageMaps) -> None:
    """Resize ``item``'s maps to the image, threshold them into seeds and write every output
    atomically (raises on a failed write)."""
    c = len(item.classes)
    maps = item.maps[:c]
    full = (
        F.interpolate(maps[None], size=item.shape, mode="bilinear")[0]
        if c
        else maps.new_zeros(0, *item.shape)
    )
    class_ids = item.classes + 1
    mask = seed_labels(full, class_ids, cfg.bg_threshold).numpy().astype(np.uint8)
    outputs.write(
        LabelResult(id=item.id, mask=mask, maps=maps.numpy(), class_ids=class_ids, image=item.image)
    )


def write_record(outputs: Outputs, cfg: LabelConfig, item: ImageMaps) -> dict:
    """:func:`write_image`, as a record (a failed write is reported, not raised)."""
    try:
        write_image(outputs, cfg, item)
    except Exception as e:
        return failed(item.id, "write", describe_error(e))
    return written(item.id)


def label_batch(
    labeller: Labeller,
    outputs: Outputs,
    cfg: LabelConfig,
    batch: dict,
    pool: Executor | None = None,
) -> list[dict]:
    """Label and write a :func:`collate` batch; one record per item, in no particular order.

    Writes run in ``pool`` when given (returning once all are done), else in this thread;
    their time is added to ``labeller.timer["write"]``.
    """
    records, images = forward_batch(labeller, cfg, batch)
    t = time.perf_counter()
    write = partial(write_record, outputs, cfg)
    records += pool.map(write, images) if pool is not None else map(write, images)
    labeller.timer["write"] += time.perf_counter() - t
    return records


class FailureLog:
    """The run's ``failures.jsonl``: one flushed line ``{id, stage, error}`` appended per
    failed image as it fails (so a crash keeps them). ``count``: the images this run failed
    (and did not write on a retry). `close` rewrites the file with the latest line of each
    image that this run failed or that is still not complete, so images that earlier runs
    failed and this one wrote drop out."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = open(path, "a")
        self._failed: set[str] = set()

    @property
    def count(self) -> int:
        return len(self._failed)

    def add(self, record: dict) -> None:
        line = dict(id=record["id"], stage=record["stage"], error=record["error"])
        self._file.write(json.dumps(line) + "\n")
        self._file.flush()
        self._failed.add(record["id"])

    def recovered(self, image_id: str) -> None:
        """A retry wrote ``image_id`` after it failed in this run."""
        self._failed.discard(image_id)

    def close(self, done: Callable[[str], bool]) -> None:
        """Close the file, keeping the images this run failed, and those for which
        ``done(id)`` is false (with ``--overwrite``, a failed image may keep old outputs)."""
        self._file.close()
        latest: dict[str, str] = {}
        for line in self.path.read_text().splitlines():
            try:
                latest[json.loads(line)["id"]] = line
            except (ValueError, KeyError, TypeError):  # a line cut short by a crash
                continue
        kept = "".join(
            f"{line}\n" for i, line in latest.items() if i in self._failed or not done(i)
        )
        atomic_write(self.path, lambda f: f.write(kept.encode()))


def checkpoint_info(path: str | Path) -> dict:
    """``{path, sha256}`` of the checkpoint, for the summary."""
    return dict(path=str(path), sha256=file_sha256(path))


OVERWRITE_MARK = ".overwrite-began"
"""In an output folder while an ``--overwrite`` is in progress: its mtime, recorded in
``run.json``, is when it began."""


def _hold(lock: IO[str], folder: Path) -> None:
    """Take an exclusive flock on ``lock``, ``folder``'s ``.lock`` (let go when it is
    closed). Raises ValueError when another run holds it, or the filesystem takes no locks."""
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ValueError(f"{folder}: another adcam label run is writing there") from None
    except OSError as e:
        raise ValueError(f"{folder}: cannot lock {folder / '.lock'} ({e.strerror})") from e


@contextmanager
def begin_run(
    dataset: ImageDataset,
    class_names: list[str],
    out_dir: Path,
    cfg: LabelConfig,
    checkpoint: dict | None = None,
    category_ids: list[int] | None = None,
    precision: str | None = None,
) -> Iterator[tuple[Outputs, Summary, list[int]]]:
    """Check the run, create ``out_dir`` and hold it for the block; yield its outputs, a
    summary to fill, and the indices of the images to do.

    ``out_dir/run.json`` records what decides the outputs (`LabelConfig.shaping`, the
    checkpoint's sha256, the extractor's ``precision``): a run resumes only where they are
    the same (an unknown precision, None or not recorded, is the same as any, and leaves
    the recorded one in place), unless
    ``cfg.overwrite``, which redoes every image. An overwrite that stops (interrupted, or
    with failures) is resumed by the next run with the same settings and without
    ``cfg.overwrite``: it redoes the images whose outputs are not newer than the overwrite's
    start (the mtime of `OVERWRITE_MARK`, by the output folder's clock), where that mark
    still has the mtime ``run.json`` recorded (else, for a folder copied without its times
    or an overwrite that a version without that record began, it starts over). COCO
    ``category_ids`` apply where the extractor's classes are the dataset's (else the
    categories are 1..K of the extractor's classes).

    Raises ValueError before writing anything when the extractor's ``class_names`` do not fit
    the dataset (with ``classes_from="labels"``), the collection has no labels and ``cfg``
    needs them, ``out_dir`` is a file or cannot be made, another process is labelling into
    it, or it holds a run with other settings.
    """
    if cfg.classes_from == "labels" and not dataset.has_labels:
        raise ValueError("the collection has no image labels: use --classes-from predictions")
    if dataset.class_names != class_names and cfg.classes_from == "labels":
        order = ""
        if sorted(dataset.class_names) == sorted(class_names):
            order = " (the same classes in another order: give the checkpoint's class list, "
            order += "as in folder:DIR:LABELS:CLASSES.txt)"
        raise ValueError(
            f"the checkpoint's {len(class_names)} classes {class_names[:5]}... "
            f"differ from the dataset's {len(dataset.class_names)} {dataset.class_names[:5]}..."
            f"{order}"
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir}: --out is a file, not a folder")
    folder = writable_folder(out_dir, "--out")
    with open(folder / ".lock", "a") as lock:
        _hold(lock, folder)
        yield _plan(dataset, class_names, folder, cfg, checkpoint, category_ids, precision)


def _plan(
    dataset: ImageDataset,
    class_names: list[str],
    out_dir: Path,
    cfg: LabelConfig,
    checkpoint: dict | None,
    category_ids: list[int] | None,
    precision: str | None,
) -> tuple[Outputs, Summary, list[int]]:
    """`begin_run`'s work once the folder is held: compare, record and plan."""
    sha = (checkpoint or {}).get("sha256")
    run = dict(config=cfg.shaping(), checkpoint_sha256=sha, precision=precision)
    run = json.loads(json.dumps(run))  # tuples as lists, as read back
    run_file = out_dir / "run.json"
    resumed, before = False, {}  # resumed: an overwrite in progress is carried on
    if run_file.is_file():
        changed, before = _earlier_run(run_file, run, cfg.overwrite)
        if changed and not cfg.overwrite:
            raise ValueError(
                f"{out_dir} holds a run with other settings ({'; '.join(changed)}): resuming "
                "would mix them; use --overwrite to redo every image, or another --out"
            )
        resumed = bool(before.get("overwriting")) and not changed and not cfg.overwrite
        if run["precision"] is None and not changed:  # unknown now: what was known stays
            run["precision"] = before.get("precision")
    overwriting, mark, began = cfg.overwrite or resumed, out_dir / OVERWRITE_MARK, None
    if overwriting:
        # Carried on from a mark with the time recorded only: a folder copied without its
        # files' times (cp -r) holds outputs whose times say nothing, so it starts over.
        began = before.get("overwrite_began_ns")
        if not (resumed and mark.is_file() and mark.stat().st_mtime_ns == began):
            # in force before the mark: a stop from here on starts the overwrite over
            atomic_write_json(run_file, run | dict(overwriting=True))
            atomic_write(mark, lambda f: None)
            began = mark.stat().st_mtime_ns
    atomic_write_json(run_file, run | dict(overwriting=overwriting, overwrite_began_ns=began))
    if dataset.class_names != class_names:
        category_ids = None
    outputs = Outputs(out_dir, class_names, cfg.cams, cfg.coco, cfg.overlays, category_ids, began)
    summary = Summary(
        total=len(dataset), config=asdict(cfg), checkpoint=checkpoint or {}, precision=precision
    )
    summary.versions = dict(python=platform.python_version(), torch=torch.__version__)
    todo = [i for i, image_id in enumerate(dataset.ids) if not outputs.done(image_id)]
    summary.skipped_complete = len(dataset) - len(todo)
    return outputs, summary, todo


def _earlier_run(run_file: Path, run: dict, overwrite: bool) -> tuple[list[str], dict]:
    """What ``run_file`` records differently from ``run`` (as ``"name: was -> now"``), and
    what it records. An unreadable file raises ValueError, unless ``overwrite`` (then it
    differs in everything and records nothing)."""
    try:
        before = json.loads(run_file.read_text())
        was = before["config"] | dict(checkpoint_sha256=before["checkpoint_sha256"])
    except (ValueError, KeyError, TypeError) as e:
        if overwrite:
            return ["run.json: unreadable"], {}
        raise ValueError(f"{run_file}: unreadable ({e}): use --overwrite to start over") from e
    now = run["config"] | dict(checkpoint_sha256=run["checkpoint_sha256"])
    changed = [f"{k}: {was.get(k)!r} -> {v!r}" for k, v in now.items() if was.get(k) != v]
    precisions = before.get("precision"), run["precision"]  # None: not known, takes any
    if None not in precisions and precisions[0] != precisions[1]:
        changed.append(f"precision: {precisions[0]!r} -> {precisions[1]!r}")
    return changed, before


def end_run(
    summary: Summary,
    outputs: Outputs,
    ids: list[str],
    seconds: float,
    numeric_ids: dict[str, int] | None = None,
) -> Summary:
    """Join the COCO fragments of ``ids``, set the timings and write ``summary.json``; after
    an overwrite that has now redone every image, mark ``run.json`` resumable as any run."""
    outputs.finish(ids, numeric_ids)
    redone = summary.skipped_complete + summary.written == summary.total
    if outputs.redo_before is not None and redone:
        run_file = outputs.root / "run.json"
        run = json.loads(run_file.read_text())
        atomic_write_json(run_file, run | dict(overwriting=False, overwrite_began_ns=None))
        (outputs.root / OVERWRITE_MARK).unlink(missing_ok=True)
    summary.seconds = seconds
    done = summary.written + summary.failed
    summary.images_per_second = done / seconds if seconds else 0.0
    atomic_write_json(outputs.root / "summary.json", asdict(summary), default=str)
    return summary


class StopFlag:
    """Set by SIGINT / SIGTERM while installed; the run stops after the batches in flight."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self._old: dict[int, object] = {}

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, lambda *_: self.event.set())
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def label_dataset(
    dataset: ImageDataset,
    extractor: Extractor,
    out_dir: str | Path,
    config: LabelConfig,
    checkpoint: str | Path | None = None,
    progress: bool = True,
    numeric_ids: dict[str, int] | None = None,
    category_ids: list[int] | None = None,
) -> Summary:
    """Label every image of ``dataset`` into ``out_dir``; returns (and writes) the summary.

    Raises ValueError before any work where `begin_run` does, and for an ``adcam_backend``
    that cannot run on the extractor's device.
    """
    cfg, out = config, Path(out_dir)
    labeller = Labeller(extractor, cfg)
    with begin_run(
        dataset,
        extractor.class_names,
        out,
        cfg,
        checkpoint_info(checkpoint) if checkpoint is not None else None,
        category_ids,
        getattr(extractor, "precision", None),  # an extractor written before it: unknown
    ) as (outputs, summary, todo):
        summary.versions["device"] = str(extractor.device)
        failures = FailureLog(out / summary.failures_file)
        loader = DataLoader(
            _Decoded(dataset, todo, cfg.input_size, cfg.overlays),
            batch_size=cfg.batch_size,
            num_workers=cfg.workers,
            collate_fn=collate,
            pin_memory=extractor.device.type == "cuda",
            persistent_workers=False,
        )
        pending: deque[Future] = deque()

        def drain(limit: int) -> None:
            while len(pending) > limit:
                record = pending.popleft().result()
                if record["status"] == "written":
                    summary.written += 1
                else:
                    failures.add(record)

        start = time.perf_counter()
        bar = progress_bar(len(todo), progress)
        with StopFlag() as stop, ThreadPoolExecutor(cfg.writers) as pool:
            t = time.perf_counter()
            for batch in _iterate(loader, stop.event):
                labeller.timer["decode_wait"] += time.perf_counter() - t
                records, images = forward_batch(labeller, cfg, batch)
                for record in records:
                    failures.add(record)
                pending.extend(pool.submit(write_record, outputs, cfg, item) for item in images)
                t_w = time.perf_counter()
                drain(4 * cfg.batch_size)
                labeller.timer["write_wait"] += time.perf_counter() - t_w
                bar.update(len(batch["ids"]) + len(batch["failed"]))
                t = time.perf_counter()
                summary.startup_seconds = summary.startup_seconds or t - start
            drain(0)
            summary.interrupted = stop.event.is_set()
        bar.close()
        failures.close(outputs.done)
        summary.failed = failures.count
        summary.stage_seconds = dict(labeller.timer)
        return end_run(summary, outputs, dataset.ids, time.perf_counter() - start, numeric_ids)


def _iterate(loader: DataLoader, stop: threading.Event) -> Iterator[dict]:
    for batch in loader:
        yield batch
        if stop.is_set():
            return


def progress_bar(total: int, enabled: bool):
    """A tqdm bar over ``total`` images (hidden when not ``enabled``)."""
    from tqdm import tqdm

    return tqdm(total=total, unit="img", disable=not enabled, dynamic_ncols=True)

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
written. Bad images are listed in ``failures.jsonl`` and the rest go on.
"""

from __future__ import annotations

import json
import platform
import signal
import threading
import time
from collections import defaultdict, deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from adcam_fast.cam import normalize_cam, seed_labels
from adcam_fast.data.base import ImageDataset
from adcam_fast.export.backends import Extractor
from adcam_fast.io import atomic_write, file_sha256
from adcam_fast.pipeline.methods import Method, localise
from adcam_fast.pipeline.writers import LabelResult, Outputs


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
        if self.classes_from not in ("labels", "predictions"):
            raise ValueError(f"classes_from must be labels or predictions, got {self.classes_from}")
        if not self.scales or min(self.scales) <= 0:
            raise ValueError(f"scales must be positive, got {self.scales}")
        if self.batch_size < 1 or self.input_size < 16:
            raise ValueError("batch_size must be >= 1 and input_size >= 16")


@dataclass
class Summary:
    """The run's counts, timings and provenance, written to summary.json."""

    total: int = 0
    skipped_complete: int = 0
    written: int = 0
    failed: int = 0
    interrupted: bool = False
    seconds: float = 0.0
    images_per_second: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    failures_file: str = "failures.jsonl"
    config: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    checkpoint: dict = field(default_factory=dict)


class _Decoded(Dataset):
    """Items of the images still to do, decoded in DataLoader workers; errors become records."""

    def __init__(self, dataset: ImageDataset, indices: list[int], size: int, keep: bool):
        self.dataset, self.indices, self.size, self.keep = dataset, indices, size, keep

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> dict:
        i = self.indices[j]
        image_id = self.dataset.ids[i]
        try:
            s = self.dataset[i]
            x = torch.from_numpy(s.image).permute(2, 0, 1)
            x = F.interpolate(
                x[None].float(), size=(self.size, self.size), mode="bilinear", antialias=True
            )[0]
            return dict(
                id=image_id,
                x=x.round().clamp(0, 255).to(torch.uint8),
                labels=s.labels,
                shape=s.image.shape[:2],
                image=s.image if self.keep else None,
            )
        except Exception as e:  # any bad item is reported, never fatal
            return dict(id=image_id, error=f"{type(e).__name__}: {e}")


def _collate(items: list[dict]) -> dict:
    ok = [it for it in items if "error" not in it]
    return dict(
        failed=[it for it in items if "error" in it],
        ids=[it["id"] for it in ok],
        x=torch.stack([it["x"] for it in ok]) if ok else None,
        labels=[it["labels"] for it in ok],
        shapes=[it["shape"] for it in ok],
        images=[it["image"] for it in ok],
    )


def _scaled(x: Tensor, scale: float, patch: int) -> Tensor:
    side = max(patch, round(x.shape[-1] * scale / patch) * patch)
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


class Labeller:
    """Runs :class:`LabelConfig`'s method (or several methods sharing one extraction) on
    batches: uint8 images -> merged normalised maps."""

    def __init__(
        self, extractor: Extractor, config: LabelConfig, methods: tuple[Method, ...] = ()
    ) -> None:
        self.ex, self.cfg = extractor, config
        self.methods = methods or (config.method,)
        dev = extractor.device
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
        total: dict[str, Tensor] = {}
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
                maps = maps.view(b2, -1, h, w)
                if cfg.flip:
                    maps = maps[:n] + maps[n:].flip(-1)
                maps = F.interpolate(maps, size=(self.grid, self.grid), mode="bilinear")
                total[method] = maps + total[method] if method in total else maps
            t = self._tick("adcam", t)
        merged = {m: (normalize_cam(v) * valid[..., None, None]).cpu() for m, v in total.items()}
        return merged, classes


def _finish_image(
    outputs: Outputs,
    cfg: LabelConfig,
    image_id: str,
    maps: Tensor,
    classes: np.ndarray,
    shape: tuple[int, int],
    image: np.ndarray | None,
) -> None:
    c = len(classes)
    maps = maps[:c]
    full = (
        F.interpolate(maps[None], size=shape, mode="bilinear")[0]
        if c
        else maps.new_zeros(0, *shape)
    )
    class_ids = classes + 1
    mask = seed_labels(full, class_ids, cfg.bg_threshold).numpy().astype(np.uint8)
    outputs.write(
        LabelResult(id=image_id, mask=mask, maps=maps.numpy(), class_ids=class_ids, image=image)
    )


class _StopFlag:
    """Set by SIGINT / SIGTERM while installed; the run stops after the batches in flight."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self._old: dict[int, object] = {}

    def __enter__(self) -> _StopFlag:
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

    Raises ValueError before any work when the extractor's classes do not fit the dataset.
    """
    cfg, out = config, Path(out_dir)
    if dataset.class_names != extractor.class_names and cfg.classes_from == "labels":
        raise ValueError(
            f"the checkpoint's {len(extractor.class_names)} classes {extractor.class_names[:5]}... "
            f"differ from the dataset's {len(dataset.class_names)} {dataset.class_names[:5]}..."
        )
    if cfg.classes_from == "labels" and not dataset.has_labels:
        raise ValueError("the collection has no image labels: use --classes-from predictions")
    outputs = Outputs(
        out, extractor.class_names, cfg.cams, cfg.coco, cfg.overlays, category_ids=category_ids
    )
    summary = Summary(total=len(dataset), config=asdict(cfg))
    summary.versions = dict(
        python=platform.python_version(), torch=torch.__version__, device=str(extractor.device)
    )
    if checkpoint is not None:
        summary.checkpoint = dict(path=str(checkpoint), sha256=file_sha256(checkpoint))
    todo = [
        i for i, image_id in enumerate(dataset.ids) if cfg.overwrite or not outputs.done(image_id)
    ]
    summary.skipped_complete = len(dataset) - len(todo)
    out.mkdir(parents=True, exist_ok=True)
    failures = open(out / summary.failures_file, "a")

    def fail(image_id: str, stage: str, error: str) -> None:
        summary.failed += 1
        failures.write(json.dumps(dict(id=image_id, stage=stage, error=error)) + "\n")
        failures.flush()

    labeller = Labeller(extractor, cfg)
    loader = DataLoader(
        _Decoded(dataset, todo, cfg.input_size, cfg.overlays),
        batch_size=cfg.batch_size,
        num_workers=cfg.workers,
        collate_fn=_collate,
        pin_memory=extractor.device.type == "cuda",
        persistent_workers=False,
    )
    pending: deque[tuple[str, Future]] = deque()

    def drain(limit: int) -> None:
        while len(pending) > limit:
            image_id, fut = pending.popleft()
            try:
                fut.result()
                summary.written += 1
            except Exception as e:
                fail(image_id, "write", f"{type(e).__name__}: {e}")

    start = time.perf_counter()
    bar = _progress(len(todo), progress)
    with _StopFlag() as stop, ThreadPoolExecutor(cfg.writers) as pool:
        t = time.perf_counter()
        for batch in _iterate(loader, stop.event):
            labeller.timer["decode_wait"] += time.perf_counter() - t
            for it in batch["failed"]:
                fail(it["id"], "decode", it["error"])
            if batch["x"] is not None:
                try:
                    maps, classes = labeller(batch["x"], batch["labels"])
                    maps = maps[cfg.method]
                except Exception as e:  # a failed batch is reported, not fatal
                    for image_id in batch["ids"]:
                        fail(image_id, "forward", f"{type(e).__name__}: {e}")
                else:
                    for b, image_id in enumerate(batch["ids"]):
                        fut = pool.submit(
                            _finish_image,
                            outputs,
                            cfg,
                            image_id,
                            maps[b],
                            classes[b],
                            batch["shapes"][b],
                            batch["images"][b],
                        )
                        pending.append((image_id, fut))
            t_w = time.perf_counter()
            drain(4 * cfg.batch_size)
            labeller.timer["write_wait"] += time.perf_counter() - t_w
            bar.update(len(batch["ids"]) + len(batch["failed"]))
            t = time.perf_counter()
        drain(0)
        summary.interrupted = stop.event.is_set()
    bar.close()
    failures.close()
    outputs.finish(dataset.ids, numeric_ids)
    summary.seconds = time.perf_counter() - start
    done = summary.written + summary.failed
    summary.images_per_second = done / summary.seconds if summary.seconds else 0.0
    summary.stage_seconds = dict(labeller.timer)
    payload = json.dumps(asdict(summary), indent=2, default=str).encode()
    atomic_write(out / "summary.json", lambda f: f.write(payload))
    return summary


def _iterate(loader: DataLoader, stop: threading.Event) -> Iterator[dict]:
    for batch in loader:
        yield batch
        if stop.is_set():
            return


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="img", disable=not enabled, dynamic_ncols=True)

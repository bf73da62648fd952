"""``adcam label --engine ray``: the labelling run of :mod:`adcam_fast.pipeline.label` spread
over a Ray cluster, with the same outputs and guarantees.

Data path (the per-batch work is the local engine's own functions, not a copy):

    driver      resume check (``Outputs.done``) -> batches of the indices still to do,
                ``ray.data.from_items`` (one row per batch, cut as the local engine cuts them)
    CPU tasks   ``decode_item`` for each image of a batch (``Dataset.map``)   [errors -> records]
    actors      ``label_batch``: extractor + AD-CAM + merge (:class:`Labeller`) and the atomic
                writes; one model per actor, loaded from the checkpoint / exported file path;
                an autoscaling pool of MIN..MAX actors, each with ``gpus_per_worker`` GPUs
                (CPU actors when 0)
    driver      per-batch records -> progress bar, ``failures.jsonl``, ``summary.json`` with
                per-actor throughput

Guarantees, as the local engine: outputs are written atomically by the actors; complete
images are skipped before anything is scheduled (a restarted job decodes nothing twice); a
bad image is a failure record, never a stopped run; SIGINT / SIGTERM stop the driver, and a
rerun resumes. A killed actor loses nothing: the pool restarts it and Ray Data retries its
batches (``max_restarts`` / ``max_task_retries``); a batch whose retries run out is dropped
from the stream (not fatal), and when the stream ends the driver checks that every scheduled
image is complete or reported, schedules the others once more, and reports what is still
missing as failed at stage ``lost``. Since masks are thresholded per image from the same
batches through the same functions, they equal the local engine's bit for bit on the same
device type and thread count (a CPU actor runs ``cpus_per_worker`` torch threads; checked
on CPU). On GPUs each process autotunes the Triton kernels' configs on its own, and two
configs may keep different columns where S ties within rounding: set ``ADCAM_AUTOTUNE=0``
(on the driver and the workers) for bitwise equal masks there.

Locations: the collection, the checkpoint and ``out_dir`` must be readable (``out_dir``
writable) at the same paths from the driver and every node: local paths on a one-machine
cluster, a shared filesystem (NFS, Lustre, a mounted bucket) on several. fsspec URLs
(``s3://``...) are not supported: the outputs rely on an atomic rename, which object stores
lack. Every node also needs this package and its dependencies (``pip install
"adcam_fast[ray]"``, same versions as the driver).
"""

from __future__ import annotations

import json
import logging
import pickle
import threading
import time
import warnings
from collections import defaultdict
from collections.abc import Generator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from adcam_fast.data.base import ImageDataset
from adcam_fast.export.backends import Extractor, create_extractor
from adcam_fast.export.onnx import require
from adcam_fast.pipeline.label import (
    FailureLog,
    LabelConfig,
    Labeller,
    StopFlag,
    Summary,
    begin_run,
    checkpoint_info,
    collate,
    decode_item,
    describe_error,
    end_run,
    failed,
    label_batch,
    progress_bar,
)
from adcam_fast.pipeline.writers import Outputs

if TYPE_CHECKING:
    from adcam_fast.export.tensorrt import Profile

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtractorSpec:
    """What each actor builds its extractor from: a path every node can read, never the
    weights themselves."""

    backend: str
    checkpoint: str
    amp: bool = True
    profile: Profile | None = None

    def build(self, device: str) -> Extractor:
        """``create_extractor`` of these on ``device``."""
        return create_extractor(self.backend, self.checkpoint, device, self.amp, self.profile)


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide the Ray engine runs.

    address: ``None`` starts a local Ray instance (or joins ``RAY_ADDRESS``), ``"auto"`` joins
        the cluster this machine belongs to, ``"ray://HOST:PORT"`` connects through Ray Client.
        Ignored when Ray is already initialised in this process.
    gpus_per_worker: GPUs per actor (fractions share a GPU); 0 runs CPU actors; None: 1 when
        the cluster has GPUs, else 0.
    cpus_per_worker: CPUs per actor (its torch threads on a CPU actor).
    workers: (MIN, MAX) size of the autoscaling actor pool; None: 1 to the cluster's GPUs /
        ``gpus_per_worker`` (GPU actors) or half its CPUs / ``cpus_per_worker`` (CPU actors).
    decode_cpus: CPUs per decode task.
    max_restarts, max_task_retries: per actor: restarts after it dies, retries of a batch.
    """

    address: str | None = None
    gpus_per_worker: float | None = None
    cpus_per_worker: float = 1.0
    workers: tuple[int, int] | None = None
    decode_cpus: float = 1.0
    max_restarts: int = 3
    max_task_retries: int = 3

    def __post_init__(self) -> None:
        if self.gpus_per_worker is not None and self.gpus_per_worker < 0:
            raise ValueError(f"gpus_per_worker must be >= 0, got {self.gpus_per_worker}")
        if self.cpus_per_worker <= 0 or self.decode_cpus <= 0:
            raise ValueError("cpus_per_worker and decode_cpus must be positive")
        if self.workers is not None and not 1 <= self.workers[0] <= self.workers[1]:
            raise ValueError(f"workers must be MIN,MAX with 1 <= MIN <= MAX, got {self.workers}")


def _decode(row: dict[str, Any], dataset: ImageDataset, size: int, keep_image: bool) -> dict:
    """Ray task body: one batch of indices -> its decoded items, pickled into one bytes value
    (so Arrow sees a single binary column whatever the items hold)."""
    items = [decode_item(dataset, int(i), size, keep_image) for i in row["indices"]]
    return {"items": pickle.dumps(items, protocol=pickle.HIGHEST_PROTOCOL)}


class _LabelActor:
    """One actor of the pool: builds the extractor once, then labels and writes whole batches.

    Returns one row per batch: the actor's id and node, the seconds the batch took, its
    per-image records and its stage times (both JSON).
    """

    def __init__(self, spec: ExtractorSpec, device: str, cfg: LabelConfig, outputs: Outputs):
        import ray

        extractor = spec.build(device)
        self.labeller = Labeller(extractor, cfg)
        self.cfg, self.outputs = cfg, outputs
        self.pool = ThreadPoolExecutor(cfg.writers)
        self.actor = ray.get_runtime_context().get_actor_id()
        self.node = ray.util.get_node_ip_address()

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, list]:
        out: dict[str, list] = defaultdict(list)
        for blob in rows["items"]:
            t0, before = time.perf_counter(), dict(self.labeller.timer)
            batch = collate(pickle.loads(blob))
            records = label_batch(self.labeller, self.outputs, self.cfg, batch, self.pool)
            timer = {k: v - before.get(k, 0.0) for k, v in self.labeller.timer.items()}
            out["actor"].append(self.actor)
            out["node"].append(self.node)
            out["seconds"].append(time.perf_counter() - t0)
            out["records"].append(json.dumps(records))
            out["timer"].append(json.dumps(timer))
        return dict(out)


def _probe(spec: ExtractorSpec, device: str, config: LabelConfig) -> dict:
    """Ray task body, run with an actor's resources: the extractor's class names and
    precision and the checkpoint's hash, as the actors will see them, after the checks of a
    `Labeller` there (the AD-CAM backend on that device)."""
    extractor = spec.build(device)
    Labeller(extractor, config)
    return dict(
        class_names=extractor.class_names,
        checkpoint=checkpoint_info(spec.checkpoint),
        precision=extractor.precision,
    )


def label_dataset_ray(
    dataset: ImageDataset,
    extractor: ExtractorSpec,
    out_dir: str | Path,
    config: LabelConfig,
    options: RayOptions = RayOptions(),
    progress: bool = True,
    numeric_ids: dict[str, int] | None = None,
    category_ids: list[int] | None = None,
) -> Summary:
    """Label every image of ``dataset`` into ``out_dir`` on Ray; returns (and writes) the
    summary, as :func:`~adcam_fast.pipeline.label.label_dataset` does.

    Uses the Ray instance already initialised in this process, else connects as
    ``options.address`` says (and disconnects at the end). Raises ValueError before any work
    when Ray is not installed, the cluster cannot hold the actor pool, or the checkpoint
    (loaded once on the cluster, with an actor's resources) is unusable or its classes do
    not fit the dataset.
    """
    with _session(options.address) as ray:
        resources, pool = _resources(ray, options)
        device = "cuda" if resources["num_gpus"] > 0 else "cpu"
        try:
            probe = ray.get(ray.remote(**resources)(_probe).remote(extractor, device, config))
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, ValueError):
                raise ValueError(str(e.cause)) from None
            raise
        out = Path(out_dir)
        with begin_run(
            dataset,
            probe["class_names"],
            out,
            config,
            probe["checkpoint"],
            category_ids,
            probe["precision"],
        ) as (outputs, summary, todo):
            summary.engine = "ray"
            summary.versions |= dict(
                ray=ray.__version__, device=device, actor_resources=resources, actor_pool=list(pool)
            )
            plan = _Plan(ray, dataset, config, extractor, device, outputs, options, resources, pool)
            results = _Results(dataset.ids, outputs, FailureLog(out / summary.failures_file))
            start = time.perf_counter()
            bar = progress_bar(len(todo), progress)
            with StopFlag() as stop:
                missing, error = _stream(plan, results, todo, summary, bar, stop.event, start)
            bar.close()
            if not summary.interrupted:
                results.report_lost(missing, error)
            results.failures.close(outputs.done)
            summary.failed = results.failures.count
            summary.written = sum(results.written(i) for i in todo)
            summary.stage_seconds = dict(results.stages)
            summary.workers = results.per_worker()
            return end_run(summary, outputs, dataset.ids, time.perf_counter() - start, numeric_ids)


def _stream(
    plan: _Plan,
    results: _Results,
    todo: list[int],
    summary: Summary,
    bar: Any,
    stop: threading.Event,
    start: float,
) -> tuple[list[int], str]:
    """Stream ``todo`` through the actors, then once more what they neither wrote nor
    reported; returns what is still missing and why the stream broke ("" if it did not)."""
    missing, error = todo, ""
    for attempt in range(2):
        if attempt:
            log.warning("%d images were neither written nor reported: again", len(missing))
        rows = plan.stream(missing)
        try:
            for row in rows:
                bar.update(results.add(row))
                summary.startup_seconds = summary.startup_seconds or time.perf_counter() - start
                if stop.is_set():
                    break
        except Exception as e:  # the stream broke: its images are checked below
            error = describe_error(e)
            log.warning("the Ray stream stopped: %s", error)
        finally:
            rows.close()
        summary.interrupted = stop.is_set()
        missing = [i for i in missing if not results.complete(i)]
        if not missing or summary.interrupted:
            break
    return missing, error


@contextmanager
def _session(address: str | None) -> Iterator[Any]:
    """The ``ray`` module, initialised: the running instance, else one connected to
    ``address`` for the block's duration."""
    ray = require("ray", 'the Ray engine needs Ray: pip install "adcam_fast[ray]"')
    started = not ray.is_initialized()
    if started:
        try:
            ray.init(address=address, logging_level=logging.WARNING)
        except ConnectionError as e:
            raise ValueError(f"--address {address!r}: no Ray cluster to join ({e})") from e
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def _resources(ray: Any, options: RayOptions) -> tuple[dict[str, float], tuple[int, int]]:
    """An actor's Ray resources and the pool's (MIN, MAX), defaults filled from the cluster.

    Raises ValueError when the cluster's current resources cannot hold MIN actors and still
    run a decode task (the run would wait forever).
    """
    cluster = ray.cluster_resources()
    cpus, gpus = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    per_gpu = options.gpus_per_worker
    if per_gpu is None:
        per_gpu = 1.0 if gpus > 0 else 0.0
    if options.workers is not None:
        pool = options.workers
    elif per_gpu > 0:
        pool = (1, max(1, int(gpus / per_gpu)))
    else:
        pool = (1, max(1, int(cpus / 2 / options.cpus_per_worker)))
    if pool[0] * per_gpu > gpus:
        raise ValueError(
            f"{pool[0]} actors of {per_gpu:g} GPUs do not fit the cluster's {gpus:g} GPUs"
        )
    if pool[0] * options.cpus_per_worker + options.decode_cpus > cpus:
        raise ValueError(
            f"{pool[0]} actors of {options.cpus_per_worker:g} CPUs leave less than the "
            f"{options.decode_cpus:g} a decode task needs of the cluster's {cpus:g} CPUs: "
            "lower the pool's minimum or the CPUs per actor"
        )
    return dict(num_cpus=options.cpus_per_worker, num_gpus=per_gpu), pool


@dataclass(frozen=True)
class _Plan:
    """What every stream of a run shares."""

    ray: Any
    dataset: ImageDataset
    cfg: LabelConfig
    spec: ExtractorSpec
    device: str
    outputs: Outputs
    options: RayOptions
    resources: dict[str, float]
    pool: tuple[int, int]

    def stream(self, indices: list[int]) -> Generator[dict, None, None]:
        """The result rows of labelling ``indices``, batched as the local engine batches
        them (a generator: ``close()`` stops the run)."""
        ray, cfg, b = self.ray, self.cfg, self.cfg.batch_size
        batches = [{"indices": indices[j : j + b]} for j in range(0, len(indices), b)]
        ds = ray.data.from_items(batches).map(
            _decode,
            fn_kwargs=dict(dataset=self.dataset, size=cfg.input_size, keep_image=cfg.overlays),
            num_cpus=self.options.decode_cpus,
        )
        # Explicit retry limits: Ray Data's defaults are unlimited, so a batch that kills its
        # actor every time would loop. Ray 2.60 deprecates passing them this way but has no
        # named parameter for them. They also keep Ray Data from fusing the decode into the
        # actors (different remote args): decoding stays in CPU tasks.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
            ds = ds.map_batches(
                _LabelActor,
                batch_size=1,
                compute=ray.data.ActorPoolStrategy(min_size=self.pool[0], max_size=self.pool[1]),
                fn_constructor_kwargs=dict(
                    spec=self.spec, device=self.device, cfg=cfg, outputs=self.outputs
                ),
                max_restarts=self.options.max_restarts,
                max_task_retries=self.options.max_task_retries,
                **self.resources,
            )
        ds.context.enable_progress_bars = False  # the driver's own bar counts images
        ds.context.max_errored_blocks = -1  # a batch out of retries is dropped, then rerun
        return iter(ds.iter_rows())


class _Results:
    """What the actors reported: one record per image id (failures go to ``failures`` as
    they arrive), per-actor images and busy seconds, summed stage times."""

    def __init__(self, ids: list[str], outputs: Outputs, failures: FailureLog) -> None:
        self.ids, self.outputs, self.failures = ids, outputs, failures
        self.records: dict[str, dict] = {}
        self.workers: dict[str, dict] = {}
        self.stages: dict[str, float] = defaultdict(float)

    def add(self, row: dict[str, Any]) -> int:
        """Take one result row; the number of images reported for the first time (a retried
        batch may report an image again)."""
        new = 0
        for record in json.loads(row["records"]):
            first = record["id"] not in self.records
            if first or record["status"] == "written":
                self.records[record["id"]] = record
            if record["status"] == "written":  # a retried batch wrote what had failed
                self.failures.recovered(record["id"])
            if first:
                new += 1
                if record["status"] == "failed":
                    self.failures.add(record)
        w = self.workers.setdefault(row["actor"], dict(node=row["node"], images=0, seconds=0.0))
        w["images"] += new
        w["seconds"] += row["seconds"]
        for stage, seconds in json.loads(row["timer"]).items():
            self.stages[stage] += seconds
        return new

    def written(self, i: int) -> bool:
        """Image ``i`` was reported written and its outputs are visible here (while an
        overwrite is in progress: newer than its start)."""
        r = self.records.get(self.ids[i])
        return r is not None and r["status"] == "written" and self.outputs.done(r["id"])

    def complete(self, i: int) -> bool:
        """Image ``i`` is written (:meth:`written`) or reported failed."""
        r = self.records.get(self.ids[i])
        return r is not None and (r["status"] == "failed" or self.written(i))

    def report_lost(self, indices: list[int], error: str) -> None:
        """Add a failure at stage ``lost`` for each of ``indices``."""
        for i in indices:
            reason = "neither written nor reported by the Ray workers, twice"
            if self.records.get(self.ids[i], {}).get("status") == "written":
                reason = "reported written, but its outputs are not visible to the driver: "
                reason += "is the output directory shared?"
            elif error:
                reason += f" (the stream stopped: {error})"
            self.failures.add(failed(self.ids[i], "lost", reason))

    def per_worker(self) -> dict[str, dict]:
        """Per actor id: node, images, busy seconds, images/s."""
        return {
            actor: w | dict(images_per_second=w["images"] / w["seconds"] if w["seconds"] else 0.0)
            for actor, w in self.workers.items()
        }

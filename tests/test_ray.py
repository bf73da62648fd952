"""``adcam label --engine ray`` on a local Ray cluster started by the tests (CPU actors)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray", reason="ray is not installed", exc_type=ImportError)

from ray import cloudpickle  # noqa: E402
from test_pipeline import label  # noqa: E402

from adcam_fast.data import load_mask, open_dataset  # noqa: E402
from adcam_fast.pipeline import ray_engine  # noqa: E402

RAY = ["--engine", "ray", "--ray-workers", "1,1"]
# Ray Data's own context copies warn about its deprecated settings.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")

# Test-defined actor classes must reach the Ray workers, which cannot import this module.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module", autouse=True)
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def local_out(checkpoint, collection, tmp_path_factory) -> Path:
    """``--engine local`` with one torch thread, as a CPU actor with one CPU runs: on CPU, float
    results depend on the thread count."""
    out = tmp_path_factory.mktemp("local") / "out"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert label(f"synthetic:{collection}", checkpoint, out) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def _masks(out: Path, ids: list[str]) -> dict[str, np.ndarray]:
    return {i: load_mask(out / "masks" / f"{i}.png") for i in ids}


def _failures(out: Path) -> list[dict]:
    path = out / "failures.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_ray_masks_equal_local(checkpoint, collection, local_out, tmp_path):
    out = tmp_path / "out"
    assert label(f"synthetic:{collection}", checkpoint, out, *RAY) == 0
    ids = open_dataset(f"synthetic:{collection}").ids
    ray_masks, local_masks = _masks(out, ids), _masks(local_out, ids)
    for i in ids:
        np.testing.assert_array_equal(ray_masks[i], local_masks[i], err_msg=i)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["engine"] == "ray" and summary["written"] == len(ids) and summary["failed"] == 0
    assert summary["checkpoint"]["sha256"] and summary["versions"]["ray"] == ray.__version__
    assert summary["precision"] == json.loads((out / "run.json").read_text())["precision"] == "fp32"
    (worker,) = summary["workers"].values()
    assert worker["images"] == len(ids) and worker["seconds"] > 0 and worker["node"]
    assert summary["stage_seconds"]["forward"] > 0


def test_restarted_run_does_only_the_rest(checkpoint, collection, local_out, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(local_out, out)
    masks = sorted((out / "masks").iterdir())
    for p in masks[7:]:
        p.unlink()  # as if the first run had stopped after 7 images
    kept = {p: p.stat().st_mtime_ns for p in masks[:7]}
    assert label(f"synthetic:{collection}", checkpoint, out, *RAY) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_complete"] == 7 and summary["written"] == 5
    assert sum(w["images"] for w in summary["workers"].values()) == 5  # only 5 were scheduled
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    for p in masks[7:]:
        np.testing.assert_array_equal(load_mask(p), load_mask(local_out / "masks" / p.name))


class _DiesAfterWriting(ray_engine._LabelActor):
    """Kills its own process once (whichever actor gets there first), after writing its first
    batch and before reporting it."""

    marker = ""

    def __call__(self, rows):
        out = super().__call__(rows)
        if not os.path.exists(self.marker):
            Path(self.marker).touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return out


def test_killed_actor_loses_nothing(checkpoint, collection, tmp_path, monkeypatch):
    monkeypatch.setattr(_DiesAfterWriting, "marker", str(tmp_path / "killed"))
    monkeypatch.setattr(ray_engine, "_LabelActor", _DiesAfterWriting)
    out = tmp_path / "out"
    assert label(f"synthetic:{collection}", checkpoint, out, *RAY) == 0
    assert (tmp_path / "killed").exists()
    ids = open_dataset(f"synthetic:{collection}").ids
    assert {p.stem for p in (out / "masks").glob("*.png")} == set(ids)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["written"] == len(ids) and summary["failed"] == 0 and not _failures(out)


def test_unreported_images_are_rescheduled_then_reported_lost(
    checkpoint, collection, tmp_path, monkeypatch
):
    scheduled: list[list[int]] = []
    stream = ray_engine._Plan.stream

    def half_stream(plan, indices):  # a stream that drops half its images
        scheduled.append(list(indices))
        return stream(plan, indices[: len(indices) // 2])

    monkeypatch.setattr(ray_engine._Plan, "stream", half_stream)
    out = tmp_path / "out"
    assert label(f"synthetic:{collection}", checkpoint, out, *RAY) == 1
    ids = open_dataset(f"synthetic:{collection}").ids
    assert scheduled == [list(range(12)), list(range(6, 12))]
    assert {p.stem for p in (out / "masks").glob("*.png")} == set(ids[:9])
    lost = _failures(out)
    assert [f["id"] for f in lost] == ids[9:] and {f["stage"] for f in lost} == {"lost"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["written"] == 9 and summary["failed"] == 3


def test_bad_checkpoint_fails_before_any_work(collection, tmp_path, capsys):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"nope")
    assert label(f"synthetic:{collection}", junk, tmp_path / "out", *RAY) == 2
    assert "junk.pth" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert label(f"synthetic:{collection}", junk, tmp_path / "out", *RAY, "--device", "cpu") == 2


def test_pool_that_leaves_no_cpu_to_decode_is_refused(checkpoint, collection, tmp_path, capsys):
    data, out = f"synthetic:{collection}", tmp_path / "out"
    assert label(data, checkpoint, out, *RAY, "--ray-workers", "2,2") == 2  # 2 CPUs in all
    assert "decode" in capsys.readouterr().err and not out.exists()


def test_importing_the_package_does_not_import_ray():
    code = "import sys, adcam_fast, adcam_fast.cli, adcam_fast.pipeline.label; "
    code += "sys.exit('ray' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0

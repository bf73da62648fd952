"""ONNX export (extractor and segmenter), ONNX Runtime parity with PyTorch, metadata, error
paths, the label pipeline through the onnx backend, and the TensorRT error paths.

The dynamo exporter's test takes 35-90 s on two CPUs: it runs only with ADCAM_SLOW_TESTS=1."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import timm
import torch

from adcam_fast.cli import main
from adcam_fast.data import SyntheticDataset, load_mask
from adcam_fast.export import command
from adcam_fast.export.backends import (
    InputRange,
    OnnxExtractor,
    TorchExtractor,
    create_extractor,
)
from adcam_fast.export.onnx import (
    TOLERANCES,
    ExportInfo,
    MissingDependencyError,
    export_checkpoint,
    read_info,
)
from adcam_fast.export.tensorrt import (
    TENSORRT_HINT,
    Profile,
    TensorRTExtractor,
    _pin_fp32,
    _read_sidecar,
)
from adcam_fast.io import file_sha256
from adcam_fast.models.segmenter import Segmenter
from adcam_fast.pipeline.label import LabelConfig, Labeller, label_dataset, tensorrt_profile
from adcam_fast.pipeline.ray_engine import ExtractorSpec
from adcam_fast.training.augment import IMAGENET_MEAN, IMAGENET_STD
from adcam_fast.training.checkpoint import (
    SEGMENTER,
    VERSION,
    classifier_config,
    load_classifier,
    save_checkpoint,
    save_classifier,
)

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
NAMES = SyntheticDataset(1).class_names
MEAN, STD = list(IMAGENET_MEAN), list(IMAGENET_STD)


def _classifier(path: Path, drop_last_block: bool = True) -> Path:
    torch.manual_seed(0)
    config = classifier_config("conformer_nano_patch16", len(NAMES), 64, drop_last_block)
    model = timm.create_model(
        config["model"], num_classes=len(NAMES), drop_last_block=drop_last_block
    )
    # Random weights give near-uniform attention rows (std/mean ~0.2%): co-neighbour
    # similarity is then ~1 everywhere and AD-CAM's top-k is decided by float noise, for any
    # two backends (a 1e-6 relative perturbation of A in torch alone changes 1.5% of the
    # pixels at 128², k=50). Scaled-up query/key weights give peaked rows, as trained ones are.
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "qkv"):
                module.qkv.weight[: 2 * module.qkv.in_features] *= 8
    return save_classifier(model, config, NAMES, path)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> Path:
    """A random-weight nano classifier (drop_last_block) for the synthetic classes."""
    return _classifier(tmp_path_factory.mktemp("ckpt") / "nano.pth")


@pytest.fixture(scope="module")
def exported(classifier, tmp_path_factory) -> tuple[Path, ExportInfo, dict[str, float]]:
    out = tmp_path_factory.mktemp("onnx") / "extractor.onnx"
    info, errors = export_checkpoint(classifier, "extractor", out)
    return out, info, errors


@pytest.fixture(scope="module")
def segmenter_onnx(tmp_path_factory) -> tuple[Path, Path]:
    """A random-weight resnet18 segmenter checkpoint and its export through ``adcam export``."""
    root = tmp_path_factory.mktemp("seg")
    torch.manual_seed(0)
    config = dict(
        backbone="resnet18", num_classes=len(NAMES) + 1, output_stride=8, crop=64, mean=MEAN,
        std=STD,
    )  # fmt: skip
    model = Segmenter("resnet18", len(NAMES) + 1, 8)
    state = dict(
        format=SEGMENTER, version=VERSION, model=model.state_dict(), config=config,
        class_names=NAMES, epoch=0, iteration=0,
    )  # fmt: skip
    ckpt = save_checkpoint(state, root / "seg.pth")
    out = root / "segmenter.onnx"
    rc = _export(["--checkpoint", str(ckpt), "--what", "segmenter", "--out", str(out)], True)
    assert rc == 0
    return ckpt, out


def _export(argv: list[str], with_labels: bool = False) -> int:
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    return command.run(parser.parse_args(argv + (["--with-labels"] if with_labels else [])))


def test_extractor_export_is_checked_and_self_describing(exported, classifier):
    path, info, errors = exported
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "height", "width"]
    assert [o.name for o in model.graph.output] == ["logits", "cams", "attention"]
    assert read_info(path) == info
    assert info.class_names == NAMES and info.mean == tuple(MEAN) and info.std == tuple(STD)
    assert info.input_size == 64 and info.stride == 16 and info.dynamic_size
    assert info.checkpoint_sha256 == file_sha256(classifier)
    import adcam_fast

    assert info.package_version == adcam_fast.__version__
    # the export's own check compared ONNX Runtime with PyTorch at two shapes
    assert errors["attention_abs"] < 1e-5 and errors["cams_rel"] < 1e-4


def test_onnx_runtime_matches_torch_at_two_batches_and_sizes(exported, classifier):
    path, _, _ = exported
    model, meta = load_classifier(classifier)
    ref = TorchExtractor(model, meta["class_names"], MEAN, STD, amp=False)
    ort = create_extractor("onnx", str(path))
    assert (ort.class_names, ort.patch_size, ort.mean) == (NAMES, 16, tuple(MEAN))
    gen = torch.Generator().manual_seed(0)
    for b in (1, 3):
        for h, w in ((64, 64), (96, 128)):
            x = torch.randn(b, 3, h, w, generator=gen)
            got, want = ort(x), ref(x)
            assert got.cams.shape == (b, len(NAMES), h // 16, w // 16)
            assert got.attention.shape == (b, h * w // 256, h * w // 256)
            assert got.cams.dtype == got.attention.dtype == torch.float32
            assert (got.attention - want.attention).abs().max() <= 1e-5
            scale = want.cams.abs().max()
            assert (got.cams - want.cams).abs().max() <= 1e-4 * scale
            torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-5)


def test_fp16_export_stays_within_its_tolerances(classifier, tmp_path):
    """The body is float16 (its weights and inputs), the outputs float32, and ONNX Runtime's
    outputs differ from PyTorch's float32 by rounding, within the fp16 tolerances."""
    info, errors = export_checkpoint(classifier, "extractor", tmp_path / "half.onnx", fp16=True)
    assert info.precision == "fp16"
    weights = onnx.load(str(tmp_path / "half.onnx")).graph.initializer
    float16 = sum(w.data_type == onnx.TensorProto.FLOAT16 for w in weights)
    assert float16 > 0.9 * sum(w.data_type != onnx.TensorProto.INT64 for w in weights)
    model, meta = load_classifier(classifier)
    want = TorchExtractor(model, meta["class_names"], MEAN, STD, amp=False)
    x = torch.randn(2, 3, 64, 80, generator=torch.Generator().manual_seed(2))
    half = OnnxExtractor(tmp_path / "half.onnx", threads=1)
    assert (half.precision, want.precision) == ("fp16", "fp32")  # amp is for CUDA only
    got, want = half(x), want(x)
    assert got.cams.dtype == got.attention.dtype == torch.float32
    tol = TOLERANCES["fp16"]
    for name in ("attention", "cams"):
        a, b = getattr(got, name), getattr(want, name)
        rel = ((a - b).abs().max() / b.abs().max()).item()
        assert 1e-6 < rel <= tol[f"{name}_rel"], (name, rel)  # rounded, and not far
        assert 0 < errors[f"{name}_rel"] <= tol[f"{name}_rel"]


def test_fixed_size_export_without_dropped_block(collection, tmp_path, capsys):
    ckpt = _classifier(tmp_path / "full.pth", drop_last_block=False)
    info, _ = export_checkpoint(ckpt, "extractor", tmp_path / "full.onnx")
    assert not info.dynamic_size
    ex = OnnxExtractor(tmp_path / "full.onnx")
    assert ex(torch.randn(3, 3, 64, 64)).cams.shape == (3, len(NAMES), 4, 4)
    with pytest.raises(ValueError, match="fixed size 64x64"):
        ex(torch.randn(1, 3, 96, 96))
    # adcam label stops before any work, naming the options that do not fit
    with pytest.raises(ValueError, match=r"--input-size 64 at --scales 1,0.5 feeds .*full.onnx"):
        Labeller(ex, LabelConfig(input_size=64, scales=(1.0, 0.5)))
    Labeller(ex, LabelConfig(input_size=64, scales=(1.0,)))
    # and before a TensorRT engine would be built for it
    with pytest.raises(ValueError, match=r"feeds image sides \[32, 64\], but .*full.onnx"):
        tensorrt_profile(LabelConfig(input_size=64, scales=(1.0, 0.5)), tmp_path / "full.onnx")
    fixed = tensorrt_profile(LabelConfig(input_size=64, scales=(1.0,)), tmp_path / "full.onnx")
    assert fixed.size == (64, 64, 64)
    argv = ["label", "--data", f"synthetic:{collection}", "--out", str(tmp_path / "out")]
    argv += ["--checkpoint", str(tmp_path / "full.onnx"), "--backend", "tensorrt"]
    assert main([*argv, "--input-size", "64", "--scales", "1,0.5"]) == 2
    assert "feeds image sides [32, 64], but" in capsys.readouterr().err


def test_label_builds_tensorrt_profiles_for_its_own_batches_and_sides(exported, segmenter_onnx):
    """An engine built by ``adcam label`` from an .onnx takes what the run feeds: the
    batches (flipped copies included) and sides of every scale, fastest at full batches of
    the scale nearest 1. The profile is checked against the labeller's own checks, through
    the input range an engine of that profile would give (no engine is built here)."""
    cfg = LabelConfig(input_size=64, scales=(2.0, 0.5, 1.25), batch_size=3)
    profile = tensorrt_profile(cfg, exported[0])
    assert profile == Profile(batch=(2, 6, 6), size=(32, 80, 128))
    single = tensorrt_profile(dataclasses.replace(cfg, flip=False, scales=(0.5,)), exported[0])
    assert single == Profile(batch=(1, 3, 3), size=(32, 32, 32))
    engine = InputRange((profile.batch[0], profile.batch[2]), profile.size[::2], "engine")
    extractor = SimpleNamespace(
        inputs=engine, patch_size=16, device=torch.device("cpu"), mean=MEAN, std=STD
    )
    Labeller(extractor, cfg)  # its checks pass
    for wider in (dict(batch_size=4), dict(scales=(2.0, 0.25)), dict(flip=False)):
        with pytest.raises(ValueError, match="but engine takes"):
            Labeller(extractor, dataclasses.replace(cfg, **wider))
    with pytest.raises(ValueError, match=r"segmenter\.onnx: an exported segmenter"):
        tensorrt_profile(cfg, segmenter_onnx[1])  # refused before an engine is built
    with pytest.raises(ValueError, match="a TensorRT profile is for the tensorrt backend"):
        ExtractorSpec("onnx", str(exported[0]), profile=profile).build("cpu")


def test_engine_sidecars_say_how_the_engine_was_built(exported, tmp_path):
    """An engine's sidecar gives its export metadata and whether float16 was allowed (its
    precision); one without either is named as corrupt."""
    engine = tmp_path / "x.engine"
    engine.write_bytes(b"plan")
    sidecar = tmp_path / "x.engine.json"
    sidecar.write_text(json.dumps(dict(props=exported[1].to_props(), fp16=True)))
    assert _read_sidecar(engine) == (exported[1], True)
    for record in (dict(props=exported[1].to_props()), dict(fp16=False)):
        sidecar.write_text(json.dumps(record))
        with pytest.raises(ValueError, match=r"x\.engine\.json: corrupt engine sidecar"):
            _read_sidecar(engine)


def test_segmenter_export_matches_torch(segmenter_onnx):
    ckpt, path = segmenter_onnx
    from adcam_fast.export.onnx import open_session
    from adcam_fast.training.checkpoint import load_segmenter

    info = read_info(path)
    assert info.kind == "segmenter" and info.stride == 8 and info.class_names == NAMES
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    model, _ = load_segmenter(ckpt)
    session, _ = open_session(path, "segmenter")
    for shape in ((1, 3, 64, 64), (2, 3, 72, 96)):
        x = torch.randn(*shape)
        logits, labels = session.run(["logits", "labels"], {"images": x.numpy()})
        with torch.inference_mode():
            want = model(x)
            want_labels = model.predict(x)
        assert logits.shape == (shape[0], len(NAMES) + 1, -(-shape[2] // 8), -(-shape[3] // 8))
        np.testing.assert_allclose(logits, want.numpy(), rtol=1e-4, atol=1e-5)
        assert (torch.from_numpy(labels) == want_labels).float().mean() >= 0.999


def test_wrong_or_corrupt_files_give_clear_errors(segmenter_onnx, exported, tmp_path):
    _, seg = segmenter_onnx
    with pytest.raises(ValueError, match=r"segmenter\.onnx: an exported segmenter, where an"):
        OnnxExtractor(seg)
    bad = tmp_path / "corrupt.onnx"
    bad.write_bytes(b"\x08\x07 this is not a protobuf" * 10)
    with pytest.raises(ValueError, match=r"corrupt\.onnx: not a readable ONNX model"):
        OnnxExtractor(bad)
    with pytest.raises(ValueError, match=r"missing\.onnx: no such file"):
        create_extractor("onnx", str(tmp_path / "missing.onnx"))
    assert isinstance(create_extractor("onnxruntime", str(exported[0])), OnnxExtractor)
    with pytest.raises(ValueError, match=r"backend must be one of .* got 'ort'"):
        create_extractor("ort", str(exported[0]))

    model = onnx.load(str(exported[0]))
    del model.metadata_props[:]
    onnx.save(model, str(tmp_path / "bare.onnx"))
    with pytest.raises(ValueError, match=r"bare\.onnx: no adcam_fast metadata"):
        OnnxExtractor(tmp_path / "bare.onnx")
    # a segmenter graph whose metadata claims it is an extractor: the outputs give it away
    model = onnx.load(str(seg))
    for p in model.metadata_props:
        if p.key == "adcam_fast.kind":
            p.value = '"extractor"'
    onnx.save(model, str(tmp_path / "liar.onnx"))
    with pytest.raises(ValueError, match=r"liar\.onnx: inputs .* outputs .* not those"):
        OnnxExtractor(tmp_path / "liar.onnx")
    with pytest.raises(ValueError, match="multiples of 16"):
        OnnxExtractor(exported[0])(torch.randn(1, 3, 64, 72))
    props = exported[1].to_props()
    for key, value in [("mean", "0.5"), ("dynamic_size", '"no"'), ("precision", '"fp8"')]:
        with pytest.raises(ValueError, match=r"edited\.onnx: invalid adcam_fast metadata"):
            ExportInfo.from_props(props | {f"adcam_fast.{key}": value}, "edited.onnx")


def test_bad_export_arguments_stop_before_exporting(classifier, tmp_path, monkeypatch):
    out = tmp_path / "x.onnx"
    with pytest.raises(ValueError, match=r"opset must be in \[17, \d+\] for the torchscript"):
        export_checkpoint(classifier, "extractor", out, opset=30)
    with pytest.raises(ValueError, match=r"with_labels \(--with-labels\) is for a segmenter"):
        export_checkpoint(classifier, "extractor", out, with_labels=True)
    with pytest.raises(ValueError, match=r"out .* is a folder: give the file to write"):
        export_checkpoint(classifier, "extractor", tmp_path)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=r"out .*file/x\.onnx's folder: .*file cannot be made"):
        export_checkpoint(classifier, "extractor", tmp_path / "file" / "x.onnx")
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as where it is not installed
    with pytest.raises(MissingDependencyError, match="onnxscript"):
        export_checkpoint(classifier, "extractor", out, exporter="dynamo")
    assert not out.exists()


def test_an_export_that_fails_its_check_replaces_nothing(classifier, tmp_path, monkeypatch):
    out = tmp_path / "x.onnx"
    out.write_bytes(b"the last good export")
    monkeypatch.setitem(TOLERANCES, "fp32", dict.fromkeys(TOLERANCES["fp32"], 0.0))
    with pytest.raises(ValueError, match=r"x\.onnx: ONNX Runtime and PyTorch differ"):
        export_checkpoint(classifier, "extractor", out)
    assert out.read_bytes() == b"the last good export"
    assert [p.name for p in tmp_path.iterdir()] == ["x.onnx"]  # nothing staged is left


def test_label_pipeline_onnx_masks_match_torch(exported, classifier, tmp_path):
    dataset = SyntheticDataset(16, seed=1, size=64)
    # 128²: N = 64 tokens > k = 50 at scale 1, so the top-k selection is exercised
    cfg = LabelConfig(input_size=128, scales=(1.0, 0.5), batch_size=8, workers=0, writers=1)
    masks = {}
    for backend, ckpt in (("torch", classifier), ("onnx", exported[0])):
        out = tmp_path / backend
        summary = label_dataset(
            dataset, create_extractor(backend, str(ckpt)), out, cfg, checkpoint=ckpt, progress=False
        )
        assert summary.written == len(dataset) and summary.failed == 0
        masks[backend] = np.stack([load_mask(out / "masks" / f"{i}.png") for i in dataset.ids])
    agree = (masks["torch"] == masks["onnx"]).mean()
    assert agree >= 0.999, f"onnx and torch masks agree on {agree:.4%} of pixels"


def test_tensorrt_profile_defaults(exported, segmenter_onnx):
    info = exported[1]
    assert Profile.for_info(info, (1, 16, 32), None).size == (32, 64, 128)
    with pytest.raises(ValueError, match="multiples of 16"):
        Profile.for_info(info, (1, 16, 32), (32, 60, 128))
    # a segmenter takes any size, such as its default training crop
    seg = dataclasses.replace(read_info(segmenter_onnx[1]), input_size=321)
    assert Profile.for_info(seg, (1, 16, 32), None).size == (160, 321, 640)
    with pytest.raises(ValueError, match="min <= opt <= max"):
        Profile((4, 2, 8), (64, 64, 64))


class _Layer(SimpleNamespace):
    """A TensorRT network layer as `_pin_fp32` reads it: one float32 output."""

    num_outputs = 1

    def get_output(self, j: int) -> SimpleNamespace:
        return self.out

    def get_input(self, k: int) -> SimpleNamespace:
        return self.inputs[k]

    def set_output_type(self, j: int, dtype: str) -> None:
        self.out.dtype = dtype


def _pinned(kind: str, chain: list[str], output: str) -> list[str]:
    """The layers of a chain (TensorRT layer types from the input on) that `_pin_fp32` pins
    for an export of ``kind`` whose last layer gives ``output``."""
    types = SimpleNamespace(**{t: t for t in ("SOFTMAX", "NORMALIZATION", *chain)})
    trt = SimpleNamespace(float32="float32", LayerType=types)
    layers, x = [], SimpleNamespace(name="images", dtype="float32")
    for i, t in enumerate(chain):
        out = SimpleNamespace(name=output if i == len(chain) - 1 else f"t{i}", dtype="float32")
        layers.append(_Layer(name=f"{i}:{t}", type=t, inputs=[x], num_inputs=1, out=out))
        x = out
    network = SimpleNamespace(
        num_layers=len(layers), get_layer=layers.__getitem__, num_outputs=1, get_output=lambda i: x
    )
    _pin_fp32(trt, network, kind)
    return [layer.name for layer in layers if getattr(layer, "precision", None) == "float32"]


def test_fp16_engines_pin_only_their_outputs_tails():
    """With ``fp16``, an output's last layers stay float32 back to its stop (not run on
    TensorRT: its network read through the attributes that `_pin_fp32` uses)."""
    segmenter = ["CONVOLUTION", "ACTIVATION", "CONVOLUTION", "RESIZE"]
    assert _pinned("segmenter", segmenter, "logits") == ["2:CONVOLUTION", "3:RESIZE"]
    extractor = ["CONVOLUTION", "REDUCE", "SHUFFLE", "MATRIX_MULTIPLY", "ELEMENTWISE"]
    assert _pinned("extractor", extractor, "logits") == [
        "1:REDUCE", "2:SHUFFLE", "3:MATRIX_MULTIPLY", "4:ELEMENTWISE"
    ]  # fmt: skip
    assert _pinned("segmenter", ["CONVOLUTION", "NORMALIZATION"], "labels") == ["1:NORMALIZATION"]


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed")
def test_missing_tensorrt_says_what_to_install(exported, classifier, collection, tmp_path, capsys):
    for make in (
        lambda: TensorRTExtractor(exported[0], "cuda"),
        lambda: create_extractor("tensorrt", str(exported[0]), "cuda"),
        lambda: _export(
            ["--checkpoint", str(classifier), "--format", "tensorrt", "--out", str(tmp_path / "x")]
        ),
    ):
        with pytest.raises(MissingDependencyError) as err:
            make()
        assert TENSORRT_HINT in str(err.value)
        assert isinstance(err.value, ValueError)  # the adcam command reports it plainly
    argv = ["label", "--data", f"synthetic:{collection}", "--out", str(tmp_path / "out")]
    assert main([*argv, "--checkpoint", str(exported[0]), "--backend", "tensorrt"]) == 2
    assert TENSORRT_HINT in capsys.readouterr().err  # after its profile was fitted


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TENSORRT, reason="TensorRT is not installed")
def test_tensorrt_engine_matches_onnx_runtime(exported, tmp_path):
    path = exported[0]
    trt = TensorRTExtractor(path, "cuda", fp16=False, cache_dir=tmp_path)
    ref = OnnxExtractor(path)
    assert trt.precision == ref.precision == "fp32"
    x = torch.randn(2, 3, 64, 64)
    got, want = trt(x.cuda()), ref(x)
    assert (got.attention.cpu() - want.attention).abs().max() <= 1e-4
    assert (got.cams.cpu() - want.cams).abs().max() <= 1e-3 * want.cams.abs().max()


@pytest.mark.gpu
def test_onnx_cuda_provider_with_io_binding(exported):
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime-gpu is not installed")
    path = exported[0]
    x = torch.randn(2, 3, 64, 64)
    got, want = OnnxExtractor(path, "cuda")(x.cuda()), OnnxExtractor(path)(x)
    assert got.cams.is_cuda and got.attention.is_cuda
    assert (got.attention.cpu() - want.attention).abs().max() <= 1e-5


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("ADCAM_SLOW_TESTS"),
    reason="the dynamo exporter takes 35-90 s: set ADCAM_SLOW_TESTS=1",
)
def test_dynamo_exporter_gives_the_same_extractor(classifier, exported, tmp_path):
    info, errors = export_checkpoint(
        classifier, "extractor", tmp_path / "dynamo.onnx", exporter="dynamo"
    )
    assert info.exporter == "dynamo" and info.dynamic_size
    assert errors["attention_abs"] < 1e-5 and errors["cams_rel"] < 1e-4
    x = torch.randn(2, 3, 80, 48)
    a, b = OnnxExtractor(tmp_path / "dynamo.onnx")(x), OnnxExtractor(exported[0])(x)
    torch.testing.assert_close(a.attention, b.attention, rtol=0, atol=1e-6)
    torch.testing.assert_close(a.cams, b.cams, rtol=1e-4, atol=1e-5)

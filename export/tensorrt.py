"""TensorRT engines built from the exported ONNX, and the :class:`TensorRTExtractor` runner.

**Not run here.** TensorRT cannot be installed on the dev, CI or GPU-benchmark machines of
this project, so this module is written against the documented TensorRT 10 Python API
(``tensorrt.Builder``, ``IBuilderConfig``, ``create_optimization_profile``, ``ITimingCache``,
``IExecutionContext.set_tensor_address`` / ``execute_async_v3``) and has never built or run
an engine. Only its error paths are tested. TensorRT 11 removed the weakly typed precision
flags this uses (``BuilderFlag.FP16``, ``OBEY_PRECISION_CONSTRAINTS``), so TensorRT 10.x is
required: ``pip install "adcam_fast[tensorrt]"``.

Build (:func:`build_engine`): the ONNX is parsed, one optimisation profile covers the batch
range and the square image sides (min, opt, max) asked for, and with ``fp16`` the builder may
use float16 except where precision is pinned to float32 (``OBEY_PRECISION_CONSTRAINTS``):
every softmax and normalisation (LayerNorm) layer, the layers from the softmaxes to the
``attention`` output (head and block average, row renormalisation), and the last layers of
``cams`` (back to their convolution) and ``logits`` (back to their mean; a segmenter's back
to its classifier convolution). The timing cache
(one per GPU name and TensorRT version) is loaded before and saved after each build; the
engine is cached under a key of GPU name, TensorRT version, ONNX sha256 and build settings,
so a second build of the same thing is a file copy. Files are written atomically.

An engine ``X.engine`` has a sidecar ``X.engine.json``: the ONNX metadata
(:meth:`ExportInfo.to_props`) and the build settings, so the runner knows the class names,
normalisation and patch size.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from adcam_fast.export.backends import (
    INPUT,
    OUTPUTS,
    Extraction,
    InputRange,
    check_images,
    resolve_device,
)
from adcam_fast.export.onnx import (
    ExportInfo,
    MissingDependencyError,
    expect_kind,
    read_info,
    require,
)
from adcam_fast.io import atomic_write, atomic_write_json, file_sha256

__all__ = [
    "TENSORRT_HINT",
    "Profile",
    "TensorRTExtractor",
    "build_engine",
    "default_cache_dir",
    "import_tensorrt",
]

TENSORRT_HINT = 'pip install "adcam_fast[tensorrt]" (TensorRT 10.x; needs an NVIDIA GPU)'
#: Bumped when the build settings below change, so cached engines are rebuilt.
_BUILD_VERSION = 2


def import_tensorrt() -> Any:
    """The ``tensorrt`` module (10.x). Raises :class:`MissingDependencyError` (an ImportError
    and a ValueError) saying what to install when it is missing or of another major version."""
    trt = require("tensorrt", TENSORRT_HINT)
    if not str(trt.__version__).startswith("10."):
        raise MissingDependencyError(
            f"TensorRT {trt.__version__} is installed, this code needs 10.x: {TENSORRT_HINT}"
        )
    return trt


def default_cache_dir() -> Path:
    """``~/.cache/adcam_fast/tensorrt``: timing caches and cached engines."""
    return Path.home() / ".cache" / "adcam_fast" / "tensorrt"


@dataclass(frozen=True)
class Profile:
    """An optimisation profile: batch sizes and square image sides, each (min, opt, max)."""

    batch: tuple[int, int, int]
    size: tuple[int, int, int]

    def __post_init__(self) -> None:
        for name, (lo, opt, hi) in (("batch", self.batch), ("size", self.size)):
            if not 1 <= lo <= opt <= hi:
                raise ValueError(f"profile {name} needs 1 <= min <= opt <= max, got {lo, opt, hi}")

    def shapes(self) -> tuple[tuple[int, ...], ...]:
        """The (min, opt, max) input shapes (B, 3, S, S)."""
        return tuple((b, 3, s, s) for b, s in zip(self.batch, self.size, strict=True))

    @classmethod
    def for_info(
        cls, info: ExportInfo, batch: tuple[int, int, int], size: tuple[int, int, int] | None
    ) -> Profile:
        """A profile for an export: ``size`` defaults to half, one and two times its input
        size (the ends rounded down to its stride); a fixed-size export allows its own size
        only. An extractor's sizes must be multiples of its patch size; a segmenter takes
        any size (its input size is a training crop, 321 by default)."""
        s, p = info.input_size, info.stride
        if not info.dynamic_size:
            if size is not None and size != (s, s, s):
                raise ValueError(f"this export has the fixed size {s}, got sizes {size}")
            return cls(batch, (s, s, s))
        size = size or (max(p, s // 2 // p * p), s, 2 * s // p * p)
        if info.kind == "extractor" and any(v % p for v in size):
            raise ValueError(f"profile sizes must be multiples of {p}, got {size}")
        return cls(batch, size)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")


_FP32_TAILS = {
    "extractor": {"attention": ("SOFTMAX",), "cams": ("CONVOLUTION",), "logits": ("REDUCE",)},
    "segmenter": {"logits": ("CONVOLUTION",)},
}
"""Per export kind, the outputs whose last layers stay float32, back to a layer of one of
these types (TensorRT ``LayerType`` names): the extractor's logits to the mean of the CNN
map (ONNX ``GlobalAveragePool``, a TensorRT reduction), the segmenter's to its classifier
convolution (and its resize after it)."""


def _pin_fp32(trt: Any, network: Any, kind: str) -> None:
    """Pin the layers named in the module docstring to float32, for an export of ``kind``."""
    producer = {}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        for j in range(layer.num_outputs):
            producer[layer.get_output(j).name] = layer
    pinned: set[str] = set()

    def pin(layer: Any) -> None:
        outs = [layer.get_output(j) for j in range(layer.num_outputs)]
        if layer.name in pinned or any(t.dtype != trt.float32 for t in outs):
            return  # shape and index layers keep their integer types
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            layer.set_output_type(j, trt.float32)
        pinned.add(layer.name)

    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type in (trt.LayerType.SOFTMAX, trt.LayerType.NORMALIZATION):
            pin(layer)
    for i in range(network.num_outputs):
        out = network.get_output(i)
        stops = {getattr(trt.LayerType, t) for t in _FP32_TAILS[kind].get(out.name, ())}
        todo, seen = [out], set()
        while stops and todo:
            layer = producer.get(todo.pop().name)
            if layer is None or layer.name in seen:
                continue
            seen.add(layer.name)
            pin(layer)
            if layer.type not in stops:
                inputs = (layer.get_input(k) for k in range(layer.num_inputs))
                todo += [t for t in inputs if t is not None]


def _engine_key(onnx_sha: str, gpu: str, trt_version: str, fp16: bool, profile: Profile) -> str:
    settings = dict(
        onnx=onnx_sha, gpu=gpu, tensorrt=trt_version, fp16=fp16, build=_BUILD_VERSION,
        profile=asdict(profile),
    )  # fmt: skip
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:32]


def build_engine(
    onnx_path: str | Path,
    out: str | Path | None,
    profile: Profile,
    *,
    fp16: bool = True,
    cache_dir: str | Path | None = None,
    workspace_gib: float | None = None,
    device: str | torch.device = "cuda",
) -> Path:
    """Build (or take from the cache) the engine of an exported ``.onnx`` for ``profile``,
    copy it to ``out`` (None: leave it in the cache) and write its ``.json`` sidecar next to
    it; returns the engine's path. See the module docstring; not run here.

    Raises :class:`MissingDependencyError` without TensorRT 10 or CUDA, ValueError naming the
    file when TensorRT cannot parse it, RuntimeError when the build fails.
    """
    trt = import_tensorrt()
    if not torch.cuda.is_available():
        raise MissingDependencyError("building a TensorRT engine needs a CUDA GPU")
    onnx_path = Path(onnx_path)
    info = read_info(onnx_path)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    gpu = torch.cuda.get_device_name(torch.device(device))
    key = _engine_key(file_sha256(onnx_path), gpu, trt.__version__, fp16, profile)
    cached = cache / f"{key}.engine"
    sidecar = dict(
        props=info.to_props(), fp16=fp16, profile=asdict(profile), gpu=gpu,
        tensorrt=trt.__version__, onnx=str(onnx_path),
    )  # fmt: skip
    if not cached.is_file():
        timing = cache / f"timing-{_slug(gpu)}-trt{trt.__version__}.cache"
        with torch.cuda.device(device):  # TensorRT builds for the current device
            plan = _build(trt, onnx_path, info.kind, profile, fp16, timing, workspace_gib)
        atomic_write(cached, lambda f: f.write(plan))
    out = cached if out is None else Path(out)
    if out.resolve() != cached.resolve():
        atomic_write(out, lambda f: f.write(cached.read_bytes()))
    atomic_write_json(_sidecar(out), sidecar)
    return out


def _sidecar(engine: Path) -> Path:
    return engine.with_name(engine.name + ".json")


def _build(
    trt: Any,
    onnx_path: Path,
    kind: str,
    profile: Profile,
    fp16: bool,
    timing_path: Path,
    workspace_gib: float | None,
) -> bytes:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ValueError(f"{onnx_path}: TensorRT cannot parse it: {errors}")
    config = builder.create_builder_config()
    if workspace_gib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        _pin_fp32(trt, network, kind)
    opt_profile = builder.create_optimization_profile()
    opt_profile.set_shape(INPUT, *profile.shapes())
    config.add_optimization_profile(opt_profile)
    old = timing_path.read_bytes() if timing_path.is_file() else b""
    config.set_timing_cache(config.create_timing_cache(old), False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see its log)")
    timing = config.get_timing_cache().serialize()
    atomic_write(timing_path, lambda f: f.write(memoryview(timing)))
    return bytes(memoryview(plan))


class TensorRTExtractor:
    """The extractor through a TensorRT engine, with torch CUDA tensors as its bindings.

    ``path``: an engine written by :func:`build_engine` (``adcam export --format tensorrt``,
    with its ``.json`` sidecar), or an exported extractor ``.onnx``, whose engine is then
    built for ``profile`` (default: :meth:`Profile.for_info` with batches 1-16-32) or taken
    from the cache. Each call sets the input shape, binds the input and freshly allocated
    float32 output tensors by address, and enqueues ``execute_async_v3`` on the current torch
    stream, so the outputs are ready in stream order like any torch result. **Not run here**
    (see the module docstring).

    Raises :class:`MissingDependencyError` without TensorRT 10 or a CUDA ``device``, and
    ValueError naming the file when it is not an extractor (engine or ``.onnx``), or a
    ``profile`` comes with an engine.
    """

    def __init__(
        self,
        path: str | Path,
        device: str | torch.device = "cuda",
        *,
        fp16: bool = True,
        profile: Profile | None = None,
        cache_dir: str | Path | None = None,
    ) -> None:
        trt = import_tensorrt()
        self.device = resolve_device(device)
        if self.device.type != "cuda" or not torch.cuda.is_available():
            raise MissingDependencyError(f"the tensorrt backend needs a CUDA device, got {device}")
        path = Path(path)
        if path.suffix.lower() == ".onnx":
            info = read_info(path)
            expect_kind(info, "extractor", path)  # before a build of minutes
            profile = profile or Profile.for_info(info, (1, 16, 32), None)
            path = build_engine(
                path, None, profile, fp16=fp16, cache_dir=cache_dir, device=self.device
            )
        elif profile is not None:
            raise ValueError(f"{path}: an engine, built for its own profile: pass its .onnx")
        self.info, built_fp16 = _read_sidecar(path)
        if self.info.kind != "extractor":
            raise ValueError(f"{path}: a {self.info.kind} engine, not an extractor")
        with torch.cuda.device(self.device):
            runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
            self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
            if self.engine is None:
                raise ValueError(f"{path}: TensorRT cannot load this engine (other GPU/version?)")
            names = {self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)}
            if names != {INPUT, *OUTPUTS} or any(
                self.engine.get_tensor_dtype(n) != trt.float32 for n in names
            ):
                raise ValueError(f"{path}: tensors {sorted(names)} are not an extractor's")
            self.context = self.engine.create_execution_context()
            lo, _, hi = self.engine.get_tensor_profile_shape(INPUT, 0)
        side = (max(lo[2], lo[3]), min(hi[2], hi[3]))  # (B, 3, H, W) Dims; square images
        self.inputs = InputRange((lo[0], hi[0]), side, f"the profile of {path}")
        self.path = path
        self.class_names = self.info.class_names
        self.mean, self.std = self.info.mean, self.info.std
        self.patch_size = self.info.stride
        self.precision = "fp16" if built_fp16 else self.info.precision

    def __call__(self, images: Tensor) -> Extraction:
        images = check_images(images, self.device, self.info)
        with torch.cuda.device(self.device):  # the engine's device must be the current one
            return self._run(images)

    def _run(self, images: Tensor) -> Extraction:
        stream = torch.cuda.current_stream(self.device)
        if not self.context.set_input_shape(INPUT, tuple(images.shape)):
            lo, _, hi = self.engine.get_tensor_profile_shape(INPUT, 0)
            raise ValueError(
                f"{self.path}: input {tuple(images.shape)} is outside the engine's profile "
                f"{tuple(lo)}..{tuple(hi)}"
            )
        self.context.set_tensor_address(INPUT, images.data_ptr())
        outs = {}
        for name in OUTPUTS:
            shape = tuple(self.context.get_tensor_shape(name))
            outs[name] = torch.empty(shape, dtype=torch.float32, device=self.device)
            self.context.set_tensor_address(name, outs[name].data_ptr())
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"{self.path}: TensorRT execution failed")
        return Extraction(**outs)


def _read_sidecar(engine: Path) -> tuple[ExportInfo, bool]:
    """The engine's export metadata, and whether it was built with float16 allowed."""
    side = _sidecar(engine)
    if not engine.is_file() or not side.is_file():
        raise ValueError(f"{engine}: no such engine, or its {side.name} sidecar is missing")
    try:
        record = json.loads(side.read_text())
        props, fp16 = record["props"], record["fp16"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{side}: corrupt engine sidecar ({type(e).__name__}: {e})") from e
    return ExportInfo.from_props(props, side), bool(fp16)

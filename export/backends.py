"""Extractor backends: image batch -> (logits, CAM logit maps F, attention A).

Every backend takes a normalised float image batch (B, 3, H, W) on its device and returns an
:class:`Extraction` in float32; the label pipeline is written against this contract only.

=============  ==========================  =================================================
backend        ``checkpoint``              runs
=============  ==========================  =================================================
``torch``      classifier ``.pth``         :class:`TorchExtractor` (eager, bf16 autocast on
                                           CUDA when ``amp``)
``onnx``       ``.onnx`` of                :class:`OnnxExtractor` (ONNX Runtime: CPU, or
               ``adcam export``            CUDA with outputs kept on the GPU); its other
                                           name is ``onnxruntime``
``tensorrt``   ``.engine`` (+ ``.json``)   :class:`~adcam_fast.export.tensorrt.TensorRTExtractor`
               or ``.onnx``                (not run on the dev machines: see that module)
=============  ==========================  =================================================

The ONNX and TensorRT backends read the class names, mean, std and patch size from the
metadata :func:`~adcam_fast.export.onnx.export_checkpoint` writes into the file.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from adcam_fast.export.onnx import ExportInfo
    from adcam_fast.export.tensorrt import Profile

#: Input and output names of an exported extractor (ONNX graph and TensorRT engine).
INPUT = "images"
OUTPUTS = ("logits", "cams", "attention")
BACKENDS = ("torch", "onnx", "onnxruntime", "tensorrt")  # onnxruntime: onnx's other name


@dataclass(frozen=True)
class Extraction:
    """logits (B, K) of the CNN head; cams (B, K, h, w) Eq. 2 logit maps; attention (B, N, N)
    with N = h·w, class token dropped, rows summing to 1."""

    logits: Tensor
    cams: Tensor
    attention: Tensor


@dataclass(frozen=True)
class InputRange:
    """The input batches and square image sides an extractor takes, each (least, most), and
    what sets them (named in errors)."""

    batch: tuple[int, int] = (1, sys.maxsize)
    side: tuple[int, int] = (1, sys.maxsize)
    source: str = "any size"


class Extractor(Protocol):
    """``precision``: the arithmetic of the body, which shifts the maps numerically:
    ``"fp32"``, ``"bf16-autocast"`` (torch on CUDA) or ``"fp16"`` (a half-precision export or
    TensorRT engine); the outputs are float32 whatever it is."""

    class_names: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    patch_size: int
    device: torch.device
    inputs: InputRange
    precision: str

    def __call__(self, images: Tensor) -> Extraction: ...


class ExtractorGraph(nn.Module):
    """The extractor as one module: ``images (B, 3, H, W) -> (logits, cams, attention)``.

    ``cams, attention, logits = model.extract(images, return_logits=True)``: all transformer
    blocks, and the CNN head's logits. This module is what :class:`TorchExtractor` runs and
    what the ONNX export traces, so both compute the same.

    ``dtype``: the images are cast to it first (float16 for a half-precision export whose
    parameters were converted by the caller); the outputs are float32 whatever it is.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.model = model
        self.dtype = dtype

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        cams, attention, logits = self.model.extract(images.to(self.dtype), return_logits=True)
        return logits, cams, attention


class TorchExtractor:
    """Eager PyTorch: :class:`ExtractorGraph` under inference mode, bf16 autocast on CUDA if
    asked."""

    def __init__(
        self,
        model: torch.nn.Module,
        class_names: list[str],
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        device: str | torch.device = "cpu",
        amp: bool = True,
    ) -> None:
        self.device = resolve_device(device)
        self.model = model.eval().to(self.device)
        self.graph = ExtractorGraph(self.model)
        self.class_names = class_names
        self.mean, self.std = tuple(mean), tuple(std)
        self.patch_size = model.patch_size
        self.inputs = InputRange()
        self.amp = amp and self.device.type == "cuda"
        self.precision = "bf16-autocast" if self.amp else "fp32"

    @torch.inference_mode()
    def __call__(self, images: Tensor) -> Extraction:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            logits, F, A = self.graph(images)
        return Extraction(logits=logits, cams=F, attention=A)


def resolve_device(device: str | torch.device) -> torch.device:
    """``device`` with the current CUDA device's index filled in (``"cuda"`` -> ``cuda:N``), so
    it equals the ``device`` of the tensors moved to it. Raises ValueError naming the device
    when torch does not know it, or it is a CUDA device that is not there."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {device!r} is not a torch device ({e})") from e
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {device}: no CUDA device is visible (use --device cpu)")
        if device.index is None:
            return torch.device("cuda", torch.cuda.current_device())
        if device.index >= count:
            raise ValueError(f"device {device}: only {count} CUDA device(s) are visible")
    return device


def check_images(images: Tensor, device: torch.device, info: ExportInfo) -> Tensor:
    """``images`` as a contiguous float32 batch, after checking what an exported extractor
    accepts: 4-D with 3 channels, on ``device``, sides multiples of the patch size, and the
    export's fixed size when it has one. Raises ValueError naming what is wrong."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    if images.device != device:
        raise ValueError(f"images are on {images.device}, the extractor on {device}")
    h, w = images.shape[-2:]
    if h % info.stride or w % info.stride:
        raise ValueError(f"image sides must be multiples of {info.stride}, got {h}x{w}")
    if not info.dynamic_size and (h, w) != (info.input_size, info.input_size):
        raise ValueError(
            f"this export has the fixed size {info.input_size}x{info.input_size}, got {h}x{w}"
        )
    return images.detach().float().contiguous()


def export_inputs(info: ExportInfo, path: str | Path) -> InputRange:
    """What the export ``path`` takes: any batch, and any side or its fixed size only."""
    size = info.input_size
    fixed = InputRange(side=(size, size), source=f"{path}'s fixed size")
    return InputRange() if info.dynamic_size else fixed


def output_shapes(images: Tensor, info: ExportInfo) -> dict[str, tuple[int, ...]]:
    """The shapes of an extractor's outputs for ``images`` (B, 3, H, W)."""
    b, _, h, w = images.shape
    k, gh, gw = len(info.class_names), h // info.stride, w // info.stride
    return dict(logits=(b, k), cams=(b, k, gh, gw), attention=(b, gh * gw, gh * gw))


class OnnxExtractor:
    """ONNX Runtime over an extractor exported by ``adcam export --what extractor``.

    Class names, mean, std and patch size come from the file's metadata. On a CPU ``device``
    the CPU provider runs it (outputs are tensors sharing the arrays ONNX Runtime returns). On
    a CUDA ``device`` (needs ``onnxruntime-gpu``: ``pip install "adcam_fast[gpu]"``) the CUDA
    provider runs it with IO binding: the input is read from the torch tensor's memory and
    the outputs are written into torch-allocated CUDA tensors, so nothing crosses to the host
    (the current torch stream is synchronised first, and ONNX Runtime's ``run`` returns when
    its own stream is done). ``providers`` overrides the provider list, e.g.
    ``["TensorrtExecutionProvider", "CUDAExecutionProvider"]``; entries may be
    ``(name, options)`` pairs; ``threads`` sets the CPU provider's intra-op threads (None:
    one per physical core). The GPU paths have not been run on the dev machines, which
    have the CPU build of ONNX Runtime only.

    Raises ValueError naming the file when it is missing, not ONNX, not an extractor, or
    lacks the metadata; and when a requested provider is not in this ONNX Runtime.
    """

    def __init__(
        self,
        path: str | Path,
        device: str | torch.device = "cpu",
        providers: Sequence[str | tuple[str, dict[str, Any]]] | None = None,
        threads: int | None = None,
    ) -> None:
        from adcam_fast.export.onnx import open_session

        self.device = resolve_device(device)
        self.path = Path(path)
        self.session, self.info = open_session(path, "extractor", self.device, providers, threads)
        self.class_names = self.info.class_names
        self.mean, self.std = self.info.mean, self.info.std
        self.patch_size = self.info.stride
        self.inputs = export_inputs(self.info, self.path)
        self.precision = self.info.precision

    def __call__(self, images: Tensor) -> Extraction:
        images = check_images(images, self.device, self.info)
        if self.device.type == "cpu":
            outs = self.session.run(list(OUTPUTS), {INPUT: images.numpy()})
            return Extraction(*(torch.from_numpy(o) for o in outs))
        return self._run_bound(images)

    def _run_bound(self, images: Tensor) -> Extraction:
        index = self.device.index
        binding = self.session.io_binding()
        binding.bind_input(INPUT, "cuda", index, np.float32, tuple(images.shape), images.data_ptr())
        outs = {}
        for name, shape in output_shapes(images, self.info).items():
            outs[name] = torch.empty(shape, dtype=torch.float32, device=self.device)
            binding.bind_output(name, "cuda", index, np.float32, shape, outs[name].data_ptr())
        torch.cuda.current_stream(self.device).synchronize()
        self.session.run_with_iobinding(binding)
        return Extraction(**{k: outs[k] for k in ("logits", "cams", "attention")})


def create_extractor(
    backend: str,
    checkpoint: str,
    device: str | torch.device = "cpu",
    amp: bool = True,
    profile: Profile | None = None,
) -> Extractor:
    """The extractor ``backend`` builds from ``checkpoint``: a classifier checkpoint for
    ``torch``, an exported ``.onnx`` for ``onnx``, an engine (or an ``.onnx`` to build one
    from, fp16 when ``amp``, for ``profile``) for ``tensorrt``. ``amp`` only picks the torch
    autocast and the TensorRT build precision; an ONNX file runs in the precision it was
    exported in. Raises ValueError naming the backend or the file when either is unusable,
    or a ``profile`` is given for another backend."""
    if profile is not None and backend != "tensorrt":
        raise ValueError(f"a TensorRT profile is for the tensorrt backend, not {backend!r}")
    if backend == "torch":
        from adcam_fast.training.checkpoint import load_classifier

        if Path(checkpoint).suffix.lower() in (".onnx", ".engine"):
            raise ValueError(f"{checkpoint}: an exported file: pass --backend onnx or tensorrt")
        model, meta = load_classifier(checkpoint, device="cpu")
        cfg = meta["config"]
        return TorchExtractor(model, meta["class_names"], cfg["mean"], cfg["std"], device, amp)
    if backend in ("onnx", "onnxruntime"):
        return OnnxExtractor(checkpoint, device)
    if backend == "tensorrt":
        from adcam_fast.export.tensorrt import TensorRTExtractor

        return TensorRTExtractor(checkpoint, device, fp16=amp, profile=profile)
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")

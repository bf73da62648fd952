"""ONNX export of the extractor and the segmenter, the metadata that makes an exported file
self-describing, and the ONNX Runtime session the ``onnx`` backend runs.

Graphs (input ``images``: normalised float32 (B, 3, H, W); every float output is float32):

* extractor: ``logits`` (B, K) of the CNN head, ``cams`` (B, K, h, w) the Eq. 2 logit maps,
  ``attention`` (B, N, N) the averaged attention (see
  :class:`~adcam_fast.export.backends.ExtractorGraph`), h = H / patch, N = h·w;
* segmenter: ``logits`` (B, K + 1, H / os, W / os), and with ``with_labels`` also ``labels``
  (B, H, W) int64, the argmax of the logits upsampled bilinearly to the input (as
  :meth:`~adcam_fast.models.segmenter.Segmenter.predict`).

The batch is always dynamic. Height and width are dynamic too unless the model resizes
something to a size computed from the input: a Conformer whose CNN map is not on the token
grid (built without ``drop_last_block``) resizes its CAMs to the token grid, and neither
exporter keeps that size symbolic, so such a model is exported at its training crop
(``dynamic_size`` false in the metadata) and the backends refuse other sizes.

With ``fp16`` the body runs in float16: the parameters are converted, the float32 input is
cast inside the graph, and the outputs are float32 (the attention average and the CAM maps are
computed in float32 by :meth:`Conformer.extract`; LayerNorm is the opset-17
``LayerNormalization``, which normalises in float32). Measured against the float32 PyTorch
model (nano models, CPU provider): about 2e-3 relative on A and the CAM maps, 1e-3 on the
logits; see :data:`TOLERANCES`.

Exporter: ``torch.onnx.export(..., dynamo=False)`` (TorchScript tracing) by default. Both
exporters give the same graph semantics and parity for these models on torch 2.14, but the
TorchScript one exports the nano extractor in ~1.5 s against ~35-45 s for ``dynamo=True``
and needs no ``onnxscript`` (which the GPU machine's torch 2.11 environment may lack); it is
deprecated since torch 2.9 but present in 2.11 and 2.14. ``exporter="dynamo"`` selects the
torch.export-based one. Either way the file is checked with ``onnx.checker.check_model``
(full check) and, unless ``verify=False``, run with ONNX Runtime at two input shapes against
PyTorch.

Metadata (``ModelProto.metadata_props``, every value JSON): keys ``adcam_fast.<field>`` for
each field of :class:`ExportInfo`, plus ``adcam_fast.format_version``.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import adcam_fast
from adcam_fast.export.backends import INPUT, OUTPUTS, ExtractorGraph
from adcam_fast.io import atomic_write, file_sha256, writable_file

__all__ = [
    "DEFAULT_OPSET",
    "EXPORTERS",
    "KINDS",
    "TOLERANCES",
    "ExportInfo",
    "MissingDependencyError",
    "SegmenterGraph",
    "expect_kind",
    "export_checkpoint",
    "export_graph",
    "open_session",
    "read_info",
    "verify_export",
]

FORMAT_VERSION = 1
DEFAULT_OPSET = 18
MIN_OPSET = 17
EXPORTERS = ("torchscript", "dynamo")
KINDS = ("extractor", "segmenter")
_PREFIX = "adcam_fast."
ONNX_HINT = 'pip install "adcam_fast[onnx]"'

#: Largest ONNX Runtime vs PyTorch (float32) differences an export may show, per precision.
#: ``*_abs``: max absolute difference; ``*_rel``: max absolute difference over the reference's
#: max magnitude; ``labels_agree``: least fraction of equal labels. Measured on nano models
#: with the CPU provider at 64² to 384²: fp32 attention abs <= 6e-8, cams and logits rel
#: <= 1e-6; fp16 attention rel <= 2.4e-3 (abs <= 9e-5 with peaked attention), cams rel
#: <= 2.4e-3, logits rel <= 1e-3, segmenter logits rel 5e-4. The fp16 bounds are ~4-10x those:
#: a sanity check (fp16 attention errors scale with the attention values, hence relative).
TOLERANCES: dict[str, dict[str, float]] = {
    "fp32": dict(attention_abs=1e-5, cams_rel=1e-4, logits_rel=1e-4, labels_agree=0.999),
    "fp16": dict(attention_rel=1e-2, cams_rel=1e-2, logits_rel=1e-2, labels_agree=0.99),
}


class MissingDependencyError(ImportError, ValueError):
    """An optional dependency is not installed; the message says what to install. Also a
    ValueError, so the ``adcam`` command reports it as a plain error."""


def require(module: str, hint: str) -> Any:
    """``import module``, or raise :class:`MissingDependencyError` with ``hint``."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependencyError(f"{module} is not installed: {hint}") from e


@dataclass(frozen=True)
class ExportInfo:
    """What an exported file is and how to feed it (stored in its metadata).

    kind: ``"extractor"`` or ``"segmenter"``. class_names: the K foreground classes (a
    segmenter's output channel c + 1 is class c, channel 0 the background). input_size: the
    training crop side. mean, std: the RGB normalisation, on the 0-1 scale. stride: the patch
    size (extractor) or output stride (segmenter). model: the timm model / backbone name.
    precision: ``"fp32"`` or ``"fp16"`` (the body; outputs are float32 either way).
    dynamic_size: whether H and W may differ from ``input_size``. checkpoint_sha256,
    package_version, torch_version, exporter, opset: provenance.
    """

    kind: str
    class_names: list[str]
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    stride: int
    model: str
    precision: str
    dynamic_size: bool
    checkpoint_sha256: str
    package_version: str
    torch_version: str
    exporter: str
    opset: int

    def to_props(self) -> dict[str, str]:
        """The metadata entries: ``adcam_fast.<field>`` -> JSON value."""
        props = {f"{_PREFIX}{k}": json.dumps(v) for k, v in asdict(self).items()}
        props[f"{_PREFIX}format_version"] = json.dumps(FORMAT_VERSION)
        return props

    @classmethod
    def from_props(cls, props: Mapping[str, str], source: str | Path) -> ExportInfo:
        """Parse :meth:`to_props` entries (other keys are ignored). Raises ValueError naming
        ``source`` when they are absent, corrupt, incomplete or of another format version."""
        ours = {k[len(_PREFIX) :]: v for k, v in props.items() if k.startswith(_PREFIX)}
        if not ours:
            raise ValueError(f"{source}: no adcam_fast metadata (not written by `adcam export`)")
        try:
            values = {k: json.loads(v) for k, v in ours.items()}
        except json.JSONDecodeError as e:
            raise ValueError(f"{source}: corrupt adcam_fast metadata ({e})") from e
        version = values.pop("format_version", None)
        if version != FORMAT_VERSION:
            raise ValueError(f"{source}: metadata format {version!r}, expected {FORMAT_VERSION}")
        missing = [f.name for f in fields(cls) if f.name not in values]
        if missing:
            raise ValueError(f"{source}: adcam_fast metadata lacks {missing}")
        v = {f.name: values[f.name] for f in fields(cls)}

        def number(x: Any) -> bool:
            return isinstance(x, int | float) and not isinstance(x, bool)

        ok = (
            v["kind"] in KINDS
            and isinstance(v["class_names"], list)
            and all(isinstance(n, str) for n in v["class_names"])
            and all(
                isinstance(v[n], list) and len(v[n]) == 3 and all(map(number, v[n]))
                for n in ("mean", "std")
            )
            and all(
                isinstance(v[n], int) and number(v[n]) and v[n] > 0
                for n in ("stride", "input_size", "opset")
            )
            and v["precision"] in TOLERANCES
            and isinstance(v["dynamic_size"], bool)
        )
        if not ok:
            raise ValueError(f"{source}: invalid adcam_fast metadata {v}")
        v["mean"], v["std"] = tuple(map(float, v["mean"])), tuple(map(float, v["std"]))
        return cls(**v)


def read_info(path: str | Path) -> ExportInfo:
    """The :class:`ExportInfo` of an exported ``.onnx`` file (reads the protobuf with
    ``onnx``, weights included). Raises ValueError naming the file when it is missing, not
    ONNX, or lacks the metadata."""
    onnx = require("onnx", ONNX_HINT)
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises several types for bad bytes
        raise ValueError(f"{path}: not a readable ONNX model ({type(e).__name__}: {e})") from e
    return ExportInfo.from_props({p.key: p.value for p in model.metadata_props}, path)


def expect_kind(info: ExportInfo, kind: str, source: str | Path) -> None:
    """Raise ValueError naming ``source`` unless ``info`` is of ``kind``."""
    if info.kind != kind:
        raise ValueError(
            f"{source}: an exported {info.kind}, where an exported {kind} is needed "
            f"(`adcam export --what {kind}`)"
        )


def _providers(
    ort: Any,
    device: torch.device,
    requested: Sequence[str | tuple[str, dict[str, Any]]] | None,
) -> list[str | tuple[str, dict[str, Any]]]:
    if requested is None:
        if device.type == "cpu":
            requested = ["CPUExecutionProvider"]
        elif device.type == "cuda":
            index = device.index if device.index is not None else 0
            requested = [("CUDAExecutionProvider", {"device_id": index})]
        else:
            raise ValueError(f"the onnx backend runs on cpu or cuda, not {device}")
    available = ort.get_available_providers()
    names = [p if isinstance(p, str) else p[0] for p in requested]
    missing = [n for n in names if n not in available]
    if missing:
        raise MissingDependencyError(
            f"onnxruntime {ort.__version__} lacks {missing} (it has {available}): for CUDA "
            'and TensorRT providers pip install "adcam_fast[gpu]" (onnxruntime-gpu), '
            "or run on --device cpu"
        )
    fallback = [] if "CPUExecutionProvider" in names else ["CPUExecutionProvider"]
    return [*requested, *fallback]


def open_session(
    path: str | Path,
    kind: str,
    device: str | torch.device = "cpu",
    providers: Sequence[str | tuple[str, dict[str, Any]]] | None = None,
    threads: int | None = None,
) -> tuple[Any, ExportInfo]:
    """An ``onnxruntime.InferenceSession`` of an exported ``kind`` and its :class:`ExportInfo`.

    Providers: ``providers`` if given, else the CPU provider for a CPU ``device`` and the
    CUDA provider for a CUDA one (the CPU provider is appended as ONNX Runtime's fallback).
    ``threads``: intra-op threads of the CPU provider (None: ONNX Runtime's default, one per
    physical core).
    Raises ValueError naming the file when it is missing, not readable ONNX, lacks the
    metadata, is of another kind, or has other inputs/outputs than a ``kind`` export; and
    :class:`MissingDependencyError` when onnxruntime or a requested provider is missing.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    ort = require("onnxruntime", ONNX_HINT)
    chosen = _providers(ort, torch.device(device), providers)
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(str(path), options, providers=chosen)
    except Exception as e:  # onnxruntime raises its own types for bad models
        raise ValueError(f"{path}: not a readable ONNX model ({type(e).__name__}: {e})") from e
    info = ExportInfo.from_props(session.get_modelmeta().custom_metadata_map, path)
    expect_kind(info, kind, path)
    inputs = [i.name for i in session.get_inputs()]
    outputs = {o.name for o in session.get_outputs()}
    expected = [set(OUTPUTS)] if kind == "extractor" else [{"logits"}, {"logits", "labels"}]
    if inputs != [INPUT] or outputs not in expected:
        raise ValueError(
            f"{path}: inputs {inputs} and outputs {sorted(outputs)} are not those of an "
            f"exported {kind} ([{INPUT!r}] -> {sorted(expected[-1])})"
        )
    return session, info


class SegmenterGraph(nn.Module):
    """``images -> logits`` (float32) at the output stride, and with ``with_labels`` also the
    (B, H, W) labels of :meth:`Segmenter.predict`. ``dtype`` as in
    :class:`~adcam_fast.export.backends.ExtractorGraph`."""

    def __init__(
        self, model: nn.Module, with_labels: bool = False, dtype: torch.dtype = torch.float32
    ) -> None:
        super().__init__()
        self.model, self.with_labels, self.dtype = model, with_labels, dtype

    def forward(self, images: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        logits = self.model(images.to(self.dtype)).float()
        if not self.with_labels:
            return logits
        up = F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return logits, up.argmax(1)


def _output_axes(kind: str, with_labels: bool, dynamic_size: bool) -> dict[str, dict[int, str]]:
    hw = {2: "out_height", 3: "out_width"} if dynamic_size else {}
    if kind == "extractor":
        tokens = {1: "tokens", 2: "tokens"} if dynamic_size else {}
        return dict(logits={0: "batch"}, cams={0: "batch", **hw}, attention={0: "batch", **tokens})
    axes = dict(logits={0: "batch", **hw})
    if with_labels:
        axes["labels"] = {0: "batch", **({1: "height", 2: "width"} if dynamic_size else {})}
    return axes


def max_opset(exporter: str) -> int:
    """The newest ONNX opset that this torch's ``exporter`` writes."""
    from torch.onnx import _constants

    if exporter == "torchscript":
        return _constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET
    return _constants.ONNX_MAX_OPSET


def export_graph(
    graph: nn.Module,
    sample: Tensor,
    info: ExportInfo,
    out: str | Path,
    with_labels: bool = False,
) -> Path:
    """Export ``graph`` (an :class:`ExtractorGraph` or :class:`SegmenterGraph` on the CPU; it
    is put in eval mode) traced at ``sample`` to ``out`` with ``info``'s exporter, opset,
    dynamic axes and metadata; check it with ``onnx.checker`` (full check) and write it
    atomically."""
    onnx = require("onnx", ONNX_HINT)
    graph.eval()
    if info.exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {info.exporter!r}")
    if info.exporter == "dynamo":
        require("onnxscript", ONNX_HINT)
    top = max_opset(info.exporter)
    if not MIN_OPSET <= info.opset <= top:
        raise ValueError(
            f"opset must be in [{MIN_OPSET}, {top}] for the {info.exporter} exporter of torch "
            f"{torch.__version__}, got {info.opset}"
        )
    outputs = _output_axes(info.kind, with_labels, info.dynamic_size)
    image_axes = {0: "batch", **({2: "height", 3: "width"} if info.dynamic_size else {})}
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad(), warnings.catch_warnings():
        # The tracer warns about the model's Python-side input checks and grid comparison,
        # which are constant for a valid input; the parity check covers the result.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", ".*legacy TorchScript-based ONNX export", Warning)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
        # dynamo=True turns dynamic_axes into dynamic_shapes itself (checked by the tests)
        warnings.filterwarnings("ignore", ".*'dynamic_axes' is not recommended", UserWarning)
        raw = Path(tmp) / "graph.onnx"
        torch.onnx.export(
            graph,
            (sample,),
            str(raw),
            input_names=[INPUT],
            output_names=list(outputs),
            dynamic_axes={INPUT: image_axes, **outputs},
            opset_version=info.opset,
            dynamo=info.exporter == "dynamo",
            **({"verbose": False, "external_data": False} if info.exporter == "dynamo" else {}),
        )
        model = onnx.load(str(raw))
    onnx.helper.set_model_props(model, info.to_props())
    model.doc_string = f"adcam_fast {info.kind} ({info.model}, {info.precision})"
    onnx.checker.check_model(model, full_check=True)
    return atomic_write(out, lambda f: f.write(model.SerializeToString()))


def _cnn_on_token_grid(model: nn.Module, sample: Tensor) -> bool:
    """Whether the Conformer's final CNN map is on the token grid (no input-dependent resize
    in ``extract``), probed with one forward pass."""
    with torch.inference_mode():
        x_cnn, _ = model.forward_features(sample[:1])
    p = model.patch_size
    return tuple(x_cnn.shape[-2:]) == (sample.shape[-2] // p, sample.shape[-1] // p)


def _half(model: nn.Module, fp16: bool) -> tuple[nn.Module, torch.dtype]:
    return (copy.deepcopy(model).half(), torch.float16) if fp16 else (model, torch.float32)


def export_checkpoint(
    checkpoint: str | Path,
    what: str,
    out: str | Path,
    *,
    fp16: bool = False,
    exporter: str = "torchscript",
    opset: int = DEFAULT_OPSET,
    with_labels: bool = False,
    verify: bool = True,
) -> tuple[ExportInfo, dict[str, float]]:
    """Export the classifier (``what="extractor"``) or segmenter checkpoint to ONNX at ``out``.

    Returns the written :class:`ExportInfo` and the parity errors of :func:`verify_export`
    (empty without ``verify``). Raises ValueError naming the file for an unusable checkpoint,
    an unknown ``what``/``exporter``, an opset outside 17 to `max_opset`, ``with_labels``
    for an extractor, an ``out`` that is a folder or in one that cannot be written, or an
    export that fails the check (which then leaves what ``out`` held as it was).
    """
    from adcam_fast.training.checkpoint import load_classifier, load_segmenter

    if what not in KINDS:
        raise ValueError(f"what must be one of {KINDS}, got {what!r}")
    if with_labels and what != "segmenter":
        raise ValueError("with_labels (--with-labels) is for a segmenter export only")
    out = writable_file(out, "out")
    load = load_classifier if what == "extractor" else load_segmenter
    model, meta = load(checkpoint, device="cpu")
    cfg = meta["config"]
    size = int(cfg["crop"])
    sample = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    body, dtype = _half(model, fp16)
    if what == "extractor":
        reference: nn.Module = ExtractorGraph(model)
        graph: nn.Module = ExtractorGraph(body, dtype)
        stride, name, dynamic = model.patch_size, cfg["model"], _cnn_on_token_grid(model, sample)
    else:
        reference = SegmenterGraph(model, with_labels)
        graph = SegmenterGraph(body, with_labels, dtype)
        stride, name, dynamic = model.output_stride, cfg["backbone"], True
    info = ExportInfo(
        kind=what,
        class_names=list(meta["class_names"]),
        input_size=size,
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        stride=stride,
        model=name,
        precision="fp16" if fp16 else "fp32",
        dynamic_size=dynamic,
        checkpoint_sha256=file_sha256(checkpoint),
        package_version=adcam_fast.__version__,
        torch_version=torch.__version__,
        exporter=exporter,
        opset=opset,
    )
    staged = out.with_name(f".{out.name}.{os.getpid()}.unverified")
    try:
        export_graph(graph, sample, info, staged, with_labels)
        errors = verify_export(staged, reference, shown_as=out) if verify else {}
        os.replace(staged, out)  # only a verified export replaces what --out held
    finally:
        staged.unlink(missing_ok=True)
    return info, errors


def _compare(ref: Tensor, got: Tensor, name: str) -> dict[str, float]:
    """``labels_agree`` for labels, else ``<name>_abs`` and ``<name>_rel``."""
    if name == "labels":
        return {"labels_agree": (got == ref).float().mean().item()}
    diff = (got - ref).abs().max().item()
    scale = max(ref.abs().max().item(), torch.finfo(ref.dtype).tiny)
    return {f"{name}_abs": diff, f"{name}_rel": diff / scale}


def verify_export(
    path: str | Path, reference: nn.Module, shown_as: str | Path | None = None
) -> dict[str, float]:
    """Run the export at ``path`` with ONNX Runtime (CPU) and ``reference`` (the float32
    graph it came from) at two input shapes: the batch changes, and so do the (unequal) height
    and width when the export has a dynamic size. Returns the worst errors over both
    (``<output>_abs``, ``<output>_rel``, ``labels_agree``; see :data:`TOLERANCES`). Raises
    ValueError naming the file (``shown_as``, else ``path``) when one is out of tolerance
    for the export's precision."""
    shown = shown_as or path
    info = read_info(path)
    session, _ = open_session(path, info.kind)
    s, p = info.input_size, info.stride
    shapes = [(2, 3, s, s), (3, 3, s + p, s + 2 * p) if info.dynamic_size else (3, 3, s, s)]
    keys = OUTPUTS if info.kind == "extractor" else ("logits", "labels")
    names = [o.name for o in session.get_outputs()]
    tol = TOLERANCES[info.precision]
    gen = torch.Generator().manual_seed(1)
    worst: dict[str, float] = {}
    for shape in shapes:
        x = torch.randn(*shape, generator=gen)
        with torch.inference_mode():
            out = reference(x)
        out = out if isinstance(out, tuple) else (out,)
        ref = dict(zip(keys[: len(out)], out, strict=True))
        got = dict(zip(names, session.run(names, {INPUT: x.numpy()}), strict=True))
        for name, r in ref.items():
            g = torch.from_numpy(got[name])
            if g.shape != r.shape:
                raise ValueError(
                    f"{shown}: {name} is {tuple(g.shape)} at input {shape}, "
                    f"PyTorch gives {tuple(r.shape)}"
                )
            for k, v in _compare(r, g, name).items():
                agree = k == "labels_agree"
                worst[k] = min(worst.get(k, 1.0), v) if agree else max(worst.get(k, 0.0), v)
                if (v < tol[k]) if agree else (v > tol.get(k, float("inf"))):
                    raise ValueError(
                        f"{shown}: ONNX Runtime and PyTorch differ at input {shape}: "
                        f"{k} = {v:.3g} (tolerance {tol[k]:.0e} for {info.precision})"
                    )
    return worst

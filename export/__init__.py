"""ONNX / TensorRT export of the extractor and the segmenter.

Modules: ``backends`` (the :class:`Extractor` contract and the torch / ONNX Runtime
extractors, :func:`create_extractor`), ``onnx`` (export, metadata, parity check),
``tensorrt`` (engine build and runner; written against the TensorRT 10 API, not run here),
``command`` (``adcam export``). Importing this package needs neither onnx, onnxruntime nor
tensorrt: they are imported where used.
"""

from adcam_fast.export.backends import (
    Extraction,
    Extractor,
    ExtractorGraph,
    InputRange,
    OnnxExtractor,
    TorchExtractor,
    create_extractor,
)
from adcam_fast.export.onnx import ExportInfo, MissingDependencyError, export_checkpoint, read_info
from adcam_fast.export.tensorrt import TensorRTExtractor, build_engine

__all__ = [
    "ExportInfo",
    "Extraction",
    "Extractor",
    "ExtractorGraph",
    "InputRange",
    "MissingDependencyError",
    "OnnxExtractor",
    "TensorRTExtractor",
    "TorchExtractor",
    "build_engine",
    "create_extractor",
    "export_checkpoint",
    "read_info",
]

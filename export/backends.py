"""Extractor backends: image batch -> (logits, CAM logit maps F, attention A).

Every backend takes a normalised float image batch (B, 3, H, W) on its device and returns an
:class:`Extraction` in float32; the label pipeline is written against this contract only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor


@dataclass(frozen=True)
class Extraction:
    """logits (B, K) of the CNN head; cams (B, K, h, w) Eq. 2 logit maps; attention (B, N, N)
    with N = h·w, class token dropped, rows summing to 1."""

    logits: Tensor
    cams: Tensor
    attention: Tensor


class Extractor(Protocol):
    class_names: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    patch_size: int
    device: torch.device

    def __call__(self, images: Tensor) -> Extraction: ...


class TorchExtractor:
    """Eager PyTorch: ``model.extract`` under inference mode, bf16 autocast on CUDA if asked."""

    def __init__(
        self,
        model: torch.nn.Module,
        class_names: list[str],
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        device: str | torch.device = "cpu",
        amp: bool = True,
    ) -> None:
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        self.class_names = class_names
        self.mean, self.std = tuple(mean), tuple(std)
        self.patch_size = model.patch_size
        self.amp = amp and self.device.type == "cuda"

    @torch.inference_mode()
    def __call__(self, images: Tensor) -> Extraction:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            F, A = self.model.extract(images)
        bias = self.model.conv_cls_head.bias
        logits = F.mean((-2, -1)) + (bias.float() if bias is not None else 0.0)
        return Extraction(logits=logits, cams=F, attention=A)


BACKENDS = ("torch", "onnx", "tensorrt")


def create_extractor(
    backend: str, checkpoint: str, device: str | torch.device = "cpu", amp: bool = True
) -> Extractor:
    """The extractor ``backend`` builds from ``checkpoint`` (a classifier checkpoint for
    ``torch``). Raises ValueError naming the backend or the file when either is unusable."""
    if backend == "torch":
        from adcam_fast.training.checkpoint import load_classifier

        model, meta = load_classifier(checkpoint, device="cpu")
        cfg = meta["config"]
        return TorchExtractor(model, meta["class_names"], cfg["mean"], cfg["std"], device, amp)
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")

"""DeepLab v2-style segmenter trained on AD-CAM pseudo-masks (Chen et al., TPAMI 2018).

A dilated timm backbone (ResNet-101 by default; ``resnet18`` for CPU work) followed by the
DeepLab v2 ASPP head: four parallel 3x3 convolutions with dilations 6, 12, 18, 24 straight to
the class logits, summed. The forward pass is plain tensor code with no data-dependent Python
control flow, so it traces and exports to ONNX with dynamic image sizes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adcam_fast.models.weights import mismatch

__all__ = ["ASPP", "Segmenter"]


class ASPP(nn.Module):
    """DeepLab v2 atrous spatial pyramid pooling: ``sum_d conv3x3_dilation_d(x)``.

    Each branch maps ``in_channels`` to ``num_classes`` (with bias), weights initialised
    N(0, 0.01) and biases 0 as in DeepLab v2.
    """

    def __init__(
        self, in_channels: int, num_classes: int, dilations: Sequence[int] = (6, 12, 18, 24)
    ) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, 3, padding=d, dilation=d) for d in dilations
        )
        for conv in self.branches:
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        out = self.branches[0](x)
        for conv in self.branches[1:]:
            out = out + conv(x)
        return out


class Segmenter(nn.Module):
    """Dilated backbone + :class:`ASPP`.

    Args:
        backbone: a timm model name that supports ``features_only`` and ``output_stride``
            (``"resnet101"`` as in DeepLab v2; ``"resnet18"`` for CPU tests).
        num_classes: output classes, background included (K + 1).
        output_stride: 8 (DeepLab v2) or 16 (cheaper); the logits are at this stride.

    Attributes ``backbone`` (the timm feature extractor, last stage only) and ``head``.
    Parameters are split for the optimiser by :meth:`param_groups_split`.
    """

    def __init__(self, backbone: str = "resnet101", num_classes: int = 21, output_stride: int = 8):
        super().__init__()
        if output_stride not in (8, 16):
            raise ValueError(f"output_stride must be 8 or 16, got {output_stride}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (background + a class), got {num_classes}")
        self.backbone = timm.create_model(
            backbone,
            pretrained=False,
            features_only=True,
            output_stride=output_stride,
            out_indices=(-1,),
        )
        self.backbone_name = backbone
        self.num_classes = num_classes
        self.output_stride = output_stride
        self.head = ASPP(self.backbone.feature_info.channels()[-1], num_classes)

    def load_backbone(self, state_dict: Mapping[str, Tensor]) -> None:
        """Load ImageNet weights of the plain timm backbone: exactly the keys and shapes of
        ``timm.create_model(backbone).state_dict()``, whose classifier head is then dropped.
        Raises ValueError naming the keys that are missing, unexpected or of another shape."""
        with torch.device("meta"):  # the plain model's layout, without its memory
            plain = timm.create_model(self.backbone_name, pretrained=False).state_dict()
        problem = mismatch(plain, state_dict)
        if problem:
            raise ValueError(f"not {self.backbone_name} weights: {problem}")
        own = self.backbone.state_dict()
        renamed = sorted(set(own) - set(plain))
        if renamed:
            raise ValueError(
                f"{self.backbone_name} with features_only names its weights apart from the "
                f"plain model's (e.g. {renamed[0]!r}): ImageNet weights cannot be mapped onto it"
            )
        self.backbone.load_state_dict({k: state_dict[k] for k in own})

    def param_groups_split(self) -> dict[str, list[nn.Parameter]]:
        """``{"backbone": [...], "head": [...]}``; every parameter in exactly one list."""
        return {"backbone": list(self.backbone.parameters()), "head": list(self.head.parameters())}

    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) normalised images -> (B, num_classes, ceil(H/os), ceil(W/os)) logits."""
        return self.head(self.backbone(x)[-1])

    def predict(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, H, W) int64 labels: logits upsampled bilinearly
        (``align_corners=False``) to the input size in fp32 (also under autocast, as the
        exported graph does), then argmax."""
        logits = self(x).float()
        logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return logits.argmax(1)

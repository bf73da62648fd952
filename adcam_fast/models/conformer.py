"""Conformer backbone (Peng et al., "Conformer: Local Features Coupling Global Representations
for Visual Recognition", ICCV 2021), with the extraction AD-CAM needs.

The module tree, parameter names and shapes follow the official implementation exactly, so an
official ImageNet checkpoint loads with ``strict=True``.  On top of the official model this
implementation adds:

* ``drop_last_block``: build the network without its last conv-transformer block
  (``conv_trans_{depth}``), as AD-CAM trains it: the CNN feature map then stays at stride 16,
  the same grid as the patch tokens.
* ``detach_branches``: the paper's stop-gradient between the two branches. Features still
  cross both ways in the forward pass, but no gradient crosses.
* :meth:`Conformer.extract`: the CNN class maps ``F`` (paper Eq. 2 before ReLU) and the
  head- and block-averaged patch-to-patch attention matrix ``A``.
* :meth:`Conformer.branch_parameters`: the CNN / ViT split of the parameters used for the
  per-branch optimiser groups.

The variants are registered with timm (``conformer_{nano,tiny,small,base}_patch16``), so
``timm.create_model("conformer_small_patch16", num_classes=20)`` works once this module has
been imported.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, Mlp, trunc_normal_, use_fused_attn
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import Tensor, nn

from adcam_fast.models.weights import mismatch

__all__ = [
    "Conformer",
    "checkpoint_filter_fn",
    "conformer_base_patch16",
    "conformer_nano_patch16",
    "conformer_small_patch16",
    "conformer_tiny_patch16",
    "parameter_branch",
]

#: Width of the ResNet-style stem (fixed in the official model, whatever ``base_channel`` is).
STEM_CHANNELS = 64

_HEAD_PREFIXES = ("conv_cls_head.", "trans_cls_head.")
_VIT_PREFIXES = ("cls_token", "trans_patch_conv.", "trans_1.", "trans_norm.", "trans_cls_head.")
_VIT_COUPLED = ("trans_block", "squeeze_block")

_BatchNorm = partial(nn.BatchNorm2d, eps=1e-6)
_LayerNorm = partial(nn.LayerNorm, eps=1e-6)


class Attention(nn.Module):
    """Multi-head self-attention over ``(B, L, dim)`` tokens.

    The logits are scaled by ``qk_scale or head_dim ** -0.5`` (official semantics: a falsy
    ``qk_scale`` selects the default). Without ``return_attn`` the fused
    :func:`torch.nn.functional.scaled_dot_product_attention` kernel is used (unless timm's
    fused-attention switch is off); with it, an explicit softmax path runs and the post-softmax
    attention averaged over heads is returned as ``(B, L, L)`` float32.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale or self.head_dim**-0.5
        self.fused_attn = use_fused_attn()

        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor, return_attn: bool = False) -> tuple[Tensor, Tensor | None]:
        """Return ``(output (B, L, dim), head-averaged attention (B, L, L) float32 or None)``."""
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)

        attn_mean: Tensor | None = None
        if self.fused_attn and not return_attn:
            x = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0, scale=self.scale
            )
        else:
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
            if return_attn:
                attn_mean = torch.mean(attn, dim=1, dtype=torch.float32)
            x = self.attn_drop(attn) @ v

        x = self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, c)))
        return x, attn_mean


class Block(nn.Module):
    """Pre-norm transformer block (attention + MLP, LayerNorm eps 1e-6, optional DropPath)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        qk_scale: float | None = None,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = _LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias, qk_scale, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = _LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)

    def forward(self, x: Tensor, return_attn: bool = False) -> tuple[Tensor, Tensor | None]:
        """Return ``(tokens (B, L, dim), attention (B, L, L) float32 or None)``."""
        y, attn = self.attn(self.norm1(x), return_attn)
        x = x + self.drop_path(y)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x, attn


class ConvBlock(nn.Module):
    """ResNet bottleneck (1x1 -> 3x3 -> 1x1, expansion 4, BatchNorm eps 1e-6).

    ``forward(x, x_t)`` adds the optional coupled feature ``x_t`` to the input of the 3x3 conv and
    returns ``(output, x2)`` where ``x2`` is the activated 3x3 output (the feature the block
    hands to the transformer branch). With ``res_conv`` the shortcut is a strided 1x1 conv + BN.
    """

    def __init__(
        self,
        inplanes: int,
        outplanes: int,
        stride: int = 1,
        res_conv: bool = False,
        groups: int = 1,
    ) -> None:
        super().__init__()
        med_planes = outplanes // 4
        self.conv1 = nn.Conv2d(inplanes, med_planes, kernel_size=1, bias=False)
        self.bn1 = _BatchNorm(med_planes)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(
            med_planes, med_planes, 3, stride=stride, padding=1, groups=groups, bias=False
        )
        self.bn2 = _BatchNorm(med_planes)
        self.act2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(med_planes, outplanes, kernel_size=1, bias=False)
        self.bn3 = _BatchNorm(outplanes)
        self.act3 = nn.ReLU(inplace=True)
        self.res_conv = res_conv
        if res_conv:
            self.residual_conv = nn.Conv2d(inplanes, outplanes, 1, stride=stride, bias=False)
            self.residual_bn = _BatchNorm(outplanes)

    def forward(self, x: Tensor, x_t: Tensor | None = None) -> tuple[Tensor, Tensor]:
        shortcut = self.residual_bn(self.residual_conv(x)) if self.res_conv else x
        y = self.act1(self.bn1(self.conv1(x)))
        if x_t is not None:
            y = y + x_t
        x2 = self.act2(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(x2))
        return self.act3(y + shortcut), x2


class MedConvBlock(nn.Module):
    """Bottleneck with identity shortcut and unchanged width (official ``Med_ConvBlock``)."""

    def __init__(self, inplanes: int, groups: int = 1) -> None:
        super().__init__()
        med_planes = inplanes // 4
        self.conv1 = nn.Conv2d(inplanes, med_planes, kernel_size=1, bias=False)
        self.bn1 = _BatchNorm(med_planes)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(med_planes, med_planes, 3, padding=1, groups=groups, bias=False)
        self.bn2 = _BatchNorm(med_planes)
        self.act2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(med_planes, inplanes, kernel_size=1, bias=False)
        self.bn3 = _BatchNorm(inplanes)
        self.act3 = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        y = self.act1(self.bn1(self.conv1(x)))
        y = self.act2(self.bn2(self.conv2(y)))
        return self.act3(self.bn3(self.conv3(y)) + x)


class FCUDown(nn.Module):
    """Feature coupling CNN -> tokens: 1x1 conv, ``dw_stride`` average pooling, LayerNorm, GELU.

    ``forward(x, x_t)`` maps ``x`` (B, C, H, W) to (B, 1 + H*W/dw_stride^2, embed_dim) tokens in
    row-major order and prepends the class token taken from ``x_t``.
    """

    def __init__(self, inplanes: int, outplanes: int, dw_stride: int) -> None:
        super().__init__()
        self.conv_project = nn.Conv2d(inplanes, outplanes, kernel_size=1)
        self.sample_pooling = nn.AvgPool2d(kernel_size=dw_stride, stride=dw_stride)
        self.ln = _LayerNorm(outplanes)
        self.act = nn.GELU()

    def forward(self, x: Tensor, x_t: Tensor) -> Tensor:
        x = self.sample_pooling(self.conv_project(x)).flatten(2).transpose(1, 2)
        x = self.act(self.ln(x))
        return torch.cat([x_t[:, :1], x], dim=1)


class FCUUp(nn.Module):
    """Feature coupling tokens -> CNN: 1x1 conv, BatchNorm (eps 1e-6), ReLU, nearest upsampling.

    ``forward(x_t, h, w)`` drops the class token, lays the patch tokens out on an ``h x w`` grid
    and returns (B, outplanes, h*up_stride, w*up_stride).
    """

    def __init__(self, inplanes: int, outplanes: int, up_stride: int) -> None:
        super().__init__()
        self.up_stride = up_stride
        self.conv_project = nn.Conv2d(inplanes, outplanes, kernel_size=1)
        self.bn = _BatchNorm(outplanes)
        self.act = nn.ReLU()

    def forward(self, x_t: Tensor, h: int, w: int) -> Tensor:
        b, _, c = x_t.shape
        x = x_t[:, 1:].transpose(1, 2).reshape(b, c, h, w)
        x = self.act(self.bn(self.conv_project(x)))
        return F.interpolate(x, size=(h * self.up_stride, w * self.up_stride))


class ConvTransBlock(nn.Module):
    """One CNN stage step coupled with one transformer block (official ``ConvTransBlock``).

    CNN: ``cnn_block`` -> optional ``med_block`` list -> ``fusion_block`` (which receives the
    tokens mapped back by ``expand_block``). ViT: tokens + ``squeeze_block(x2)`` ->
    ``trans_block``. ``last_fusion`` makes ``fusion_block`` a stride-2 block with a projection
    shortcut (only the network's final block). When ``detach_branches`` is set, the inputs of
    ``squeeze_block`` and ``expand_block`` are detached, so no gradient crosses the branches.
    """

    def __init__(
        self,
        inplanes: int,
        outplanes: int,
        res_conv: bool,
        stride: int,
        dw_stride: int,
        embed_dim: int,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        qk_scale: float | None = None,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        last_fusion: bool = False,
        num_med_block: int = 0,
        groups: int = 1,
        detach_branches: bool = False,
    ) -> None:
        super().__init__()
        self.dw_stride = dw_stride
        self.detach_branches = detach_branches
        self.cnn_block = ConvBlock(inplanes, outplanes, stride, res_conv, groups)
        if last_fusion:
            self.fusion_block = ConvBlock(outplanes, outplanes, 2, True, groups)
        else:
            self.fusion_block = ConvBlock(outplanes, outplanes, 1, False, groups)
        self.med_block = (
            nn.ModuleList([MedConvBlock(outplanes, groups) for _ in range(num_med_block)])
            if num_med_block > 0
            else None
        )
        self.squeeze_block = FCUDown(outplanes // 4, embed_dim, dw_stride)
        self.expand_block = FCUUp(embed_dim, outplanes // 4, dw_stride)
        self.trans_block = Block(
            embed_dim,
            num_heads,
            mlp_ratio,
            qkv_bias,
            qk_scale,
            drop_rate,
            attn_drop_rate,
            drop_path_rate,
        )

    def forward(
        self, x: Tensor, x_t: Tensor, return_attn: bool = False
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Return ``(CNN map, tokens, head-averaged attention (B, L, L) float32 or None)``."""
        x, x2 = self.cnn_block(x)
        h, w = x2.shape[-2:]
        x_st = self.squeeze_block(x2.detach() if self.detach_branches else x2, x_t)
        x_t, attn = self.trans_block(x_st + x_t, return_attn)
        if self.med_block is not None:
            for blk in self.med_block:
                x = blk(x)
        x_t_r = self.expand_block(
            x_t.detach() if self.detach_branches else x_t, h // self.dw_stride, w // self.dw_stride
        )
        x, _ = self.fusion_block(x, x_t_r)
        return x, x_t, attn


def parameter_branch(name: str) -> str:
    """Branch (``"vit"`` or ``"cnn"``) of a :class:`Conformer` parameter, by its name.

    ViT branch: ``cls_token``, ``trans_patch_conv``, ``trans_1``, every ``trans_block`` and
    ``squeeze_block`` (the CNN->token coupling feeds the ViT), ``trans_norm``,
    ``trans_cls_head``. CNN branch: everything else (stem, ``conv_1``, ``cnn_block``,
    ``med_block``, ``fusion_block``, ``expand_block`` (the token->CNN coupling feeds the CNN),
    ``conv_cls_head``). A DDP ``module.`` prefix is ignored.
    """
    name = name.removeprefix("module.")
    if name.startswith(_VIT_PREFIXES):
        return "vit"
    parts = name.split(".")
    if parts[0].startswith("conv_trans_") and len(parts) > 1 and parts[1] in _VIT_COUPLED:
        return "vit"
    return "cnn"


class Conformer(nn.Module):
    """Conformer: a ResNet-like CNN branch and a ViT branch coupled by FCU modules.

    Layout (official): stem ``conv1/bn1/act1/maxpool`` (64 channels, stride 4), ``conv_1``
    (stride 4 CNN block), ``trans_patch_conv`` (patch embedding from the stem, stride
    ``patch_size``) and ``trans_1``, then ``conv_trans_2`` ... ``conv_trans_{depth}`` in three
    stages of ``depth // 3`` blocks whose CNN maps are at stride 4, 8, 16 (``patch_size`` 16);
    ``conv_trans_{depth}`` downsamples the CNN map once more (stride 32). Heads:
    ``conv_cls_head`` on the globally pooled CNN map, ``trans_cls_head`` on the normalised class
    token.

    Args beyond the official ones:
        drop_last_block: do not build ``conv_trans_{depth}``: ``depth - 1`` transformer blocks,
            CNN map at stride 16 (the token grid when ``patch_size`` is 16). ``conv_cls_head``
            keeps its input width ``4 * base_channel * channel_ratio`` (``256 *
            channel_ratio`` at the official ``base_channel`` of 64).
        detach_branches: stop-gradient between the branches. The stem output fed to
            ``trans_patch_conv`` and the inputs of every ``squeeze_block`` / ``expand_block`` are
            detached; the forward values are unchanged. See :func:`parameter_branch`.

    With ``num_classes=0`` both heads are ``nn.Identity`` (officially only ``trans_cls_head``).
    Inputs are ``(B, in_chans, H, W)`` with ``H`` and ``W`` multiples of ``patch_size``.
    """

    def __init__(
        self,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        base_channel: int = 64,
        channel_ratio: float = 4,
        num_med_block: int = 0,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        qk_scale: float | None = None,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        drop_last_block: bool = False,
        detach_branches: bool = False,
    ) -> None:
        super().__init__()
        if depth % 3 != 0 or depth < 3:
            raise ValueError(f"depth must be a positive multiple of 3, got {depth}")
        if patch_size % 16 != 0:
            raise ValueError(f"patch_size must be a multiple of 16, got {patch_size}")
        if drop_last_block and depth < 6:
            raise ValueError("drop_last_block needs depth >= 6 (the dropped block ends stage 3)")
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.num_features = self.embed_dim = embed_dim
        self.depth = depth
        self.drop_last_block = drop_last_block
        self.detach_branches = detach_branches
        stage_channels = [int(base_channel * channel_ratio * m) for m in (1, 2, 4)]
        self.num_cnn_features = stage_channels[2]

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        dpr = [v.item() for v in torch.linspace(0, drop_path_rate, depth)]

        self.trans_norm = nn.LayerNorm(embed_dim)
        self.trans_cls_head = (
            nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        )
        self.pooling = nn.AdaptiveAvgPool2d(1)
        self.conv_cls_head = (
            nn.Linear(self.num_cnn_features, num_classes) if num_classes > 0 else nn.Identity()
        )

        self.conv1 = nn.Conv2d(in_chans, STEM_CHANNELS, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(STEM_CHANNELS)
        self.act1 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        dw_stride = patch_size // 4
        self.conv_1 = ConvBlock(STEM_CHANNELS, stage_channels[0], stride=1, res_conv=True)
        self.trans_patch_conv = nn.Conv2d(STEM_CHANNELS, embed_dim, dw_stride, stride=dw_stride)
        self.trans_1 = Block(
            embed_dim, num_heads, mlp_ratio, qkv_bias, qk_scale, drop_rate, attn_drop_rate, dpr[0]
        )

        per_stage = depth // 3
        last = depth - 1 if drop_last_block else depth
        self._block_names: list[str] = []
        for i in range(2, last + 1):
            stage = (i - 1) // per_stage  # trans_1 and conv_trans_i count as blocks 1 and i
            first = i == stage * per_stage + 1 and stage > 0
            in_ch = stage_channels[stage - 1] if first else stage_channels[stage]
            name = f"conv_trans_{i}"
            self.add_module(
                name,
                ConvTransBlock(
                    in_ch,
                    stage_channels[stage],
                    res_conv=first,
                    stride=2 if first else 1,
                    dw_stride=dw_stride // (2**stage),
                    embed_dim=embed_dim,
                    num_heads=num_heads,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    qk_scale=qk_scale,
                    drop_rate=drop_rate,
                    attn_drop_rate=attn_drop_rate,
                    drop_path_rate=dpr[i - 1],
                    last_fusion=i == depth,
                    num_med_block=num_med_block,
                    detach_branches=detach_branches,
                ),
            )
            self._block_names.append(name)
        #: Number of transformer blocks (``trans_1`` plus one per conv-transformer block).
        self.num_attn_blocks = 1 + len(self._block_names)

        trunc_normal_(self.cls_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"cls_token"}

    def branch_parameters(self) -> dict[str, list[nn.Parameter]]:
        """Split the parameters into ``{"cnn": [...], "vit": [...]}`` (see
        :func:`parameter_branch`); every parameter appears in exactly one list."""
        groups: dict[str, list[nn.Parameter]] = {"cnn": [], "vit": []}
        for name, p in self.named_parameters():
            groups[parameter_branch(name)].append(p)
        return groups

    def reset_classifier(self, num_classes: int) -> None:
        """Replace both heads by freshly initialised ones for ``num_classes`` (0 = identity)."""
        self.num_classes = num_classes
        self.trans_cls_head = (
            nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        )
        self.conv_cls_head = (
            nn.Linear(self.num_cnn_features, num_classes) if num_classes > 0 else nn.Identity()
        )
        self.trans_cls_head.apply(self._init_weights)
        self.conv_cls_head.apply(self._init_weights)

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or x.ndim != 4:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must be a 4-D (B, C, H, W) tensor, got {shape}")
        if x.shape[1] != self.in_chans:
            raise ValueError(f"x must have {self.in_chans} channels, got shape {tuple(x.shape)}")
        if x.shape[2] % self.patch_size or x.shape[3] % self.patch_size:
            raise ValueError(
                f"x height and width must be multiples of patch_size={self.patch_size}, "
                f"got shape {tuple(x.shape)}"
            )

    def _forward_trunk(
        self, x: Tensor, attn_from: int | None = None
    ) -> tuple[Tensor, Tensor, Tensor | None, tuple[int, int]]:
        """Run both branches.

        Returns ``(CNN map, tokens before trans_norm, attention sum, token grid (h, w))``; the
        attention sum is the float32 sum of the head-averaged attention (B, 1+N, 1+N) of the
        transformer blocks with index >= ``attn_from`` (0 = ``trans_1``), or None.
        """
        x_base = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        x_cnn, _ = self.conv_1(x_base)
        x_t = self.trans_patch_conv(x_base.detach() if self.detach_branches else x_base)
        grid = (int(x_t.shape[-2]), int(x_t.shape[-1]))
        x_t = torch.cat(
            [self.cls_token.expand(x.shape[0], -1, -1), x_t.flatten(2).transpose(1, 2)], 1
        )

        want = attn_from is not None and attn_from <= 0
        x_t, attn_sum = self.trans_1(x_t, want)
        for idx, name in enumerate(self._block_names, start=1):
            want = attn_from is not None and idx >= attn_from
            x_cnn, x_t, attn = getattr(self, name)(x_cnn, x_t, want)
            if attn is not None:
                attn_sum = attn if attn_sum is None else attn_sum.add_(attn)
        return x_cnn, x_t, attn_sum, grid

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(final CNN map (B, C, h, w), normalised tokens (B, 1 + N, embed_dim))``."""
        x_cnn, x_t, _, _ = self._forward_trunk(x)
        return x_cnn, self.trans_norm(x_t)

    def forward_head(
        self, features: tuple[Tensor, Tensor], pre_logits: bool = False
    ) -> tuple[Tensor, Tensor]:
        """Map :meth:`forward_features` output to ``(conv_logits, trans_logits)``, each (B, K)
        (or the pooled CNN vector and the class token when ``pre_logits``)."""
        x_cnn, x_t = features
        pooled, cls = self.pooling(x_cnn).flatten(1), x_t[:, 0]
        if pre_logits:
            return pooled, cls
        return self.conv_cls_head(pooled), self.trans_cls_head(cls)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Training/classification forward: ``(conv_logits, trans_logits)``, each (B, K)."""
        return self.forward_head(self.forward_features(x))

    def extract(
        self, x: Tensor, attn_blocks: int | None = None, return_logits: bool = False
    ) -> tuple[Tensor, ...]:
        """Class maps and attention for AD-CAM (and the CNN head's logits).

        Args:
            x: images (B, in_chans, H, W), H and W multiples of ``patch_size``.
            attn_blocks: average the attention of the last ``attn_blocks`` transformer blocks
                (1 ..= :attr:`num_attn_blocks`); None = all of them.
            return_logits: also return the CNN head's logits (below).

        Returns:
            ``F``: (B, K, h, w) float32, the CNN head weights applied as a bias-free 1x1 conv to
            the final CNN map, for all K classes (paper Eq. 2 before ReLU and normalisation).
            ``(h, w)`` is the token grid ``(H / patch_size, W / patch_size)``. With
            ``drop_last_block`` (and patch 16) the CNN map already is on that grid; otherwise
            (e.g. the full official network, whose CNN map is at stride 32) ``F`` is resized
            to it bilinearly (``align_corners=False``).
            ``A``: (B, N, N) float32 with N = h*w patch tokens in row-major order: post-softmax
            attention averaged over heads and over the used blocks (accumulated block by block
            in float32), class-token row and column dropped, each row renormalised to sum 1.
            With ``return_logits``, also the CNN head's (B, K) float32 logits, as
            :meth:`forward` gives them: the mean of ``F`` before any resize, plus the bias.

        Run under ``torch.inference_mode()`` with the model in eval mode for labelling.
        """
        self._check_input(x)
        if self.num_classes <= 0:
            raise RuntimeError("extract needs classifier heads (num_classes > 0)")
        n_blocks = self.num_attn_blocks
        if attn_blocks is None:
            attn_blocks = n_blocks
        if isinstance(attn_blocks, bool) or not isinstance(attn_blocks, int):
            raise ValueError(f"attn_blocks must be an int or None, got {attn_blocks!r}")
        if not 1 <= attn_blocks <= n_blocks:
            raise ValueError(f"attn_blocks must be in [1, {n_blocks}], got {attn_blocks}")

        x_cnn, _, attn_sum, grid = self._forward_trunk(x, attn_from=n_blocks - attn_blocks)
        assert attn_sum is not None

        weight = self.conv_cls_head.weight
        cams = F.conv2d(x_cnn, weight[:, :, None, None].to(x_cnn.dtype)).float()
        if tuple(cams.shape[-2:]) != grid:
            cams = F.interpolate(cams, size=grid, mode="bilinear", align_corners=False)

        # The mean over blocks is implied: dividing by the block count cancels in the row norm.
        attn = attn_sum[:, 1:, 1:]
        attn = attn / attn.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(attn.dtype).tiny)
        if return_logits:
            return cams, attn, self.conv_cls_head(self.pooling(x_cnn).flatten(1)).float()
        return cams, attn


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: Conformer) -> dict[str, Tensor]:
    """Adapt an official-layout Conformer checkpoint to ``model``.

    * unwraps a ``"model"`` or ``"state_dict"`` entry and strips a DDP ``module.`` prefix;
    * drops ``conv_cls_head.*`` / ``trans_cls_head.*`` entries whose shapes differ from the
      model's (other class count), so the rest loads and the heads keep their fresh init;
    * drops ``conv_trans_{depth}.*`` when the model was built with ``drop_last_block``;
    * fills missing BatchNorm ``num_batches_tracked`` counters from the model.

    Raises ValueError when any other key is missing, unexpected or of another shape, so that
    a non-strict timm load (used when class counts differ) never silently skips backbone
    weights.
    """
    sd: Mapping[str, Any] = state_dict
    while True:
        inner = next(
            (sd[k] for k in ("state_dict", "model") if isinstance(sd.get(k), Mapping)), None
        )
        if inner is None:
            break
        sd = inner
    own = model.state_dict()
    dropped_block = f"conv_trans_{model.depth}." if model.drop_last_block else None
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        key = key.removeprefix("module.")
        if key.startswith(_HEAD_PREFIXES) and (
            key not in own or tuple(own[key].shape) != tuple(value.shape)
        ):
            continue
        if dropped_block is not None and key.startswith(dropped_block):
            continue
        out[key] = value
    for key in own:
        if key.endswith("num_batches_tracked") and key not in out:
            out[key] = own[key].clone()
    problem = mismatch(own, out, optional=_HEAD_PREFIXES)
    if problem:
        raise ValueError(f"state_dict does not match {type(model).__name__}: {problem}")
    return out


def _create_conformer(variant: str, pretrained: bool = False, **kwargs: Any) -> Conformer:
    if kwargs.get("features_only"):
        raise RuntimeError("features_only is not supported for Conformer")
    return build_model_with_cfg(
        Conformer, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs
    )


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "conv1",
        "classifier": ("conv_cls_head", "trans_cls_head"),
        **kwargs,
    }


# Must exist before the @register_model decorators run: timm reads it from this module.
default_cfgs = generate_default_cfgs(
    {
        "conformer_nano_patch16": _cfg(),
        "conformer_tiny_patch16": _cfg(),
        "conformer_small_patch16": _cfg(),
        "conformer_base_patch16": _cfg(),
    }
)


@register_model
def conformer_nano_patch16(pretrained: bool = False, **kwargs: Any) -> Conformer:
    """A very small Conformer for CPU tests and demos (not an official variant)."""
    args: dict[str, Any] = dict(
        patch_size=16,
        base_channel=16,
        channel_ratio=1,
        embed_dim=64,
        depth=6,
        num_heads=2,
        mlp_ratio=4,
        qkv_bias=True,
    )
    return _create_conformer("conformer_nano_patch16", pretrained, **dict(args, **kwargs))


@register_model
def conformer_tiny_patch16(pretrained: bool = False, **kwargs: Any) -> Conformer:
    """Conformer-Ti (channel ratio 1, embed 384, 6 heads)."""
    args: dict[str, Any] = dict(
        patch_size=16,
        channel_ratio=1,
        embed_dim=384,
        depth=12,
        num_heads=6,
        mlp_ratio=4,
        qkv_bias=True,
    )
    return _create_conformer("conformer_tiny_patch16", pretrained, **dict(args, **kwargs))


@register_model
def conformer_small_patch16(pretrained: bool = False, **kwargs: Any) -> Conformer:
    """Conformer-S (channel ratio 4, embed 384, 6 heads): the AD-CAM backbone."""
    args: dict[str, Any] = dict(
        patch_size=16,
        channel_ratio=4,
        embed_dim=384,
        depth=12,
        num_heads=6,
        mlp_ratio=4,
        qkv_bias=True,
    )
    return _create_conformer("conformer_small_patch16", pretrained, **dict(args, **kwargs))


@register_model
def conformer_base_patch16(pretrained: bool = False, **kwargs: Any) -> Conformer:
    """Conformer-B (channel ratio 6, embed 576, 9 heads)."""
    args: dict[str, Any] = dict(
        patch_size=16,
        channel_ratio=6,
        embed_dim=576,
        depth=12,
        num_heads=9,
        mlp_ratio=4,
        qkv_bias=True,
    )
    return _create_conformer("conformer_base_patch16", pretrained, **dict(args, **kwargs))

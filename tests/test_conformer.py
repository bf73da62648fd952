"""Conformer backbone: official layout, extraction contract, stop-gradient, checkpoint loading.

Everything runs on CPU. The Conformer-S model is only built (never run forward); behaviour is
checked on the small ``conformer_nano_patch16`` with 64x64-ish images.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import adcam_fast.models  # noqa: F401  (registers the timm variants)
from adcam_fast.models.conformer import Attention, Conformer, checkpoint_filter_fn

KEYS_JSON = Path(__file__).parent / "data" / "conformer_small_patch16_keys.json"
# Measured by running the official implementation (Conformer_small_patch16, 1000 classes).
CONFORMER_S_PARAMS = 37_673_424


def _official_shapes() -> dict[str, list[int]]:
    return json.loads(KEYS_JSON.read_text())


def _shapes(model: nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def _nano(**kwargs) -> Conformer:
    torch.manual_seed(0)
    return timm.create_model("conformer_nano_patch16", num_classes=5, **kwargs)


def _set_fused(model: nn.Module, fused: bool) -> None:
    for m in model.modules():
        if isinstance(m, Attention):
            m.fused_attn = fused


def _final_cnn_map(model: Conformer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """Run extract and capture the final CNN feature map with a forward hook."""
    last = model.depth - 1 if model.drop_last_block else model.depth
    seen: list[torch.Tensor] = []
    handle = getattr(model, f"conv_trans_{last}").register_forward_hook(
        lambda _m, _i, out: seen.append(out[0].detach().clone())
    )
    try:
        cams, attn = model.extract(x)
    finally:
        handle.remove()
    assert len(seen) == 1
    return cams, attn, seen[0]


# --------------------------------------------------------------------------- official layout


@pytest.fixture(scope="module")
def official_checkpoint(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """Random tensors in the official Conformer-S layout, wrapped like the released files."""
    gen = torch.Generator().manual_seed(1)
    sd = {
        k: torch.randint(0, 100, shape, generator=gen)
        if k.endswith("num_batches_tracked")
        else torch.randn(shape, generator=gen)
        for k, shape in _official_shapes().items()
    }
    path = tmp_path_factory.mktemp("ckpt") / "conformer_small_official.pth"
    torch.save({"model": sd}, path)
    return path, sd


def test_small_matches_official_keys_shapes_and_param_count():
    model = timm.create_model("conformer_small_patch16")
    assert _shapes(model) == _official_shapes()
    assert list(model.state_dict()) == list(_official_shapes())  # same registration order
    assert sum(p.numel() for p in model.parameters()) == CONFORMER_S_PARAMS  # ~37.7M


def test_pretrained_file_loads_strict(official_checkpoint):
    path, sd = official_checkpoint
    model = timm.create_model(
        "conformer_small_patch16", pretrained=True, pretrained_cfg_overlay=dict(file=str(path))
    )
    own = model.state_dict()
    assert all(torch.equal(own[k], sd[k]) for k in sd)
    # a plain strict load of the unwrapped official dict works too
    model.load_state_dict(sd, strict=True)


def test_checkpoint_path_loads_wrapped_official_checkpoint(official_checkpoint):
    path, sd = official_checkpoint
    model = timm.create_model("conformer_small_patch16", checkpoint_path=str(path))
    own = model.state_dict()
    assert all(torch.equal(own[k], sd[k]) for k in sd)


def test_other_class_count_drops_heads_and_loads_rest(official_checkpoint):
    path, sd = official_checkpoint
    torch.manual_seed(0)
    model = timm.create_model(
        "conformer_small_patch16",
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(path)),
        num_classes=20,
    )
    own = model.state_dict()
    assert own["conv_cls_head.weight"].shape == (20, 1024)
    assert own["trans_cls_head.weight"].shape == (20, 384)
    filtered = checkpoint_filter_fn({"model": sd}, model)
    assert not any(k.startswith(("conv_cls_head.", "trans_cls_head.")) for k in filtered)
    assert len(filtered) == len(sd) - 4
    assert all(torch.equal(own[k], sd[k]) for k in filtered)


def test_drop_last_block_small_layout_and_pretrained_load(official_checkpoint):
    path, sd = official_checkpoint
    model = timm.create_model(
        "conformer_small_patch16",
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(path)),
        num_classes=20,
        drop_last_block=True,
    )
    keys = model.state_dict().keys()
    assert not any(k.startswith("conv_trans_12.") for k in keys)
    assert any(k.startswith("conv_trans_11.") for k in keys)
    assert sum(isinstance(m, Attention) for m in model.modules()) == 11
    assert model.num_attn_blocks == 11
    assert model.conv_cls_head.in_features == 1024
    expected = {
        k for k in sd if not k.startswith(("conv_trans_12.", "conv_cls_head.", "trans_cls_head."))
    }
    assert set(keys) - {k for k in keys if "cls_head" in k} == expected
    own = model.state_dict()
    assert all(torch.equal(own[k], sd[k]) for k in expected)


def test_filter_rejects_mismatched_backbone():
    model = _nano()
    sd = dict(model.state_dict())
    sd.pop("conv_trans_2.cnn_block.conv1.weight")
    sd["bogus.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="missing"):
        checkpoint_filter_fn(sd, model)


# --------------------------------------------------------------------------- extraction


@pytest.mark.parametrize("drop_last_block", [False, True])
def test_extract_contract(drop_last_block):
    model = _nano(drop_last_block=drop_last_block).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        cams, attn, fmap = _final_cnn_map(model, x)
        conv_logits, _ = model(x)
    h, w = 64 // 16, 96 // 16
    assert cams.shape == (2, 5, h, w) and cams.dtype == torch.float32
    assert attn.shape == (2, h * w, h * w) and attn.dtype == torch.float32
    assert (attn >= 0).all()
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, h * w), atol=1e-5, rtol=0)

    by_hand = torch.einsum("kc,bcyx->bkyx", model.conv_cls_head.weight, fmap)
    if drop_last_block:
        assert fmap.shape[-2:] == (h, w)  # CNN map at stride 16: no resize
        torch.testing.assert_close(cams, by_hand, atol=1e-4, rtol=1e-4)
        pooled = cams.mean(dim=(2, 3)) + model.conv_cls_head.bias
        torch.testing.assert_close(pooled, conv_logits, atol=1e-4, rtol=1e-4)
    else:
        assert fmap.shape[-2:] == (h // 2, w // 2)  # official last block: stride 32
        resized = F.interpolate(by_hand, size=(h, w), mode="bilinear", align_corners=False)
        torch.testing.assert_close(cams, resized, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("drop_last_block", [False, True])
def test_extract_logits_are_the_cnn_heads(drop_last_block):
    """``return_logits``: the CNN head's logits as `forward` gives them, also where the maps
    are resized from an odd grid (80 px: a stride-32 map of 3 rows to 5 token rows), whose
    mean is not the map's."""
    model = _nano(drop_last_block=drop_last_block).eval()
    x = torch.randn(2, 3, 80, 96)
    with torch.no_grad():
        cams, _, logits = model.extract(x, return_logits=True)
        conv_logits, _ = model(x)
    assert logits.shape == (2, 5) and logits.dtype == torch.float32
    torch.testing.assert_close(logits, conv_logits, atol=1e-5, rtol=1e-5)
    if not drop_last_block:
        resized_mean = cams.mean((2, 3)) + model.conv_cls_head.bias
        assert not torch.allclose(resized_mean, conv_logits, atol=1e-3)


def test_extract_attention_matches_manual_average_of_last_blocks():
    model = _nano(drop_last_block=True).eval()
    blocks = [model.trans_1] + [getattr(model, f"conv_trans_{i}").trans_block for i in (2, 3, 4, 5)]
    inputs: dict[int, torch.Tensor] = {}
    handles = [
        b.attn.register_forward_pre_hook(lambda _m, a, i=i: inputs.__setitem__(i, a[0]))
        for i, b in enumerate(blocks)
    ]
    x = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        _, attn = model.extract(x, attn_blocks=2)
        _, attn_all = model.extract(x)
    for handle in handles:
        handle.remove()

    def manual(block: nn.Module, t: torch.Tensor) -> torch.Tensor:
        a = block.attn
        qkv = F.linear(t, a.qkv.weight, a.qkv.bias).reshape(1, t.shape[1], 3, a.num_heads, -1)
        q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)
        return ((q @ k.transpose(-1, -2)) * a.head_dim**-0.5).softmax(-1).mean(1)

    mean = sum(manual(blocks[i], inputs[i]) for i in (3, 4)) / 2
    expected = mean[:, 1:, 1:] / mean[:, 1:, 1:].sum(-1, keepdim=True)
    torch.testing.assert_close(attn, expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(attn, attn_all, atol=1e-4)


def test_fused_and_explicit_attention_agree():
    model = _nano().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        _set_fused(model, True)
        fused = model(x)
        _set_fused(model, False)
        explicit = model(x)
    for a, b in zip(fused, explicit, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_extract_rejects_bad_input():
    model = _nano().eval()
    with pytest.raises(ValueError, match=r"\bx\b"):
        model.extract(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match=r"\bx\b"):
        model.extract(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match="patch_size"):
        model.extract(torch.randn(1, 3, 60, 64))
    with pytest.raises(ValueError, match="attn_blocks"):
        model.extract(torch.randn(1, 3, 64, 64), attn_blocks=0)
    with pytest.raises(ValueError, match="attn_blocks"):
        model.extract(torch.randn(1, 3, 64, 64), attn_blocks=model.num_attn_blocks + 1)


# --------------------------------------------------------------------------- stop-gradient


def _cross_grads(model: Conformer) -> dict[tuple[str, str], bool]:
    """For each (loss head, branch): does any parameter of the branch get a nonzero grad?"""
    model.train()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    result = {}
    for head_idx, head in enumerate(("conv", "trans")):
        model.zero_grad(set_to_none=True)
        model(x)[head_idx].square().mean().backward()
        for branch, params in model.branch_parameters().items():
            result[(head, branch)] = any(
                p.grad is not None and bool(p.grad.abs().sum() > 0) for p in params
            )
    return result


def test_detach_branches_blocks_cross_gradients():
    grads = _cross_grads(_nano(drop_last_block=True, detach_branches=True))
    assert grads == {
        ("conv", "cnn"): True,
        ("conv", "vit"): False,
        ("trans", "cnn"): False,
        ("trans", "vit"): True,
    }


def test_without_detach_gradients_cross():
    grads = _cross_grads(_nano(drop_last_block=True))
    assert grads[("conv", "vit")] and grads[("trans", "cnn")]


def test_detach_keeps_forward_values():
    plain = _nano(drop_last_block=True).eval()
    detached = _nano(drop_last_block=True, detach_branches=True).eval()
    detached.load_state_dict(plain.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(plain(x), detached(x), strict=True):
            torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_branch_parameters_partition():
    model = _nano()
    groups = model.branch_parameters()
    ids = {id(p) for p in model.parameters()}
    cnn, vit = {id(p) for p in groups["cnn"]}, {id(p) for p in groups["vit"]}
    assert cnn | vit == ids and not cnn & vit
    names = {id(p): n for n, p in model.named_parameters()}
    vit_names = {names[i] for i in vit}
    assert "cls_token" in vit_names and "trans_cls_head.weight" in vit_names
    assert "conv_trans_3.squeeze_block.conv_project.weight" in vit_names
    assert "conv_trans_3.expand_block.conv_project.weight" not in vit_names
    assert "conv1.weight" not in vit_names and "conv_cls_head.weight" not in vit_names

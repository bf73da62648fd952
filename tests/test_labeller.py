"""The labeller's maps and masks against a computation by hand: per scale and flip, the
image's classes' CAMs (Eq. 2), the method (AD-CAM by the float64 reference), flipped back,
resized to the grid, summed and normalised (Eq. 2); seeds thresholded at ``bg_threshold``."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from adcam_fast import reference
from adcam_fast.cam import normalize_cam
from adcam_fast.data import load_mask
from adcam_fast.export.backends import Extraction, InputRange
from adcam_fast.pipeline.label import (
    ImageMaps,
    LabelConfig,
    Labeller,
    collate,
    forward_batch,
    write_image,
)
from adcam_fast.pipeline.writers import Outputs

PATCH, SIDE = 8, 32
MIX = torch.tensor([[1.0, -0.5, 0.2], [-0.3, 1.0, -0.4], [0.5, 0.5, -1.0]])  # (K, RGB)


class PixelExtractor:
    """An extractor whose outputs are fixed functions of each patch's mean colour: CAMs a
    colour mix per class (some negative), attention a softmax of the patches' similarity."""

    class_names = ("a", "b", "c")
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    patch_size = PATCH
    device = torch.device("cpu")
    inputs = InputRange()

    def __call__(self, images: Tensor) -> Extraction:
        patches = F.avg_pool2d(images, PATCH)  # (B, 3, h, w)
        cams = torch.einsum("kc,bchw->bkhw", MIX, patches)
        tokens = patches.flatten(2).transpose(1, 2)
        attention = (4 * tokens @ tokens.transpose(1, 2)).softmax(-1)
        return Extraction(logits=cams.mean((-2, -1)), cams=cams, attention=attention)


def by_hand(ex: PixelExtractor, x: Tensor, classes: list[list[int]], cfg: LabelConfig) -> list:
    """Each image's merged maps (C, G, G), computed one image, scale and flip at a time."""
    mean = torch.tensor(ex.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(ex.std).view(1, 3, 1, 1) * 255
    x = (x.float() - mean) / std
    grid = cfg.input_size // 4
    merged = []
    for b, c in enumerate(classes):
        total = torch.zeros(len(c), grid, grid, dtype=torch.float64)
        for scale in cfg.scales:
            side = round(SIDE * scale)
            xs = x[b : b + 1]
            if side != SIDE:
                xs = F.interpolate(xs, (side, side), mode="bilinear", antialias=side < SIDE)
            for flip in (False, True):
                out = ex(xs.flip(-1) if flip else xs)
                h = w = side // PATCH
                cams = normalize_cam(out.cams[0, c].flatten(1).double(), spatial_dims=1)
                A = out.attention[0].double()
                maps = reference.adcam(A, cams, cfg.k, cfg.steps) if cfg.method == "adcam" else cams
                maps = maps.view(len(c), h, w)
                maps = maps.flip(-1) if flip else maps
                total += F.interpolate(maps[None], (grid, grid), mode="bilinear")[0]
        merged.append(normalize_cam(total))
    return merged


@pytest.mark.parametrize("method", ["adcam", "cam"])
def test_maps_match_the_method_by_hand(method):
    cfg = LabelConfig(
        method=method, scales=(0.5, 1.0), input_size=SIDE, k=3, steps=2, adcam_backend="torch"
    )
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (2, 3, SIDE, SIDE), dtype=torch.uint8, generator=gen)
    classes = [[0, 2], [1]]
    labels = [np.isin(np.arange(3), c).astype(np.float32) for c in classes]
    ex = PixelExtractor()
    maps, found = Labeller(ex, cfg)(x, labels)
    assert [f.tolist() for f in found] == classes
    assert maps[method].shape == (2, 2, SIDE // 4, SIDE // 4)
    for b, expected in enumerate(by_hand(ex, x, classes, cfg)):
        c = len(classes[b])
        torch.testing.assert_close(maps[method][b, :c].double(), expected, rtol=0, atol=2e-6)
        assert not maps[method][b, c:].any()  # padding past the image's classes


def test_the_methods_differ():
    """AD-CAM's diffusion moves the maps away from the plain CAM (else the test above would
    not tell the two apart)."""
    cfg = LabelConfig(scales=(1.0,), input_size=SIDE, k=3, steps=2, adcam_backend="torch")
    x = torch.randint(0, 256, (1, 3, SIDE, SIDE), generator=torch.Generator().manual_seed(1))
    labeller = Labeller(PixelExtractor(), cfg, methods=("cam", "adcam"))
    maps, _ = labeller(x.to(torch.uint8), [np.ones(3, np.float32)])
    assert (maps["cam"] - maps["adcam"]).abs().max() > 0.05


@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.7, 1.0])
def test_seeds_are_the_maps_above_the_background_threshold(tmp_path, threshold):
    """Each pixel takes the label (class index + 1) of its largest map when that map is above
    ``bg_threshold``, else 0; the maps are resized to the image's size first."""
    gen = torch.Generator().manual_seed(2)
    maps = torch.rand(3, 4, 4, generator=gen)
    item = ImageMaps("img", maps, np.array([0, 2]), (6, 10), None)
    outputs = Outputs(tmp_path, list(PixelExtractor.class_names))
    write_image(outputs, LabelConfig(bg_threshold=threshold), item)
    full = F.interpolate(maps[None, :2], (6, 10), mode="bilinear")[0]
    best, which = full.max(0)
    expected = np.where(best > threshold, np.array([1, 3])[which.numpy()], 0)
    np.testing.assert_array_equal(load_mask(tmp_path / "masks" / "img.png"), expected)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(batch_size=9), r"--batch-size 9 feeds batches of 2 to 18 images .* takes 2 to 16"),
        (dict(flip=False), r"batches of 1 to 8 images .* x\.engine takes 2 to 16"),
        (dict(input_size=64, scales=(1.0, 2.0)), r"sides \[64, 128\], but .* sides 16 to 96"),
        (dict(scales=(0.25,)), r"--input-size 32 at --scales 0.25 feeds image sides \[8\]"),
    ],
)
def test_inputs_the_extractor_does_not_take_stop_before_any_work(options, message):
    """As a TensorRT engine's profile: batches of 2 to 16 images (a last batch of one image
    and its flip, up to 8 and theirs), sides 16 to 96."""
    ex = PixelExtractor()
    ex.inputs = InputRange((2, 16), (16, 96), "the profile of x.engine")
    with pytest.raises(ValueError, match=message):
        Labeller(ex, LabelConfig(**{"input_size": SIDE, **options}))
    Labeller(ex, LabelConfig(batch_size=8, input_size=48, scales=(0.5, 2.0)))


def test_an_extractor_without_an_input_range_takes_any():
    """`inputs` came after the `Extractor` contract's first version: without it, no limit."""
    ex = PixelExtractor()
    fields = ("class_names", "mean", "std", "patch_size", "device")
    older = SimpleNamespace(**{name: getattr(ex, name) for name in fields})
    Labeller(older, LabelConfig(batch_size=64, input_size=SIDE, scales=(0.5, 4.0)))


class OneBadImage(PixelExtractor):
    """NaN attention for a flat image (every patch alike), as a broken model could give."""

    def __call__(self, images: Tensor) -> Extraction:
        out = super().__call__(images)
        flat = images.flatten(2).std(-1).amax(1) < 1e-4
        out.attention[flat] = float("nan")
        return out


def test_one_bad_image_fails_only_itself(caplog):
    """A batch whose forward raises is run again an image at a time: the bad image alone is
    reported (and an image that failed to decode once), the others get the maps they get in
    a batch without it, and a warning names the batch's error."""
    cfg = LabelConfig(scales=(1.0, 0.5), input_size=SIDE, k=3, steps=2, adcam_backend="torch")
    gen = torch.Generator().manual_seed(2)
    x = torch.randint(0, 256, (3, 3, SIDE, SIDE), dtype=torch.uint8, generator=gen)
    x[1] = 7
    items = [
        dict(id=str(b), x=x[b], labels=np.ones(3, np.float32), shape=(SIDE, SIDE), image=None)
        for b in range(3)
    ]
    labeller = Labeller(OneBadImage(), cfg)
    records, images = forward_batch(labeller, cfg, collate([*items, dict(id="d", error="E")]))
    assert [(r["id"], r["stage"]) for r in records] == [("d", "decode"), ("1", "forward")]
    assert "A must be finite" in records[1]["error"]
    assert "a batch of 3 images failed (ValueError: A must be finite" in caplog.text
    assert [m.id for m in images] == ["0", "2"]
    _, want = forward_batch(labeller, cfg, collate([items[0], items[2]]))
    for got, expected in zip(images, want, strict=True):
        torch.testing.assert_close(got.maps, expected.maps, rtol=1e-6, atol=1e-6)

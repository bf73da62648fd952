"""Dataset layer: robust decode, the VOC / COCO / folder / synthetic readers, spec parsing.

Every fixture is built here in tmp_path; nothing touches the network.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adcam_fast.data import (
    VOC_CLASSES,
    ImageDecodeError,
    Sample,
    SyntheticDataset,
    load_image,
    load_mask,
    make_synthetic,
    mask_to_image,
    open_dataset,
    render,
    voc_palette,
)
from adcam_fast.data.synthetic import CLASS_NAMES, add_make_synthetic_arguments, run_make_synthetic

RNG = np.random.default_rng(0)


def noise_image(h: int, w: int) -> np.ndarray:
    return RNG.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


# ---------------------------------------------------------------- robust decode


def test_palette_is_the_voc_colormap():
    p = voc_palette()
    assert len(p) == 768
    assert p[0:3] == [0, 0, 0] and p[3:6] == [128, 0, 0] and p[15 * 3 : 16 * 3] == [192, 128, 128]
    assert p[255 * 3 :] == [224, 224, 192]


def test_mask_png_round_trip(tmp_path):
    mask = np.array([[0, 1, 20], [255, 7, 0]], dtype=np.uint8)
    mask_to_image(mask).save(tmp_path / "m.png")
    with Image.open(tmp_path / "m.png") as im:
        assert im.mode == "P" and im.getpalette()[:6] == [0, 0, 0, 128, 0, 0]
    np.testing.assert_array_equal(load_mask(tmp_path / "m.png"), mask)
    Image.fromarray(noise_image(2, 3)).save(tmp_path / "rgb.png")
    with pytest.raises(ImageDecodeError, match=r"rgb\.png.*mode RGB"):
        load_mask(tmp_path / "rgb.png")


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("empty.jpg", b"", "empty file"),
        ("text.jpg", b"this is not an image\n" * 4, "not an image"),
    ],
    ids=["zero-byte", "text-named-jpg"],
)
def test_decode_refuses_non_images(tmp_path, name, content, reason):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ImageDecodeError, match=reason) as err:
        load_image(path)
    assert str(path) in str(err.value) and isinstance(err.value, ValueError)


def test_decode_refuses_missing_and_truncated(tmp_path):
    with pytest.raises(ImageDecodeError, match="no such file"):
        load_image(tmp_path / "missing.jpg")
    full = tmp_path / "full.jpg"
    Image.fromarray(noise_image(64, 64)).save(full, quality=90)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(ImageDecodeError, match=r"cut\.jpg.*truncated"):
        load_image(cut)


def test_decode_converts_modes(tmp_path):
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    Image.fromarray(gray).save(tmp_path / "gray.png")
    out = load_image(tmp_path / "gray.png")
    assert out.shape == (3, 4, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.repeat(gray[:, :, None], 3, axis=2))

    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=95)
    out = load_image(tmp_path / "cmyk.jpg")
    assert out.shape == (8, 8, 3)
    assert np.abs(out.astype(int) - [255, 0, 0]).max() <= 12  # CMYK red stays red

    deep = np.array([[0, 257 * 128, 65535]], dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as im:
        assert im.mode.startswith("I")
    np.testing.assert_array_equal(load_image(tmp_path / "deep.png")[0, :, 0], [0, 128, 255])

    for name, values, gray in (
        ("unit", [0.0, 0.5, 1.0], [0, 128, 255]),  # 0..1 (as scientific TIFFs hold)
        ("byte", [0.0, 2.0, 254.6], [0, 2, 255]),  # 0..255
    ):
        Image.fromarray(np.array([values], np.float32), mode="F").save(tmp_path / f"{name}.tif")
        np.testing.assert_array_equal(load_image(tmp_path / f"{name}.tif")[0, :, 1], gray)
    for name, values in (("high", [0.0, 256.0]), ("negative", [-0.5, 0.5]), ("nan", [np.nan])):
        Image.fromarray(np.array([values], np.float32), mode="F").save(tmp_path / f"{name}.tif")
        with pytest.raises(ImageDecodeError, match=rf"{name}.tif: float image values must"):
            load_image(tmp_path / f"{name}.tif")

    rgba = np.array([[[200, 100, 50, 255], [200, 100, 50, 0], [200, 100, 50, 128]]], np.uint8)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(
        load_image(tmp_path / "rgba.png")[0], [[200, 100, 50], [0, 0, 0], [100, 50, 25]]
    )

    Image.new("RGB", (1, 1), (9, 8, 7)).save(tmp_path / "one.png")
    np.testing.assert_array_equal(load_image(tmp_path / "one.png"), [[[9, 8, 7]]])


def test_decode_applies_exif_orientation(tmp_path):
    stored = np.zeros((20, 40, 3), dtype=np.uint8)
    stored[:, :20] = (255, 0, 0)
    stored[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed = stored rotated 90 degrees clockwise
    Image.fromarray(stored).save(tmp_path / "rot.jpg", exif=exif, quality=95)
    out = load_image(tmp_path / "rot.jpg")
    assert out.shape == (40, 20, 3)
    assert np.abs(out.astype(int) - np.rot90(stored, k=-1)).mean() < 8


def test_decode_bounds_huge_images(tmp_path, monkeypatch):
    Image.new("RGB", (3000, 1000), (10, 200, 30)).save(tmp_path / "huge.jpg")
    out = load_image(tmp_path / "huge.jpg", max_side=300)
    assert out.shape == (100, 300, 3)
    assert np.abs(out.astype(int) - [10, 200, 30]).max() <= 6
    assert load_image(tmp_path / "huge.jpg", max_side=5000).shape == (1000, 3000, 3)

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageDecodeError, match=r"huge\.jpg.*decompression bomb"):
        load_image(tmp_path / "huge.jpg", max_side=300)


# ---------------------------------------------------------------- PASCAL VOC


def write_voc(root: Path) -> dict[str, np.ndarray]:
    """3 images: two with palette masks, one with only an XML (a difficult dog and a cat)."""
    for folder in ("JPEGImages", "SegmentationClass", "Annotations", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True)
    masks = {
        "2007_000001": np.array([[0, 1, 1, 255], [0, 15, 15, 0], [0, 0, 0, 0]], np.uint8),
        "2007_000002": np.zeros((3, 4), np.uint8),
    }
    for name, mask in masks.items():
        Image.fromarray(noise_image(3, 4)).save(root / "JPEGImages" / f"{name}.jpg")
        mask_to_image(mask).save(root / "SegmentationClass" / f"{name}.png")
    Image.fromarray(noise_image(5, 6)).save(root / "JPEGImages" / "2007_000003.png")
    (root / "Annotations" / "2007_000003.xml").write_text(
        "<annotation><filename>2007_000003.jpg</filename>"
        "<object><name>dog</name><difficult>1</difficult>"
        "<part><name>head</name></part></object>"
        "<object><name>cat</name><difficult>0</difficult></object></annotation>"
    )
    sets = root / "ImageSets" / "Segmentation"
    (sets / "train.txt").write_text("2007_000001\n2007_000002\n2007_000003\n")
    (sets / "val.txt").write_text("2007_000002\n")
    return masks


def test_voc_reader(tmp_path):
    masks = write_voc(tmp_path)
    ds = open_dataset(f"voc:{tmp_path}:train")
    assert ds.class_names == VOC_CLASSES and len(ds) == 3
    assert ds.ids == ["2007_000001", "2007_000002", "2007_000003"]
    assert ds.path(2).name == "2007_000003.png"
    expected = np.zeros(20, np.float32)
    expected[[0, 14]] = 1  # aeroplane, person
    np.testing.assert_array_equal(ds.labels(0), expected)
    assert not ds.labels(1).any()
    xml_labels = ds.labels(-1)
    assert [VOC_CLASSES[c] for c in np.flatnonzero(xml_labels)] == ["cat", "dog"]

    s = ds[0]
    assert isinstance(s, Sample) and s.id == "2007_000001" and s.image.shape == (3, 4, 3)
    np.testing.assert_array_equal(s.mask, masks["2007_000001"])
    np.testing.assert_array_equal(s.labels, expected)
    assert ds[2].mask is None and ds[2].image.shape == (5, 6, 3) and ds.mask(2) is None
    np.testing.assert_array_equal(ds.mask(0), masks["2007_000001"])
    with pytest.raises(IndexError):
        ds[3]

    with pytest.raises(ValueError, match=r"train\.txt.*'2007_000003' has no mask"):
        open_dataset(f"voc:{tmp_path}:train", label_source="mask")
    with pytest.raises(ValueError, match=r"test\.txt.*not found"):
        open_dataset(f"voc:{tmp_path}:test")


def test_voc_train_aug_and_errors(tmp_path):
    write_voc(tmp_path)
    aug = tmp_path / "SegmentationClassAug"
    aug.mkdir()
    for name in ("2007_000001", "2007_000002"):  # grayscale index PNGs, as SBD ships them
        Image.fromarray(np.full((3, 4), 3, np.uint8)).save(aug / f"{name}.png")
    ds = open_dataset(f"voc:{tmp_path}")  # train_aug: the Aug listing minus val.txt
    assert ds.split == "train_aug" and ds.ids == ["2007_000001"]
    np.testing.assert_array_equal(ds[0].mask, np.full((3, 4), 3))
    assert ds.labels(0)[2] == 1 and ds.labels(0).sum() == 1

    sets = tmp_path / "ImageSets" / "Segmentation"
    (sets / "train_aug.txt").write_text(
        "/JPEGImages/2007_000002.jpg /SegmentationClassAug/2007_000002.png\n"
    )
    assert open_dataset(f"voc:{tmp_path}").ids == ["2007_000002"]
    # a BOM, and ids with dots, which stay whole unless the field is a path
    Image.fromarray(noise_image(3, 4)).save(tmp_path / "JPEGImages" / "cam1.frame.7.jpg")
    mask_to_image(np.zeros((3, 4), np.uint8)).save(aug / "cam1.frame.7.png")
    (sets / "dots.txt").write_text("\ufeffcam1.frame.7\n2007_000001.jpg\n", encoding="utf-8")
    assert open_dataset(f"voc:{tmp_path}:dots").ids == ["cam1.frame.7", "2007_000001"]

    (sets / "bad.txt").write_text("2007_000001\n2007_000009\n")
    with pytest.raises(ValueError, match=r"bad\.txt.*'2007_000009' not found"):
        open_dataset(f"voc:{tmp_path}:bad")
    bad_mask = np.full((3, 4), 42, np.uint8)
    mask_to_image(bad_mask).save(tmp_path / "SegmentationClass" / "2007_000001.png")
    ds = open_dataset(f"voc:{tmp_path}:train")
    with pytest.raises(ValueError, match=r"2007_000001\.png.*\[42\]"):
        ds.labels(0)


# ---------------------------------------------------------------- COCO


def rle_counts(region: np.ndarray) -> list[int]:
    """Uncompressed COCO RLE (column-major runs, starting with a run of zeros)."""
    flat = region.flatten(order="F").astype(np.int8)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    return np.diff(np.concatenate([[0], edges])).tolist()


def test_coco_reader(tmp_path):
    pytest.importorskip("pycocotools")
    images = tmp_path / "train2014"
    images.mkdir()
    Image.fromarray(noise_image(10, 12)).save(images / "COCO_train2014_000000000007.jpg")
    Image.fromarray(noise_image(4, 4)).save(images / "COCO_train2014_000000000003.jpg")
    crowd = np.zeros((10, 12), bool)
    crowd[0:5, 0:12] = True  # top band, overlapping the big box
    square = [[2.0, 2.0, 10.0, 2.0, 10.0, 8.0, 2.0, 8.0]]  # x from 2 to 10, y from 2 to 8
    small = [[4.0, 4.0, 6.0, 4.0, 6.0, 6.0, 4.0, 6.0]]
    ann = {
        "images": [
            {"id": 7, "file_name": "COCO_train2014_000000000007.jpg", "height": 10, "width": 12},
            {"id": 3, "file_name": "COCO_train2014_000000000003.jpg", "height": 4, "width": 4},
        ],
        "categories": [
            {"id": 18, "name": "dog"},
            {"id": 1, "name": "person"},
            {"id": 3, "name": "car"},
        ],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 1, "segmentation": small, "iscrowd": 0},
            {"id": 2, "image_id": 7, "category_id": 18, "segmentation": square, "iscrowd": 0},
            {
                "id": 3,
                "image_id": 7,
                "category_id": 3,
                "iscrowd": 1,
                "segmentation": {"counts": rle_counts(crowd), "size": [10, 12]},
            },
        ],
    }
    ann_file = tmp_path / "instances_train2014.json"
    ann_file.write_text(json.dumps(ann))

    ds = open_dataset(f"coco:{images}:{ann_file}")
    assert ds.class_names == ["person", "car", "dog"]  # sorted by category id 1, 3, 18
    assert ds.ids == ["COCO_train2014_000000000003", "COCO_train2014_000000000007"]
    assert not ds.labels(0).any()  # no annotations: kept, all-zero labels
    np.testing.assert_array_equal(ds.labels(1), [1, 1, 1])
    s = ds[1]
    assert s.image.shape == (10, 12, 3) and s.mask.shape == (10, 12)
    assert s.mask[5, 5] == 1  # the small person drawn over the big dog
    assert s.mask[7, 8] == 3 and s.mask[3, 8] == 3  # dog, also under the crowd band
    assert s.mask[1, 1] == 255 and s.mask[9, 11] == 0  # crowd only where nothing was painted
    assert set(np.unique(s.mask)) == {0, 1, 3, 255}
    assert ds[0].mask.shape == (4, 4) and not ds[0].mask.any()
    np.testing.assert_array_equal(ds.mask(1), s.mask)
    assert ds.image_ids == [3, 7] and ds.category_ids == [1, 3, 18]

    assert open_dataset(f"coco:{images}:{ann_file}", skip_empty=True).ids == [ds.ids[1]]
    # polygons of fewer than three points add no pixels; an unreadable RLE names itself
    line = [2.0, 2.0, 9.0, 9.0]
    ann["annotations"][1]["segmentation"] = [line, *square]
    ann["annotations"].append(
        dict(id=4, image_id=3, category_id=1, segmentation=[[], line], iscrowd=0)
    )
    ann_file.write_text(json.dumps(ann))
    ds = open_dataset(f"coco:{images}:{ann_file}")
    np.testing.assert_array_equal(ds.mask(1), s.mask)
    assert not ds.mask(0).any() and ds.labels(0)[0] == 1
    ann["annotations"][1]["segmentation"] = {"counts": "?", "size": [10]}
    ann_file.write_text(json.dumps(ann))
    with pytest.raises(ValueError, match=r"instances_train2014\.json: annotation 2: cannot"):
        open_dataset(f"coco:{images}:{ann_file}").mask(1)
    (images / "COCO_train2014_000000000003.jpg").unlink()
    with pytest.raises(ValueError, match=r"instances_train2014\.json.*1 image files missing"):
        open_dataset(f"coco:{images}:{ann_file}")


# ---------------------------------------------------------------- folder


def write_folder(root: Path) -> None:
    (root / "sub").mkdir(parents=True)
    Image.fromarray(noise_image(6, 5)).save(root / "a.jpg")
    Image.fromarray(noise_image(4, 4)).save(root / "sub" / "b.png")
    (root / ".hidden.png").write_bytes(b"")


def test_folder_csv_json_and_unlabeled(tmp_path):
    images = tmp_path / "imgs"
    write_folder(images)
    csv_file = tmp_path / "labels.csv"
    csv_file.write_text("image,labels\na.jpg,dog;cat\n\nsub/b.png,cat  bird\n")
    ds = open_dataset(f"folder:{images}:{csv_file}")
    assert ds.class_names == ["bird", "cat", "dog"] and ds.ids == ["a", "sub/b"]
    np.testing.assert_array_equal(ds.labels(0), [0, 1, 1])
    s = ds[1]
    assert s.id == "sub/b" and s.image.shape == (4, 4, 3) and s.mask is None
    np.testing.assert_array_equal(s.labels, [1, 1, 0])

    classes = tmp_path / "classes.txt"
    classes.write_text("dog\ncat\nbird\nfish\n")
    json_file = tmp_path / "labels.json"
    json_file.write_text(json.dumps({"sub/b.png": ["fish"], "a.jpg": ["dog", "cat"]}))
    ds = open_dataset(f"folder:{images}:{json_file}:{classes}")
    assert ds.class_names == ["dog", "cat", "bird", "fish"] and ds.ids == ["sub/b", "a"]
    np.testing.assert_array_equal(ds.labels(1), [1, 1, 0, 0])

    ds = open_dataset(f"folder:{images}")
    assert ds.ids == ["a", "sub/b"] and ds.class_names == [] and ds.labels(0) is None
    assert ds[0].labels is None and ds.path(1) == images / "sub" / "b.png"
    assert ds[0].mask is None and ds.mask(0) is None
    assert open_dataset(f"folder:{images}::{classes}").class_names[0] == "dog"
    # adcam label's outputs written inside the folder, or into it, are not its images
    write_folder(images / "labels" / "masks")
    (images / "labels" / "run.json").write_text("{}")
    assert open_dataset(f"folder:{images}").ids == ["a", "sub/b"]
    write_folder(images / "overlays")
    (images / "run.json").write_text("{}")
    assert open_dataset(f"folder:{images}").ids == ["a", "sub/b"]


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ("a.jpg,dog\nnope.jpg,cat\n", r"labels\.csv: line 2: image 'nope\.jpg' not found"),
        ("a.jpg,dog\nsub/b.png,  \n", r"labels\.csv: line 2: image 'sub/b\.png' has no labels"),
        ("a.jpg,dog;zebra\n", r"labels\.csv: line 1: unknown class 'zebra'"),
        ("a.jpg,dog,cat\n", r"labels\.csv: line 1: expected 2 fields"),
        ("a.jpg,dog\na.jpg,cat\n", r"labels\.csv: line 2: id 'a' appears twice"),
        ("a.jpg,dog\n ,cat\n", r"labels\.csv: line 2: empty image field"),
        ("../imgs/a.jpg,dog\n", r"line 1: image '\.\./imgs/a\.jpg' must be a path inside"),
        ("{root}/imgs/a.jpg,dog\n", r"line 1: image '/.*/imgs/a\.jpg' must be a path inside"),
        ("a.jpg,dog\xe9\n", r"labels\.csv: the labels file is not UTF-8 text"),
    ],
)
def test_folder_bad_rows(tmp_path, rows, message):
    images = tmp_path / "imgs"
    write_folder(images)
    (tmp_path / "classes.txt").write_text("dog\ncat\n")
    # Latin-1: the same bytes as UTF-8 for ASCII rows, not UTF-8 for the one with "é"
    (tmp_path / "labels.csv").write_bytes(rows.format(root=tmp_path).encode("latin-1"))
    with pytest.raises(ValueError, match=message):
        open_dataset(f"folder:{images}:{tmp_path / 'labels.csv'}:{tmp_path / 'classes.txt'}")


def test_folder_names_with_blanks_and_a_bom(tmp_path):
    """Names hold blanks where ``;`` separates them; a BOM opens the class list."""
    images = tmp_path / "imgs"
    write_folder(images)
    (tmp_path / "classes.txt").write_text("\ufefftraffic light\nperson\n", encoding="utf-8")
    (tmp_path / "labels.csv").write_text("a.jpg, person ;traffic light\nsub/b.png,person\n")
    ds = open_dataset(f"folder:{images}:{tmp_path / 'labels.csv'}:{tmp_path / 'classes.txt'}")
    assert ds.class_names == ["traffic light", "person"]
    np.testing.assert_array_equal(ds.labels(0), [1, 1])


def test_folder_bad_json(tmp_path):
    images = tmp_path / "imgs"
    write_folder(images)
    bad = tmp_path / "labels.json"
    bad.write_text(json.dumps({"a.jpg": "dog"}))
    with pytest.raises(ValueError, match=r"labels\.json: entry 'a\.jpg': expected a list"):
        open_dataset(f"folder:{images}:{bad}")


# ---------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic():
    a, b = render(3, 5), render(3, 5)
    for field in ("image", "mask", "part", "context"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert not np.array_equal(a.image, render(4, 5).image)
    assert not np.array_equal(a.image, render(3, 6).image)
    batch = SyntheticDataset(8, seed=3)
    np.testing.assert_array_equal(batch[5].image, a.image)
    np.testing.assert_array_equal(batch[5].mask, a.mask)
    val = SyntheticDataset(20, seed=3, split="val", val_fraction=0.25)
    assert val.ids == ["syn_000003", "syn_000007", "syn_000011", "syn_000015", "syn_000019"]
    np.testing.assert_array_equal(val[0].image, SyntheticDataset(4, seed=3)[3].image)


def test_synthetic_masks_labels_parts_and_contexts():
    ds = SyntheticDataset(24, seed=0, size=96)
    assert ds.class_names == CLASS_NAMES and len(ds.class_names) == 8 and ds.path(0) is None
    with_context = 0
    for i in range(len(ds)):
        s, scene = ds[i], ds.scene(i)
        assert s.image.shape == (96, 96, 3) and s.mask.shape == (96, 96)
        present = sorted(set(np.unique(s.mask).tolist()) - {0})
        assert 1 <= len(present) <= 3
        np.testing.assert_array_equal(np.flatnonzero(s.labels) + 1, present)
        np.testing.assert_array_equal(ds.labels(i), s.labels)
        np.testing.assert_array_equal(ds.mask(i), s.mask)
        assert not (scene.context & (s.mask > 0)).any()  # context is never labelled
        assert (s.mask[scene.part] > 0).all() and scene.part.any()
        part_share = scene.part.sum() / (s.mask > 0).sum()
        assert 0.01 < part_share < 0.2
        with_context += bool(scene.context.any())
    assert with_context >= len(ds) // 2


def test_make_synthetic_reads_back_equal(tmp_path, capsys):
    import argparse

    parser = argparse.ArgumentParser()
    add_make_synthetic_arguments(parser)
    args = parser.parse_args([str(tmp_path / "syn"), "--n", "10", "--seed", "1", "--size", "64"])
    assert run_make_synthetic(args) == 0
    assert "10 images (9 train, 1 val)" in capsys.readouterr().out
    ref = SyntheticDataset(10, seed=1, size=64, split="train")
    disk = open_dataset(f"synthetic:{tmp_path / 'syn'}")
    assert disk.ids == ref.ids and disk.class_names == ref.class_names
    assert len(open_dataset(f"synthetic:{tmp_path / 'syn'}:val")) == 1
    for i in range(len(ref)):
        a, b = disk[i], ref[i]
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.mask, b.mask)
        np.testing.assert_array_equal(a.labels, b.labels)
    small = open_dataset(f"synthetic:{tmp_path / 'syn'}", max_side=32)[0]
    assert small.image.shape == (32, 32, 3) and small.mask.shape == (32, 32)
    assert set(np.unique(small.mask)) <= set(np.unique(ref[0].mask))


def test_make_synthetic_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="val_fraction"):
        make_synthetic(tmp_path, 4, val_fraction=1.5)
    with pytest.raises(ValueError, match="size"):
        render(0, 0, size=8)


# ---------------------------------------------------------------- spec parsing


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("imagenet:/x", "expected one of"),
        ("/just/a/path", "expected one of"),
        ("coco:/only/images", r"coco:IMAGES_DIR:ANNOTATIONS_JSON"),
        ("voc:/a:b:c", r"voc:ROOT\[:SPLIT\]"),
    ],
)
def test_open_dataset_bad_specs(spec, message):
    with pytest.raises(ValueError, match=message) as err:
        open_dataset(spec)
    assert spec in str(err.value)


def test_open_dataset_missing_roots(tmp_path):
    with pytest.raises(ValueError, match="not a VOC root"):
        open_dataset(f"voc:{tmp_path}")
    with pytest.raises(ValueError, match=r"class_names\.txt"):
        open_dataset(f"synthetic:{tmp_path}")
    with pytest.raises(ValueError, match="image folder not found"):
        open_dataset(f"folder:{tmp_path / 'nope'}")

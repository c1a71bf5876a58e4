"""Dataset readers on tiny fake copies of each benchmark layout, built in tmp_path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from autoseg.data import classes as C
from autoseg.data.datasets import DATASETS, build_dataset

H, W = 6, 8


def save_rgb(path: Path, h: int = H, w: int = W, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)


def save_mask(path: Path, values: np.ndarray, mode: str = "L", palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "I;16":
        im = Image.fromarray(values.astype(np.uint16))
    else:
        im = Image.fromarray(values.astype(np.uint8), mode="L")
        if palette:  # VOC masks are palette PNGs whose indices are the class ids
            im = im.convert("P")
            im.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
    im.save(path)


def raw_mask(values: list[int], seed: int = 0) -> np.ndarray:
    """An H x W mask holding each of ``values`` at least once."""
    rng = np.random.default_rng(seed)
    m = rng.choice(values, size=(H, W))
    m.ravel()[: len(values)] = values
    return m


# --- PASCAL VOC -----------------------------------------------------------------------------------------------------


def make_voc(root: Path, ids=("2007_000033", "2007_000042")) -> dict[str, np.ndarray]:
    base = root / "VOCdevkit" / "VOC2012"
    masks = {}
    for k, i in enumerate(ids):
        save_rgb(base / "JPEGImages" / f"{i}.jpg", seed=k)
        masks[i] = raw_mask([0, 1, 15, 20, 255], seed=k)  # background, aeroplane, person, tv monitor, border
        save_mask(base / "SegmentationClass" / f"{i}.png", masks[i], palette=True)
    (base / "ImageSets" / "Segmentation").mkdir(parents=True)
    (base / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(ids) + "\n")
    return masks


def test_voc21_scores_background_voc20_ignores_it(tmp_path: Path):
    raw = make_voc(tmp_path)
    d21 = build_dataset("voc21", tmp_path)
    d20 = build_dataset("voc20", tmp_path / "VOCdevkit")  # any level of the release works
    assert (d21.name, d21.num_classes, d21.background_index, d21.ignore_index) == ("voc21", 21, 0, 255)
    assert (d20.name, d20.num_classes, d20.background_index, d20.ignore_index) == ("voc20", 20, None, 255)
    assert d21.classes[0] == "background" and d20.classes[15] == "potted plant" and d20.classes[19] == "tv monitor"
    item21, item20 = d21[1], d20[1]
    m = raw["2007_000042"]
    assert item21["name"] == "2007_000042" and item21["path"].endswith("JPEGImages/2007_000042.jpg")
    assert item21["image"].mode == "RGB" and item21["image"].size == (W, H)
    assert item21["mask"].dtype == np.int64
    np.testing.assert_array_equal(item21["mask"], m)  # palette indices are the 21 class ids
    expected20 = np.where((m == 0) | (m == 255), 255, m - 1)  # background -> ignore, aeroplane -> 0, ...
    np.testing.assert_array_equal(item20["mask"], expected20)
    np.testing.assert_array_equal(d20.read_mask(1), expected20)
    assert len(build_dataset("voc21", tmp_path, limit=1)) == 1


def test_voc_missing_mask_and_root(tmp_path: Path):
    make_voc(tmp_path)
    (tmp_path / "VOCdevkit/VOC2012/SegmentationClass/2007_000042.png").unlink()
    with pytest.raises(ValueError, match=r"1 image\(s\) without a mask .*2007_000042\.png"):
        build_dataset("voc21", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"nowhere: PASCAL VOC 2012 root not found.*JPEGImages"):
        build_dataset("voc20", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"test\.txt: split list not found"):
        build_dataset("voc20", tmp_path, split="test")


def test_voc_wrong_size_and_bad_values(tmp_path: Path):
    make_voc(tmp_path)
    save_mask(tmp_path / "VOCdevkit/VOC2012/SegmentationClass/2007_000033.png", np.zeros((H + 1, W)))
    save_mask(tmp_path / "VOCdevkit/VOC2012/SegmentationClass/2007_000042.png", raw_mask([0, 37]))
    d = build_dataset("voc21", tmp_path)
    with pytest.raises(ValueError, match=r"2007_000033\.png: mask is 8x7 \(WxH\) but its image .* is 8x6"):
        d[0]
    with pytest.raises(ValueError, match="2007_000033.png: mask is 8x7"):
        d.read_mask(0)
    with pytest.raises(ValueError, match=r"unexpected mask values \[37\]"):
        d[1]


# --- PASCAL Context ---------------------------------------------------------------------------------------------------


def test_context59_60(tmp_path: Path):
    base = tmp_path / "VOCdevkit" / "VOC2010"
    save_rgb(base / "JPEGImages" / "2008_000002.jpg")
    m = raw_mask([0, 1, 40, 59])
    save_mask(base / "SegmentationClassContext" / "2008_000002.png", m)
    (base / "ImageSets" / "SegmentationContext").mkdir(parents=True)
    (base / "ImageSets" / "SegmentationContext" / "val.txt").write_text("2008_000002\n")
    d59, d60 = build_dataset("context59", tmp_path), build_dataset("context60", base)
    assert (d59.num_classes, d59.background_index, d60.num_classes, d60.background_index) == (59, None, 60, 0)
    np.testing.assert_array_equal(d60[0]["mask"], m)
    np.testing.assert_array_equal(d59[0]["mask"], np.where(m == 0, 255, m - 1))
    assert d59.classes[39] == "potted plant" and d60.classes[40] == "potted plant"
    (base / "SegmentationClassContext" / "2008_000002.png").unlink()
    with pytest.raises(ValueError, match="without a mask"):
        build_dataset("context59", tmp_path)


def test_context459_uint16(tmp_path: Path):
    base = tmp_path / "VOCdevkit" / "VOC2010"
    save_rgb(base / "JPEGImages" / "2008_000002.jpg")
    save_rgb(base / "JPEGImages" / "2008_000003.jpg")  # an image outside the split: not listed
    m = raw_mask([0, 2, 300, 458, 65535])
    save_mask(base / "annotations_detectron2" / "pc459_val" / "2008_000002.tif", m, mode="I;16")
    d = build_dataset("context459", tmp_path)
    assert (len(d), d.num_classes, d.ignore_index, d.background_index) == (1, 459, 65535, None)
    assert d.classes[2] == "air conditioner" and d.classes[300] == C.CONTEXT459[300]
    np.testing.assert_array_equal(d[0]["mask"], m)
    (base / "JPEGImages" / "2008_000002.jpg").unlink()
    with pytest.raises(ValueError, match=r"1 image\(s\) missing .*2008_000002\.jpg"):
        build_dataset("context459", tmp_path)


# --- ADE20K -----------------------------------------------------------------------------------------------------------


def test_ade150(tmp_path: Path):
    base = tmp_path / "ADEChallengeData2016"
    for k, i in enumerate(["ADE_val_00000001", "ADE_val_00000002"]):
        save_rgb(base / "images" / "validation" / f"{i}.jpg", seed=k)
        save_mask(base / "annotations" / "validation" / f"{i}.png", raw_mask([0, 1, 150], seed=k))
    d = build_dataset("ade150", tmp_path)
    assert (d.names, d.num_classes, d.ignore_index) == (["ADE_val_00000001", "ADE_val_00000002"], 150, 255)
    raw = np.asarray(Image.open(base / "annotations" / "validation" / "ADE_val_00000002.png")).astype(int)
    np.testing.assert_array_equal(d[1]["mask"], np.where(raw == 0, 255, raw - 1))  # 0 = "other" -> ignore
    assert d.classes[0] == "wall" and d.classes[149] == "flag"
    with pytest.raises(FileNotFoundError, match=r"training: image folder not found"):
        build_dataset("ade150", tmp_path, split="train")
    with pytest.raises(ValueError, match="split 'test' unknown"):
        build_dataset("ade150", tmp_path, split="test")


def test_ade847_uint16(tmp_path: Path):
    base = tmp_path / "ADE20K_2021_17_01"
    save_rgb(base / "images_detectron2" / "validation" / "ADE_val_00000001.jpg")
    m = raw_mask([0, 255, 256, 846, 65535])  # 255 is a class here (ignore is 65535)
    save_mask(base / "annotations_detectron2" / "validation" / "ADE_val_00000001.tif", m, mode="I;16")
    d = build_dataset("ade847", base)
    assert (d.num_classes, d.ignore_index) == (847, 65535)
    np.testing.assert_array_equal(d[0]["mask"], m)
    assert d.classes[14] == "car" and "bag (handbag)" in d.classes and len(set(d.classes)) == 847
    save_mask(base / "annotations_detectron2" / "validation" / "ADE_val_00000001.tif", raw_mask([0, 847]), mode="I;16")
    with pytest.raises(ValueError, match=r"unexpected mask values \[847\]"):
        d[0]


# --- Cityscapes -------------------------------------------------------------------------------------------------------


def make_cityscapes(root: Path, train_ids: bool) -> np.ndarray:
    stem = "frankfurt_000000_000294"
    save_rgb(root / "leftImg8bit" / "val" / "frankfurt" / f"{stem}_leftImg8bit.png")
    if train_ids:
        m = raw_mask([0, 5, 18, 255])
        save_mask(root / "gtFine" / "val" / "frankfurt" / f"{stem}_gtFine_labelTrainIds.png", m)
    else:
        m = raw_mask([0, 1, 7, 8, 26, 33, 34, -1 % 256])  # unlabeled, ego vehicle, road, sidewalk, car, bicycle, ...
        save_mask(root / "gtFine" / "val" / "frankfurt" / f"{stem}_gtFine_labelIds.png", m)
    return m


def test_cityscapes_train_ids(tmp_path: Path):
    m = make_cityscapes(tmp_path, train_ids=True)
    d = build_dataset("cityscapes", tmp_path)
    item = d[0]
    assert item["name"] == "frankfurt/frankfurt_000000_000294_leftImg8bit"
    np.testing.assert_array_equal(item["mask"], m)
    assert d.classes[13] == "car" and d.num_classes == 19


def test_cityscapes_label_ids_mapped(tmp_path: Path):
    m = make_cityscapes(tmp_path, train_ids=False)
    d = build_dataset("cityscapes", tmp_path)
    # label id -> train id by hand: road 7 -> 0, sidewalk 8 -> 1, car 26 -> 13, bicycle 33 -> 18, others ignored
    by_hand = {7: 0, 8: 1, 26: 13, 33: 18}
    expected = np.vectorize(lambda v: by_hand.get(int(v), 255))(m)
    np.testing.assert_array_equal(d[0]["mask"], expected)


def test_cityscapes_missing_gt(tmp_path: Path):
    make_cityscapes(tmp_path, train_ids=True)
    save_rgb(tmp_path / "leftImg8bit" / "val" / "lindau" / "lindau_000000_000019_leftImg8bit.png")
    with pytest.raises(ValueError, match=r"without a mask .*lindau_000000_000019_gtFine_labelTrainIds\.png"):
        build_dataset("cityscapes", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"leftImg8bit/test folder not found"):
        build_dataset("cityscapes", tmp_path, split="test")


# --- folder -----------------------------------------------------------------------------------------------------------


def make_folder(root: Path, classes=("background", "cat", "dog")) -> dict[str, np.ndarray]:
    (root / "classes.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    masks = {}
    for k, name in enumerate(["a", "sub/b"]):
        save_rgb(root / "images" / f"{name}.jpg", seed=k)
        masks[name] = raw_mask([0, 1, 2, 255], seed=k)
        save_mask(root / "masks" / f"{name}.png", masks[name])
    return masks


def test_folder_dataset(tmp_path: Path):
    masks = make_folder(tmp_path)
    d = build_dataset("folder", tmp_path)
    assert (d.classes, d.background_index, d.ignore_index, d.names) == (
        ["background", "cat", "dog"],
        0,
        255,
        ["a", "sub/b"],
    )
    item = d[1]
    assert item["name"] == "sub/b" and item["image"].size == (W, H)
    np.testing.assert_array_equal(item["mask"], masks["sub/b"])
    other = tmp_path / "nobg"
    make_folder(other, classes=("cat", "dog", "bird"))
    assert build_dataset("folder", other).background_index is None


def test_folder_errors(tmp_path: Path):
    make_folder(tmp_path)
    save_rgb(tmp_path / "images" / "c.png")
    with pytest.raises(ValueError, match=r"1 image\(s\) without a mask .*masks/c\.png"):
        build_dataset("folder", tmp_path)
    save_mask(tmp_path / "masks" / "c.png", np.zeros((H, W + 3)))
    d = build_dataset("folder", tmp_path)
    with pytest.raises(ValueError, match=r"c\.png: mask is 11x6 \(WxH\) but its image"):
        d[d.names.index("c")]
    save_mask(tmp_path / "masks" / "c.png", raw_mask([3]))  # a value past the 3 classes of classes.txt
    with pytest.raises(ValueError, match=r"unexpected mask values \[3\]"):
        build_dataset("folder", tmp_path)[1]  # names in order: a, c, sub/b
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(tmp_path / "masks" / "c.png")
    with pytest.raises(ValueError, match="expected a single-channel mask"):
        build_dataset("folder", tmp_path)[1]
    save_mask(tmp_path / "masks" / "orphan.png", np.zeros((H, W)))
    with pytest.raises(ValueError, match=r"1 mask\(s\) without an image"):
        build_dataset("folder", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"classes\.txt: class list not found"):
        build_dataset("folder", tmp_path / "images")
    with pytest.raises(FileNotFoundError, match="folder dataset root not found"):
        build_dataset("folder", tmp_path / "missing")


def test_registry_lists_options():
    assert set(DATASETS) == {
        "voc20",
        "voc21",
        "context59",
        "context60",
        "context459",
        "ade150",
        "ade847",
        "cityscapes",
        "folder",
    }
    with pytest.raises(ValueError, match=r"unknown dataset 'coco'; available: voc20, voc21, .*folder"):
        build_dataset("coco", "/nowhere")


def test_class_lists():
    sizes = {"voc20": 20, "voc21": 21, "context59": 59, "context60": 60, "context459": 459, "ade150": 150}
    sizes |= {"ade847": 847, "cityscapes": 19}
    for name, n in sizes.items():
        names = C.class_names(name)
        assert len(names) == n and len(set(names)) == n, name
    assert C.class_names("voc21")[:3] == ["background", "aeroplane", "bicycle"]
    assert C.class_names("context60")[0] == "background"
    assert C.class_names("ade847")[88] == "television receiver"
    assert "tv" in C.class_synonyms("ade847")[88]
    assert C.class_synonyms("context459")[C.CONTEXT459_OFFICIAL.index("tvmonitor")] == ["tv monitor", "tvmonitor"]
    with pytest.raises(KeyError, match="known"):
        C.class_names("coco")

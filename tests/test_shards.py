"""WebDataset shards: folder -> shards -> reader round trip, odd inputs, determinism, seeded shuffling, CLI."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from autoseg.data import shards
from autoseg.data.shapes import ShapesConfig, write_dataset
from autoseg.data.shards import shard_dataset, write_shards
from autoseg.utils.io import load_image


@pytest.fixture(scope="module")
def shapes_folder(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("shapes"), n=7, seed=2, config=ShapesConfig(size=48), progress=False)


def read_folder_sample(folder, name):
    image = np.asarray(load_image(folder / "images" / f"{name}.png"))
    mask = np.asarray(Image.open(folder / "masks" / f"{name}.png")).astype(np.int64)
    captions = json.loads((folder / "captions" / f"{name}.json").read_text())
    return image, mask, captions


def test_round_trip_gives_identical_images_masks_and_captions(shapes_folder, tmp_path):
    paths = write_shards(shapes_folder, tmp_path / "sh", maxcount=3, progress=False)
    assert [p.name for p in paths] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert (tmp_path / "sh" / "classes.txt").read_bytes() == (shapes_folder / "classes.txt").read_bytes()
    with tarfile.open(paths[0]) as tar:
        assert tar.getnames()[:3] == ["000000.caption.json", "000000.image.png", "000000.mask.png"]
    samples = list(shard_dataset(tmp_path / "sh"))
    assert [s["name"] for s in samples] == [f"{i:06d}" for i in range(7)]
    for s in samples:
        image, mask, captions = read_folder_sample(shapes_folder, s["name"])
        assert s["image"].mode == "RGB" and np.array_equal(np.asarray(s["image"]), image)
        assert s["mask"].dtype == np.int64 and np.array_equal(s["mask"], mask)
        assert s["captions"] == captions


def test_shards_are_byte_identical_across_runs(shapes_folder, tmp_path):
    a = write_shards(shapes_folder, tmp_path / "a", maxcount=4, progress=False)
    b = write_shards(shapes_folder, str(tmp_path / "b" / "train-%03d.tar"), maxcount=4, progress=False)
    assert [p.name for p in b] == ["train-000.tar", "train-001.tar"]
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    assert not list((tmp_path / "a").glob(".tmp-*"))


def test_seeded_shuffle_is_a_reproducible_permutation(shapes_folder, tmp_path):
    write_shards(shapes_folder, tmp_path / "sh", maxcount=2, progress=False)
    order = [s["name"] for s in shard_dataset(tmp_path / "sh", shuffle=5, seed=3)]
    assert sorted(order) == [f"{i:06d}" for i in range(7)]
    assert order == [s["name"] for s in shard_dataset(tmp_path / "sh", shuffle=5, seed=3)]
    others = {tuple(s["name"] for s in shard_dataset(tmp_path / "sh", shuffle=5, seed=k)) for k in range(4, 9)}
    assert len(others | {tuple(order)}) > 1


def test_other_formats_modes_and_names_round_trip(tmp_path):
    folder = tmp_path / "ds"
    for sub in ("images/city", "masks/city"):
        (folder / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    rgba = np.concatenate([rgb, rng.integers(0, 256, (20, 30, 1), dtype=np.uint8)], axis=2)
    Image.fromarray(rgb).save(folder / "images" / "photo.jpg", quality=90)
    Image.fromarray(rgba).save(folder / "images" / "city" / "a.b.png")  # RGBA: re-encoded as RGB on white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: stored 30x20, shown 20x30
    Image.fromarray(rgb.transpose(1, 0, 2).copy()).save(folder / "images" / "rotated.jpg", exif=exif)
    labels = rng.integers(0, 5, (20, 30), dtype=np.uint8)
    labels[0, 0] = 255
    Image.fromarray(labels).save(folder / "masks" / "photo.png")
    Image.fromarray(labels).save(folder / "masks" / "rotated.png")
    palette = Image.fromarray(labels, mode="L").convert("P")  # VOC-style palette mask: values are the indices
    palette.putpalette([v for i in range(256) for v in (i, 255 - i, i // 2)])
    palette.save(folder / "masks" / "city" / "a.b.png")

    write_shards(folder, progress=False)
    got = {s["name"]: s for s in shard_dataset(folder / "shards")}
    assert sorted(got) == ["city/a.b", "photo", "rotated"]
    for name, ext in (("city/a.b", "png"), ("photo", "jpg"), ("rotated", "jpg")):
        expected = np.asarray(load_image(folder / "images" / f"{name}.{ext}"))
        assert np.array_equal(np.asarray(got[name]["image"]), expected), name
        assert np.array_equal(got[name]["mask"], labels.astype(np.int64)), name
        assert got[name]["captions"] is None
    assert got["rotated"]["image"].size == (30, 20)
    with tarfile.open(folder / "shards" / "shard-000000.tar") as tar:
        names = tar.getnames()
        assert tar.extractfile("photo.image.jpg").read() == (folder / "images" / "photo.jpg").read_bytes()  # as is
    assert "city/a_b.image.png" in names and "city/a_b.name.txt" in names  # a dot would split the webdataset key


def test_missing_or_bad_masks_are_reported(tmp_path):
    folder = tmp_path / "ds"
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    Image.new("RGB", (8, 8)).save(folder / "images" / "x.png")
    with pytest.raises(FileNotFoundError, match=r"masks/x\.png"):
        write_shards(folder, progress=False)
    Image.new("RGB", (8, 8)).save(folder / "masks" / "x.png")
    with pytest.raises(ValueError, match=r"x\.png.*single-channel"):
        write_shards(folder, progress=False)
    Image.new("L", (8, 9)).save(folder / "masks" / "x.png")
    with pytest.raises(ValueError, match="8x9"):
        write_shards(folder, progress=False)
    with pytest.raises(FileNotFoundError, match="no images folder"):
        write_shards(tmp_path / "nowhere", progress=False)


def test_cli_converts_a_folder(shapes_folder, tmp_path):
    out = tmp_path / "cli"
    assert shards.main(["--folder", str(shapes_folder), "--out", str(out), "--maxcount", "5"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["classes.txt", "shard-000000.tar", "shard-000001.tar"]
    assert len(list(shard_dataset(str(out / "shard-{000000..000001}.tar")))) == 7

"""python -m autoseg.export: every format read back by its ecosystem's own reader gives the label maps infer.py wrote.

Each round trip decodes the export independently (pycocotools; the panoptic id formula; a Label Studio brush decoder
written here from the format's description, and label-studio-sdk's own where installed; CVAT's colour map from
labelmap.txt; the folder dataset reader) and compares every pixel's name with the prediction's.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from autoseg.cli.export import main
from autoseg.outputs import Prediction, write_prediction

VOCABS = {  # stem -> vocabulary; "manifest" is a reserved stem (written as manifest~.json)
    "a": ["sky", "dog", "grass"],
    "sub/b": ["grass", "cat", "dogs", "unused"],
    "manifest": ["tree"],
    "c": ["cat", "sky", "lamp", "dog"],
}
SIZES = {"a": (24, 31), "sub/b": (20, 17), "manifest": (9, 12), "c": (33, 28)}  # (H, W)


def blobby_map(rng: np.random.Generator, shape: tuple[int, int], n_labels: int) -> np.ndarray:
    """Blocks of random labels (0..n_labels, label n_labels never used when > 1): several regions per label."""
    h, w = shape
    used = n_labels - 1 if n_labels > 2 else n_labels
    coarse = rng.integers(0, used + 1, size=(h // 4 + 1, w // 4 + 1))
    fine = np.kron(coarse, np.ones((4, 4), dtype=np.int64))[:h, :w]
    fine[rng.random((h, w)) < 0.03] = 1  # single pixels too
    return fine


def make_predictions(tmp_path: Path, seed: int = 0) -> tuple[Path, Path, dict[str, np.ndarray]]:
    """An infer.py-style prediction folder (no manifest) and its image folder; returns the label maps by stem."""
    rng = np.random.default_rng(seed)
    images, preds, maps = tmp_path / "photos", tmp_path / "preds", {}
    for stem, vocab in VOCABS.items():
        h, w = SIZES[stem]
        image = Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))
        path = images / f"{stem}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        maps[stem] = blobby_map(rng, (h, w), len(vocab))
        write_prediction(preds, stem, image, str(path), Prediction(vocab, maps[stem]))
    return images, preds, maps


def names_of(label_map: np.ndarray, vocabulary: list[str]) -> np.ndarray:
    """``H x W`` object array of each pixel's name (None = unlabelled)."""
    lut = np.array([None, *vocabulary], dtype=object)
    return lut[label_map]


def export(preds: Path, fmt: str, dest: Path, *extra: str) -> int:
    return main([str(preds), "--to", fmt, "--out", str(dest), "--no-progress", *extra])


# ----------------------------------------------------------------------------------------------------- decoders


def decode_coco(dest: Path) -> dict[str, np.ndarray]:
    """pycocotools: paint each annotation's mask with its category name; no two annotations may overlap."""
    from pycocotools.coco import COCO

    coco = COCO(str(dest / "annotations.json"))
    out = {}
    for img in coco.loadImgs(coco.getImgIds()):
        canvas = np.full((img["height"], img["width"]), None, dtype=object)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=[img["id"]])):
            mask = coco.annToMask(ann).astype(bool)
            assert mask.any() and all(v is None for v in canvas[mask])
            assert ann["area"] == mask.sum()
            x, y, w, h = ann["bbox"]
            rows, cols = np.nonzero(mask)
            assert (x, y, w, h) == (cols.min(), rows.min(), cols.max() - cols.min() + 1, rows.max() - rows.min() + 1)
            canvas[mask] = coco.loadCats([ann["category_id"]])[0]["name"]
        out[Path(img["file_name"]).with_suffix("").as_posix()] = canvas
    return out


def decode_panoptic(dest: Path) -> dict[str, np.ndarray]:
    """The COCO panoptic formula id = R + 256 G + 256^2 B, and segments_info id -> category."""
    data = json.loads((dest / "panoptic.json").read_text())
    cats = {c["id"]: c["name"] for c in data["categories"]}
    images = {i["id"]: i for i in data["images"]}
    out = {}
    for ann in data["annotations"]:
        rgb = np.asarray(Image.open(dest / "panoptic" / ann["file_name"]).convert("RGB")).astype(np.int64)
        ids = rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]
        canvas = np.full(ids.shape, None, dtype=object)
        for seg in ann["segments_info"]:
            assert seg["area"] == (ids == seg["id"]).sum() > 0
            canvas[ids == seg["id"]] = cats[seg["category_id"]]
        assert set(np.unique(ids)) - {0} == {s["id"] for s in ann["segments_info"]}
        out[Path(images[ann["image_id"]]["file_name"]).with_suffix("").as_posix()] = canvas
    return out


def decode_brush(rle: list[int]) -> np.ndarray:
    """Label Studio brush RLE -> flat uint8 values, read bit by bit (thi.ng rle-pack, as Label Studio's frontend)."""
    bits = "".join(f"{byte:08b}" for byte in rle)
    pos = 0

    def read(n: int) -> int:
        nonlocal pos
        pos += n
        return int(bits[pos - n : pos], 2)

    num, word = read(32), read(5) + 1
    sizes = [read(4) + 1 for _ in range(4)]
    out, i = np.zeros(num, dtype=np.uint8), 0
    while i < num:
        repeat = read(1)
        j = i + 1 + read(sizes[read(2)])
        if repeat:
            out[i:j] = read(word)
        else:
            for k in range(i, j):
                out[k] = read(word)
        i = j
    return out


def decode_labelstudio(dest: Path, decoder=decode_brush) -> dict[str, np.ndarray]:
    """Each brushlabels result's mask (alpha channel > 0) painted with its label."""
    tasks = json.loads((dest / "tasks.json").read_text())
    config = (dest / "label_config.xml").read_text()
    out = {}
    for task in tasks:
        results = task["predictions"][0]["result"]
        h, w = (results[0]["original_height"], results[0]["original_width"]) if results else (0, 0)
        canvas = np.full((h, w), None, dtype=object)
        for r in results:
            assert r["type"] == "brushlabels" and r["from_name"] == "tag" and r["to_name"] == "image"
            (label,) = r["value"]["brushlabels"]
            assert f'<Label value="{label}"' in config
            rgba = decoder(r["value"]["rle"]).reshape(h, w, 4)
            mask = rgba[..., 3] > 0
            assert all(v is None for v in canvas[mask])
            canvas[mask] = label
        out[task["data"]["name"]] = canvas
    return out


def decode_cvat(dest: Path) -> dict[str, np.ndarray]:
    """CVAT Segmentation Mask 1.1: labelmap.txt's colours map each SegmentationClass pixel to its label."""
    out = {}
    with zipfile.ZipFile(dest / "segmentation_mask_1.1.zip") as z:
        colours = {}
        for line in z.read("labelmap.txt").decode().splitlines():
            if line.startswith("#"):
                continue
            name, rgb, _, _ = line.split(":")
            colours[tuple(int(c) for c in rgb.split(","))] = None if name == "background" else name
        assert len(colours) == len(z.read("labelmap.txt").decode().splitlines()) - 1  # colours are distinct
        for stem in z.read("ImageSets/Segmentation/default.txt").decode().split():
            with z.open(f"SegmentationClass/{stem}.png") as f:
                rgb = np.asarray(Image.open(f).convert("RGB"))
            canvas = np.full(rgb.shape[:2], None, dtype=object)
            for colour, name in colours.items():
                canvas[(rgb == colour).all(axis=-1)] = name
            out[stem] = canvas
    return out


def decode_folder(dest: Path) -> dict[str, np.ndarray]:
    """AutoSeg's own folder dataset reader: mask value = class line, 255 = unlabelled."""
    from autoseg.data.datasets import build_dataset

    ds = build_dataset("folder", dest)
    out = {}
    for i, sample in enumerate(ds.samples):
        mask = ds.read_mask(i)
        out[sample.name] = np.array([None, *ds.classes], dtype=object)[np.where(mask == 255, 0, mask + 1)]
    return out


DECODERS = {
    "coco": decode_coco,
    "coco-panoptic": decode_panoptic,
    "labelstudio": decode_labelstudio,
    "cvat": decode_cvat,
    "folder": decode_folder,
}


# -------------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("fmt", list(DECODERS))
def test_every_format_decodes_to_the_label_maps_infer_wrote(tmp_path, fmt):
    from autoseg.export import FORMATS

    assert set(FORMATS) == set(DECODERS)  # a new format needs its round trip here
    _, preds, maps = make_predictions(tmp_path)
    dest = tmp_path / "out"
    assert export(preds, fmt, dest) == 0
    decoded = DECODERS[fmt](dest)
    assert sorted(decoded) == sorted(VOCABS)
    for stem, label_map in maps.items():
        assert (decoded[stem] == names_of(label_map, VOCABS[stem])).all(), stem
    summary = json.loads((dest / "summary.json").read_text())
    assert summary["images_exported"] == len(VOCABS) and summary["images_skipped"] == 0
    assert "unused" not in summary["categories"]  # present in a vocabulary, but on no pixel
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left


def test_folder_export_copies_the_images(tmp_path):
    images, preds, _ = make_predictions(tmp_path)
    assert export(preds, "folder", tmp_path / "out") == 0
    for stem in VOCABS:
        assert (tmp_path / "out/images" / f"{stem}.png").read_bytes() == (images / f"{stem}.png").read_bytes()


def test_labelstudio_rle_matches_label_studio_sdk(tmp_path):
    """label-studio-sdk's own decoder reads the same masks (the README's install adds the SDK without its
    dependencies; its brush module needs only numpy and Pillow)."""
    pytest.importorskip("label_studio_sdk")
    from label_studio_sdk.converter.brush import decode_rle

    _, preds, maps = make_predictions(tmp_path)
    assert export(preds, "labelstudio", tmp_path / "out") == 0
    decoded = decode_labelstudio(tmp_path / "out", decode_rle)
    for stem, label_map in maps.items():
        assert (decoded[stem] == names_of(label_map, VOCABS[stem])).all()


def test_brush_encoder_on_edge_cases():
    from autoseg.export.brush import mask_to_rle

    try:
        from label_studio_sdk.converter.brush import decode_rle as sdk_decode
    except ImportError:
        sdk_decode = None

    rng = np.random.default_rng(3)
    for mask in (
        np.zeros((1, 1), bool),
        np.ones((300, 300), bool),  # runs past 65,536 values
        rng.random((37, 41)) > 0.5,
        np.eye(50, dtype=bool),
    ):
        values = decode_brush(mask_to_rle(mask)).reshape(*mask.shape, 4)
        assert (values == (mask[..., None] * 255)).all()
        if sdk_decode is not None:
            assert (sdk_decode(mask_to_rle(mask)).reshape(*mask.shape, 4) == values).all()


# ------------------------------------------------------------------------------------------------ class mapping


def test_class_mapped_coco_uses_eval_py_mapping_per_pixel(tmp_path):
    """Only classes from classes.txt; each pixel's class is the class eval.py's report maps its name to."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("eval_entry", Path(__file__).resolve().parents[1] / "eval.py")
    eval_entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(eval_entry)
    images, preds, maps = make_predictions(tmp_path)
    classes = ["dog", "cat", "sky", "person"]
    (tmp_path / "classes.txt").write_text("\n".join(classes) + "\n")
    # eval.py on a folder dataset with those classes and the same images (its masks do not matter for the mapping)
    root = tmp_path / "ds"
    for stem in VOCABS:
        for sub, data in (("images", (images / f"{stem}.png").read_bytes()), ("masks", None)):
            target = root / sub / f"{stem}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            if data is not None:
                target.write_bytes(data)
            else:
                Image.fromarray(np.zeros(SIZES[stem], np.uint8), mode="L").save(target)
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    report = tmp_path / "report.json"
    argv = ["--dataset", "folder", "--root", str(root), "--predictions", str(preds), "--mapper", "exact"]
    assert eval_entry.main([*argv, "--report", str(report), "--no-progress"]) == 0
    mapping = json.loads(report.read_text())["mapping"]
    assert mapping["dogs"] == "dog" and mapping["grass"] is None  # lemmas match; no class for grass

    dest = tmp_path / "out"
    assert export(preds, "coco", dest, "--classes", str(tmp_path / "classes.txt"), "--mapper", "exact") == 0
    data = json.loads((dest / "annotations.json").read_text())
    assert [c["name"] for c in data["categories"]] == classes
    decoded = decode_coco(dest)
    for stem, label_map in maps.items():
        expected = np.vectorize(lambda n: None if n is None else mapping[n], otypes=[object])(
            names_of(label_map, VOCABS[stem])
        )
        assert (decoded[stem] == expected).all(), stem
    summary = json.loads((dest / "summary.json").read_text())
    assert set(summary["categories"]) <= set(classes) and "grass" in summary["names_dropped"]
    assert summary["names"]["dogs"]["category"] == "dog" and summary["mapper"] == "exact"


def test_keep_unmapped_adds_names_after_the_classes(tmp_path):
    _, preds, maps = make_predictions(tmp_path)
    (tmp_path / "classes.txt").write_text("dog\ncat\n")
    dest = tmp_path / "out"
    args = ("--classes", str(tmp_path / "classes.txt"), "--mapper", "exact", "--keep-unmapped")
    assert export(preds, "folder", dest, *args) == 0
    classes = (dest / "classes.txt").read_text().split("\n")[:-1]
    assert classes[:2] == ["dog", "cat"] and {"sky", "grass", "tree", "lamp"} <= set(classes[2:])
    decoded = decode_folder(dest)
    to_class = {"dogs": "dog"}
    for stem, label_map in maps.items():
        names = names_of(label_map, VOCABS[stem])
        assert (decoded[stem] == np.vectorize(lambda n: to_class.get(n, n), otypes=[object])(names)).all()


# -------------------------------------------------------------------------------------- options, errors, safety


def test_min_area_drops_small_regions_in_every_format(tmp_path):
    image = Image.new("RGB", (10, 8))
    label_map = np.zeros((8, 10), dtype=np.int64)
    label_map[:, :5] = 1  # 40 px
    label_map[0, 9] = 2  # 1 px
    label_map[6:8, 8:10] = 2  # 4 px, not touching the single pixel
    write_prediction(tmp_path / "preds", "x", image, "x.png", Prediction(["wall", "bird"], label_map))
    assert export(tmp_path / "preds", "coco", tmp_path / "out", "--min-area", "3") == 0
    decoded = decode_coco(tmp_path / "out")["x"]
    expected = names_of(label_map, ["wall", "bird"])
    expected[0, 9] = None
    assert (decoded == expected).all()
    assert json.loads((tmp_path / "out/summary.json").read_text())["regions_dropped_min_area"] == 1


def test_existing_destination_is_refused_without_force(tmp_path, capsys):
    _, preds, _ = make_predictions(tmp_path)
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    assert export(preds, "coco", dest) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(dest) in err and "--force" in err
    assert (dest / "keep.txt").read_text() == "mine"
    assert export(preds, "coco", dest, "--force") == 0
    assert not (dest / "keep.txt").exists() and (dest / "annotations.json").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_destination_inside_predictions_is_refused(tmp_path, capsys):
    _, preds, _ = make_predictions(tmp_path)
    assert export(preds, "cvat", preds / "export") == 2
    assert "export folder" in capsys.readouterr().err and not (preds / "export").exists()


def test_unknown_format_lists_the_formats(tmp_path, capsys):
    assert export(tmp_path, "yolo", tmp_path / "out") == 2
    assert "coco-panoptic" in capsys.readouterr().err


def test_broken_sets_are_skipped_and_counted(tmp_path, capsys):
    _, preds, maps = make_predictions(tmp_path)
    (preds / "a.png").write_bytes(b"not a png")  # corrupt label map
    (preds / "c.json").write_text("{")  # malformed record
    dest = tmp_path / "out"
    assert export(preds, "coco", dest) == 1  # written, but not everything
    summary = json.loads((dest / "summary.json").read_text())
    assert summary["images_exported"] == 2 and summary["images_skipped"] == 2
    reasons = " ".join(s["reason"] for s in summary["skipped"])
    assert str(preds / "a.png") in reasons and str(preds / "c.json") in reasons
    assert sorted(decode_coco(dest)) == ["manifest", "sub/b"]
    assert "skipped 2" in capsys.readouterr().out


def test_a_failing_export_leaves_no_destination(tmp_path, monkeypatch):
    from autoseg.export import coco

    _, preds, _ = make_predictions(tmp_path)
    calls = []

    def failing_add(self, item):
        calls.append(item.stem)
        if len(calls) == 2:
            raise RuntimeError("disk on fire")

    monkeypatch.setattr(coco.CocoWriter, "add", failing_add)
    with pytest.raises(RuntimeError):
        export(preds, "coco", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_folder_export_skips_an_image_it_cannot_find(tmp_path):
    images, preds, _ = make_predictions(tmp_path)
    (images / "a.png").unlink()
    assert export(preds, "folder", tmp_path / "out") == 1
    summary = json.loads((tmp_path / "out/summary.json").read_text())
    assert summary["images_skipped"] == 1 and "--images" in summary["skipped"][0]["reason"]
    moved = tmp_path / "moved"
    images.rename(moved)  # the recorded paths are gone; --images says where the images are now
    (moved / "a.png").write_bytes((moved / "c.png").read_bytes())
    assert export(preds, "folder", tmp_path / "out2", "--images", str(moved)) == 0


# ------------------------------------------------------------------------------------------ infer.py --export


def test_infer_export_writes_the_run_in_the_format(tmp_path, tiny_blip_dir, tiny_clipseg_dir, capsys):
    """The real pipeline (tiny random models) then --export: the export decodes to the PNGs infer.py wrote."""
    from autoseg.cli.infer import main as infer_main
    from autoseg.outputs import read_prediction

    inputs = tmp_path / "in"
    inputs.mkdir()
    rng = np.random.default_rng(5)
    for name, (h, w) in {"p0": (40, 48), "p1": (36, 30)}.items():
        Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(inputs / f"{name}.png")
    (inputs / "broken.png").write_bytes(b"\x89PNG not really")
    argv = [str(inputs), "-o", str(tmp_path / "run"), "--config", "configs/debug/pipeline.yaml"]
    argv += ["--blip", str(tiny_blip_dir), "--segmenter", str(tiny_clipseg_dir), "--seed", "1"]
    assert infer_main([*argv, "--export", "coco-panoptic"]) == 1  # the broken file failed; the rest is exported
    dest = tmp_path / "run_coco-panoptic"
    summary = json.loads((dest / "summary.json").read_text())
    assert summary["images_exported"] == 2 and summary["images_skipped"] == 1
    assert "broken.png" in summary["skipped"][0]["reason"]
    decoded = decode_panoptic(dest)
    for stem in ("p0", "p1"):
        label_map, vocabulary = read_prediction(tmp_path / "run", stem)
        assert (decoded[stem] == names_of(label_map, vocabulary)).all()
    # a second run would overwrite the export: refused before any model loads
    capsys.readouterr()
    assert infer_main([*argv, "-o", str(tmp_path / "run2"), "--export", "coco", "--export-out", str(dest)]) == 2
    assert str(dest) in capsys.readouterr().err and not (tmp_path / "run2").exists()

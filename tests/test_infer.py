"""infer.py end to end on a folder mixing real photos of several sizes and modes with broken files."""

import io
import json

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from autoseg.cli.infer import main

DEBUG_CONFIG = "configs/debug/pipeline.yaml"


def make_inputs(root):
    """A folder like a user's: photos in several modes and sizes, a sub-folder, a corrupt JPEG and a text file."""
    (root / "trip").mkdir(parents=True)
    Image.fromarray(skdata.astronaut()).resize((96, 80)).save(root / "astronaut.jpg")
    Image.fromarray(skdata.camera()).resize((70, 50)).save(root / "camera_gray.png")  # L
    Image.fromarray(skdata.coffee()).resize((60, 45)).convert("RGBA").save(root / "trip" / "coffee.png")
    Image.fromarray(skdata.chelsea()).resize((64, 48)).convert("P").save(root / "trip" / "cat_palette.png")
    deep = skdata.camera()[::8, ::8].astype(np.uint16) * 257
    Image.fromarray(deep).save(root / "deep16.png")  # I;16
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 80x40, shown rotated: 40 wide, 80 high
    Image.fromarray(skdata.rocket()).resize((80, 40)).save(root / "rotated.jpg", exif=exif.tobytes())
    buf = io.BytesIO()
    Image.fromarray(skdata.astronaut()).save(buf, "JPEG")
    (root / "broken.jpg").write_bytes(buf.getvalue()[:2000])
    (root / "notes.txt").write_text("holiday notes, not an image\n")
    good = {
        "astronaut": (96, 80),
        "camera_gray": (70, 50),
        "trip/coffee": (60, 45),
        "trip/cat_palette": (64, 48),
        "deep16": (64, 64),
        "rotated": (40, 80),
    }
    return good, ["broken", "notes"]


def run(inputs, out, blip, seg, *extra):
    return main(
        [
            str(inputs),
            "-o",
            str(out),
            "--config",
            DEBUG_CONFIG,
            "--blip",
            str(blip),
            "--segmenter",
            str(seg),
            "--seed",
            "3",
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, tiny_blip_dir, tiny_clipseg_dir):
    root = tmp_path_factory.mktemp("infer")
    good, bad = make_inputs(root / "in")
    code = run(root / "in", root / "out", tiny_blip_dir, tiny_clipseg_dir)
    return root, good, bad, code


def test_exit_status_is_1_when_some_inputs_fail(first_run):
    assert first_run[3] == 1


def test_every_good_image_has_its_three_outputs(first_run):
    root, good, _, _ = first_run
    out = root / "out"
    for stem, (w, h) in good.items():
        with Image.open(out / f"{stem}.png") as im:
            assert im.mode == "L" and im.size == (w, h)
            labels = np.asarray(im)
        record = json.loads((out / f"{stem}.json").read_text())
        vocab = record["vocabulary"]
        assert isinstance(vocab, list) and all(isinstance(v, str) and v for v in vocab)
        assert labels.max() <= len(vocab)
        # pixel fractions agree with the label map written next to them
        counts = np.bincount(labels.ravel(), minlength=len(vocab) + 1) / labels.size
        for i, name in enumerate(vocab):
            assert record["pixel_fraction"][name] == pytest.approx(counts[i + 1])
        assert sum(record["pixel_fraction"].values()) == pytest.approx(1.0)
        assert record["image"].endswith(stem.split("/")[-1] + (".jpg" if stem in ("astronaut", "rotated") else ".png"))
        with Image.open(out / f"{stem}_overlay.jpg") as ov:
            assert ov.width == w and ov.height >= h
    assert not list(out.rglob("*.tmp*"))  # atomic writes leave no temporaries


def test_manifest_lists_every_input(first_run):
    root, good, bad, _ = first_run
    manifest = json.loads((root / "out" / "manifest.json").read_text())
    status = {e["output"]: e for e in manifest["inputs"]}
    assert set(status) == set(good) | set(bad)
    assert all(status[s]["status"] == "ok" for s in good)
    for s in bad:
        assert status[s]["status"] == "error" and s in status[s]["reason"]
    assert not (root / "out" / "broken.png").exists() and not (root / "out" / "notes.json").exists()


def test_same_seed_gives_identical_outputs(first_run, tiny_blip_dir, tiny_clipseg_dir):
    root, good, _, _ = first_run
    assert run(root / "in", root / "again", tiny_blip_dir, tiny_clipseg_dir, "--batch-size", "3") == 1
    for stem in good:
        assert (root / "out" / f"{stem}.png").read_bytes() == (root / "again" / f"{stem}.png").read_bytes()
        a = json.loads((root / "out" / f"{stem}.json").read_text())
        b = json.loads((root / "again" / f"{stem}.json").read_text())
        assert a["vocabulary"] == b["vocabulary"] and a["captions"] == b["captions"]


def test_all_good_inputs_exit_0_and_skip_existing(first_run, tiny_blip_dir, tiny_clipseg_dir):
    root, _, _, _ = first_run
    single = root / "in" / "astronaut.jpg"
    out = root / "single"
    assert run(single, out, tiny_blip_dir, tiny_clipseg_dir) == 0
    before = (out / "astronaut.png").stat().st_mtime_ns
    assert run(single, out, tiny_blip_dir, tiny_clipseg_dir, "--skip-existing") == 0
    assert (out / "astronaut.png").stat().st_mtime_ns == before
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs"][0]["skipped"] is True


def test_usage_errors_exit_2(tmp_path, tiny_clipseg_dir, capsys):
    assert main([str(tmp_path / "nope"), "-o", str(tmp_path / "o")]) == 2
    assert "nope" in capsys.readouterr().err
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    code = main(
        [
            str(tmp_path / "x.png"),
            "-o",
            str(tmp_path / "o"),
            "--blip",
            str(tmp_path / "no_model"),
            "--segmenter",
            str(tiny_clipseg_dir),
        ]
    )
    assert code == 2
    assert "no_model" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["-o", str(tmp_path)])
    assert e.value.code == 2

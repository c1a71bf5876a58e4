"""Image reading (modes, EXIF, corrupt files), folder expansion and atomic writes."""

import io
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from autoseg.utils.io import ImageReadError, atomic_write, atomic_write_json, find_images, load_image


def exif_rotated_jpeg(path, size=(40, 20), orientation=6):
    im = Image.new("RGB", size, (200, 10, 10))
    im.paste((10, 10, 200), (0, 0, size[0] // 2, size[1]))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = orientation
    im.save(path, exif=exif.tobytes())


def test_exif_orientation_is_applied(tmp_path):
    exif_rotated_jpeg(tmp_path / "r.jpg")
    im = load_image(tmp_path / "r.jpg")
    assert im.size == (20, 40)  # orientation 6: rotate 90 degrees clockwise for display
    top, bottom = np.asarray(im)[2, 10], np.asarray(im)[-3, 10]
    assert top[2] > 150 and bottom[0] > 150  # the blue left half is now on top


def test_modes_are_converted_to_rgb(tmp_path):
    gray = Image.fromarray(np.full((8, 9), 77, np.uint8), "L")
    gray.save(tmp_path / "gray.png")
    deep = Image.fromarray(np.full((8, 9), 65535 // 2, np.uint16))
    deep.save(tmp_path / "deep.png")
    rgba = Image.new("RGBA", (8, 9), (255, 0, 0, 0))  # fully transparent: composited on white
    rgba.save(tmp_path / "rgba.png")
    pal = Image.new("RGB", (8, 9), (0, 128, 255)).convert("P", palette=Image.Palette.ADAPTIVE)
    pal.save(tmp_path / "pal.png")
    Image.new("CMYK", (8, 9), (0, 0, 0, 0)).save(tmp_path / "cmyk.jpg")
    got = {name: load_image(tmp_path / name) for name in ["gray.png", "deep.png", "rgba.png", "pal.png", "cmyk.jpg"]}
    assert all(im.mode == "RGB" for im in got.values())
    assert tuple(np.asarray(got["gray.png"])[0, 0]) == (77, 77, 77)
    assert abs(int(np.asarray(got["deep.png"])[0, 0, 0]) - 128) <= 1  # 16-bit mid-grey -> 8-bit mid-grey
    assert tuple(np.asarray(got["rgba.png"])[0, 0]) == (255, 255, 255)
    assert tuple(np.asarray(got["pal.png"])[0, 0]) == (0, 128, 255)
    assert np.asarray(got["cmyk.jpg"]).min() > 240  # no ink = white


def test_unreadable_files_raise_with_the_path(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    for name in ["notes.txt", "cut.jpg", "missing.png"]:
        with pytest.raises(ImageReadError, match=name):
            load_image(tmp_path / name)


def test_find_images_recurses_mirrors_subfolders_and_skips_hidden(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / ".cache").mkdir()
    for rel in ["x.jpg", "a/y.png", "a/b/z.txt", ".hidden.png", ".cache/w.png"]:
        (tmp_path / rel).write_bytes(b"")
    found = find_images([tmp_path])
    assert [str(stem) for _, stem in found] == ["a/b/z", "a/y", "x"]
    single = find_images([tmp_path / "a" / "y.png"])
    assert [str(stem) for _, stem in single] == ["y"]
    with pytest.raises(FileNotFoundError, match="nope"):
        find_images([tmp_path / "nope"])


def test_atomic_write_keeps_old_content_on_failure(tmp_path):
    target = tmp_path / "out.json"
    atomic_write_json(target, {"a": 1})

    def crash(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, crash)
    assert target.read_text() == '{\n  "a": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no temporary left behind


# ------------------------------------------------------------------ outputs kept apart from inputs


def test_check_apart_refuses_an_output_folder_that_is_in_or_around_an_input_folder(tmp_path):
    from autoseg.utils.io import check_apart

    img = tmp_path / "data" / "img"
    (img / "sub").mkdir(parents=True)
    for out in (img, img / "out", img / "sub" / "deep", tmp_path / "data", tmp_path):
        with pytest.raises(ValueError) as err:
            check_apart(out, [img], "input", "output folder")
        msg = str(err.value)
        assert str(out) in msg and str(img) in msg and "\n" not in msg, msg
    for out, how in ((img, "is"), (img / "out", "is inside"), (tmp_path, "contains")):
        with pytest.raises(ValueError, match=re.escape(f"o {out} {how} input folder {img}: ")):
            check_apart(out, [img], "input", "o")


def test_check_apart_allows_siblings_even_with_a_common_name_prefix(tmp_path):
    from autoseg.utils.io import check_apart

    (tmp_path / "a" / "img").mkdir(parents=True)
    (tmp_path / "a" / "img" / "x.png").write_bytes(b"")
    for out in (tmp_path / "a" / "img2", tmp_path / "a" / "im", tmp_path / "b" / "img", tmp_path / "a" / "img2" / "x"):
        check_apart(out, [tmp_path / "a" / "img", tmp_path / "a" / "img" / "x.png"], "input", "output folder")
    # a single file's folder may hold the output folder: only files given by name are read from there
    check_apart(tmp_path / "a" / "img" / "out", [tmp_path / "a" / "img" / "x.png"], "input", "output folder")


def test_check_apart_refuses_an_output_folder_holding_an_input_file(tmp_path):
    from autoseg.utils.io import check_apart

    (tmp_path / "in" / "sub").mkdir(parents=True)
    for rel in ("x.png", "sub/y.png"):
        (tmp_path / "in" / rel).write_bytes(b"")
        with pytest.raises(ValueError, match=r"holds input file .*" + rel):
            check_apart(tmp_path / "in", [tmp_path / "in" / rel], "input", "output folder")
    # a file that does not exist yet counts by its name
    with pytest.raises(ValueError, match="holds input file"):
        check_apart(tmp_path / "in", [tmp_path / "in" / "later.png"], "input", "output folder")


def test_check_apart_resolves_symbolic_links(tmp_path):
    from autoseg.utils.io import check_apart

    (tmp_path / "img").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "img")  # the same folder under another name
    (tmp_path / "img" / "x.png").write_bytes(b"")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "link.png").symlink_to(tmp_path / "img" / "x.png")
    cases = [
        (tmp_path / "alias", [tmp_path / "img"]),
        (tmp_path / "img", [tmp_path / "alias"]),
        (tmp_path / "alias" / "out", [tmp_path / "img"]),  # inside, through the alias
        (tmp_path / "img", [tmp_path / "elsewhere" / "link.png"]),  # a linked file whose target is in the output
    ]
    for out, inputs in cases:
        with pytest.raises(ValueError, match=re.escape(str(out))):
            check_apart(out, inputs, "input", "output folder")
    (tmp_path / "img" / "mine.png").symlink_to(tmp_path / "elsewhere" / "link.png")
    with pytest.raises(ValueError, match="mine.png"):  # a link kept in the output folder is in it too
        check_apart(tmp_path / "img", [tmp_path / "img" / "mine.png"], "input", "output folder")
    check_apart(tmp_path / "elsewhere" / "out", [tmp_path / "alias"], "input", "output folder")


def test_check_apart_names_what_the_caller_calls_its_folders(tmp_path):
    from autoseg.utils.io import check_apart

    (tmp_path / "ds").mkdir()
    with pytest.raises(ValueError, match=r"^predictions folder .* is inside dataset folder "):
        check_apart(tmp_path / "ds" / "pred", [tmp_path / "ds"], "dataset", "predictions folder")


def test_float_image_with_nan_pixels_keeps_the_finite_pixels_brightness(tmp_path):
    arr = np.array([[0.0, 1.0, 2.0, np.nan], [4.0, np.inf, -np.inf, 3.0]], np.float32)
    Image.fromarray(arr, mode="F").save(tmp_path / "f.tif")
    got = np.asarray(load_image(tmp_path / "f.tif"))[..., 0].astype(int)
    # normalised over the finite pixels (0 .. 4); the others are black
    np.testing.assert_array_equal(got, [[0, 64, 128, 0], [255, 0, 0, 191]])


def test_float_image_without_a_finite_pixel_is_refused(tmp_path):
    Image.fromarray(np.full((3, 4), np.nan, np.float32), mode="F").save(tmp_path / "nan.tif")
    with pytest.raises(ImageReadError, match=r"nan.tif: float image without a finite pixel"):
        load_image(tmp_path / "nan.tif")


def test_json_of_undecodable_file_names_is_utf8_and_reads_back_equal(tmp_path):
    from autoseg.utils.io import json_text

    name = os.fsdecode(b"bad\xff\xfe.png")  # how Python sees a Linux name that is not UTF-8
    obj = {"input": name, "café": ["über", name]}
    text = json_text(obj)
    assert "café" in text and "\\udcff\\udcfe" in text
    assert json.loads(text.encode("utf-8")) == obj
    atomic_write_json(tmp_path / "m.json", obj)
    assert json.loads((tmp_path / "m.json").read_text(encoding="utf-8")) == obj

"""Clips in the run's manifest and clip names apart from image names: infer.py on a folder holding images, videos, a
video with an image's name (``a.png`` + ``a.mp4``), a video named ``manifest`` and a broken video; resumed with
--skip-existing; the manifest's bookkeeping of added entries; the naming rule by hand."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from autoseg.cli.infer import main
from autoseg.data.shapes_scene import ShapesConfig
from autoseg.data.shapes_video import write_video_dataset
from autoseg.export.source import PredictionSource, Skipped
from autoseg.outputs import RunManifest, read_status_lines
from autoseg.run import unique_clip_names, unique_stems
from autoseg.utils.video import iter_video

DEBUG_CONFIG = "configs/debug/pipeline.yaml"
FRAMES = 3


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """``a.png`` (an image), ``a.mp4`` and ``manifest.mp4`` (clips of FRAMES frames), ``bad.mp4`` (not a video)."""
    root = tmp_path_factory.mktemp("mixed")
    data = write_video_dataset(root / "sv", 1, 5, FRAMES, ShapesConfig(size=64), progress=False)
    folder = root / "in"
    folder.mkdir()
    shutil.copy(data / "videos" / "clip_000000.mp4", folder / "a.mp4")
    shutil.copy(data / "videos" / "clip_000000.mp4", folder / "manifest.mp4")
    Image.open(data / "frames" / "clip_000000" / "000001.png").save(folder / "a.png")
    (folder / "bad.mp4").write_bytes(b"not a video at all")
    return folder


def run(inputs, out, blip, seg, *extra):
    argv = [str(inputs), "-o", str(out), "--config", DEBUG_CONFIG, "--blip", str(blip), "--segmenter", str(seg)]
    return main([*argv, "--seed", "3", "--key-every", "2", *extra])


def test_clips_are_listed_in_the_manifest_named_apart_from_images_and_resumed(
    inputs, tmp_path, tiny_blip_dir, tiny_clipseg_dir
):
    out = tmp_path / "out"
    assert run(inputs, out, tiny_blip_dir, tiny_clipseg_dir) == 1  # bad.mp4 failed, the others are done
    manifest = json.loads((out / "manifest.json").read_text())
    by_output = {e["output"]: e for e in manifest["inputs"]}
    assert set(by_output) == {"a", "a_mp4", "manifest", "bad"} and manifest["complete"] is True
    image, clip, named_manifest, bad = (by_output[k] for k in ("a", "a_mp4", "manifest", "bad"))
    assert "kind" not in image and image["input"].endswith("a.png") and image["status"] == "ok"
    assert clip["kind"] == "clip" and clip["input"].endswith("a.mp4") and clip["status"] == "ok"
    assert clip["frames"] == FRAMES and named_manifest["frames"] == FRAMES
    assert bad["kind"] == "clip" and bad["status"] == "error" and "bad.mp4" in bad["reason"]

    # the image keeps a.json; the clip writes a_mp4.json, a_mp4/ and a_mp4_overlay.mp4
    assert json.loads((out / "a.json").read_text())["image"].endswith("a.png")
    record = json.loads((out / "a_mp4.json").read_text())
    assert record["input"].endswith("a.mp4") and record["frames"] == list(range(FRAMES))
    assert clip["vocabulary"] == record["vocabulary"]
    assert sorted(p.name for p in (out / "a_mp4").iterdir()) == [f"{t:06d}.png" for t in range(FRAMES)]
    assert len(list(iter_video(out / "a_mp4_overlay.mp4"))) == FRAMES
    # the clip named "manifest" is written as manifest~ (as an image would be): the run's manifest stays its own
    assert json.loads((out / "manifest~.json").read_text())["input"].endswith("manifest.mp4")
    assert (out / "manifest~" / "000000.png").is_file() and (out / "manifest~_overlay.mp4").is_file()
    assert read_status_lines(out)["a_mp4"]["frames"] == FRAMES  # the status lines have the clips too

    # exporting reports the clips as skipped instead of reading them as images
    skipped = {s.stem: s.reason for s in PredictionSource(out) if isinstance(s, Skipped)}
    assert "a clip" in skipped["a_mp4"] and "not exported" in skipped["a_mp4"] and "bad.mp4" in skipped["bad"]

    # resumed: finished clips are kept and still listed with their frames; the broken one fails again
    before = (out / "a_mp4" / "000000.png").stat().st_mtime_ns
    assert run(inputs, out, tiny_blip_dir, tiny_clipseg_dir, "--skip-existing") == 1
    again = {e["output"]: e for e in json.loads((out / "manifest.json").read_text())["inputs"]}
    assert again["a_mp4"]["skipped"] is True and again["a_mp4"]["frames"] == FRAMES
    assert again["a_mp4"]["vocabulary"] == record["vocabulary"] and again["a"]["skipped"] is True
    assert again["bad"]["status"] == "error" and len(again) == 4
    assert (out / "a_mp4" / "000000.png").stat().st_mtime_ns == before


def test_added_entries_are_pending_until_recorded(tmp_path):
    image = {"input": "x.png", "output": "x", "status": "pending"}
    clip = {"input": "c.mp4", "output": "c", "kind": "clip", "status": "pending"}
    late = {"input": "d.mp4", "output": "d", "kind": "clip", "status": "pending"}

    def written():
        return json.loads((tmp_path / "manifest.json").read_text())

    with RunManifest(tmp_path) as run:
        run.add([clip])  # before start: listed in its first manifest
        run.start([image])
        assert [e["output"] for e in written()["inputs"]] == ["x", "c"] and written()["complete"] is False
        run.add([late])  # after start: the manifest is rewritten at once
        assert [e["status"] for e in written()["inputs"]] == ["pending"] * 3
        image.update(status="ok")
        run.record(image)
        run.finish()
        assert written()["complete"] is False  # the clips have no status yet
        for entry in (clip, late):
            entry.update(status="ok", frames=2)
            run.record(entry)
        run.finish()
    assert written()["complete"] is True and [e["frames"] for e in written()["inputs"][1:]] == [2, 2]
    assert set(read_status_lines(tmp_path)) == {"x", "c", "d"}


def test_clip_names_never_share_a_file_with_images_or_other_clips(tmp_path):
    video = tmp_path / "a.mp4"
    for name in ("a.mp4", "b.mp4", "e.mp4", "e.partial.mp4"):
        (tmp_path / name).write_bytes(b"")
    folder = tmp_path / "frames"
    folder.mkdir()
    stems = [Path("a"), Path("b.partial"), Path("c/000007"), Path("d/notes")]
    clips = [
        (video, Path("a")),  # a.png's a.json -> a_mp4
        (video, Path("a")),  # and a second one (a_mp4 taken too) -> a_2
        (tmp_path / "b.mp4", Path("b")),  # b.partial.png's b.partial.json would be b's partial file -> b_mp4
        (folder, Path("c")),  # image c/000007 lies among c's label maps -> c_2
        (folder, Path("d")),  # d/notes is no label map name: d is free
        (tmp_path / "e.mp4", Path("e")),
        (tmp_path / "e.partial.mp4", Path("e.partial")),  # e's partial file -> e.partial_mp4
    ]
    names = unique_clip_names(stems, clips)
    assert [n.as_posix() for n in names] == ["a_mp4", "a_2", "b_mp4", "c_2", "d", "e", "e.partial_mp4"]
    assert unique_clip_names(stems, clips) == names  # the same names on every run (--skip-existing finds them)
    # the images' own rule is unchanged: the later of a.jpg / a.png keeps its extension, then numbers
    files = [(Path("a.jpg"), Path("a")), (Path("a.png"), Path("a")), (Path("a.gif"), Path("a_png"))]
    files.append((Path("a"), Path("a")))  # no extension to keep: a number
    assert [s.as_posix() for s in unique_stems(files)] == ["a", "a_png", "a_png_gif", "a_2"]

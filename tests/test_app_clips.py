"""The demo page's short clip, called without a browser: a tiny ShapesWorld clip through the demo preset (the overlay
video decodes, in H.264, with one frame per segmented frame; the legend is the JSON vocabulary), bad clips, the
page's handlers (uploads removed, results cleared, folders released) and the command line's --clip-frames."""

import json
import tempfile
from pathlib import Path

import av
import numpy as np
import pytest

from autoseg.app.backend import DemoBackend, Settings, colours
from autoseg.app.clips import clip_legend, clip_rows, describe_clip, keep_clip, segment_upload
from autoseg.config import load_config
from autoseg.data.shapes_scene import ShapesConfig
from autoseg.data.shapes_video import write_video_dataset
from autoseg.outputs import palette
from autoseg.utils.video import VideoReadError

FRAMES, SEGMENTED = 6, 4  # the clip's frames; the page segments the first SEGMENTED


@pytest.fixture(autouse=True)
def temporary_files_in_tmp_path(tmp_path, monkeypatch):
    """Gradio's cache and uploads, and the backend's temporary folders, go under tmp_path."""
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


@pytest.fixture(scope="module")
def demo():
    from autoseg.api import build_pipeline

    config = load_config(preset="demo")
    return config, build_pipeline(config)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A ShapesWorld clip of FRAMES 64 px frames (H.264 MP4)."""
    root = write_video_dataset(tmp_path_factory.mktemp("sv"), 1, 31, FRAMES, ShapesConfig(size=64), progress=False)
    return root / "videos" / "clip_000000.mp4"


@pytest.fixture
def backend(demo, tmp_path):
    config, pipeline = demo
    b = DemoBackend(pipeline, config, out_root=tmp_path / "requests")
    yield b
    b.close()


def decoded(path: Path) -> tuple[str, str, list[np.ndarray]]:
    """``(codec, pixel format, frames)`` of a video, decoded with PyAV."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        codec, pix_fmt = stream.codec_context.name, stream.codec_context.pix_fmt
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    return codec, pix_fmt, frames


def test_a_clip_gives_an_overlay_video_browsers_play_and_the_json_vocabulary_as_legend(backend, clip):
    upload, first = keep_clip(backend, clip, "my clip.mp4")
    assert upload.size == (64, 64) == first.size and upload.fps == pytest.approx(10.0)
    assert upload.path.parent.parent == backend.out_root and upload.path.read_bytes() == clip.read_bytes()
    result = segment_upload(backend, upload, Settings(0, 2, 4, 1, 0.0), max_frames=SEGMENTED)

    codec, pix_fmt, frames = decoded(result.overlay)
    assert result.overlay.name == "my_clip_overlay.mp4" and (codec, pix_fmt) == ("h264", "yuv420p")
    head = result.overlay.read_bytes()
    assert 0 < head.find(b"moov") < head.find(b"mdat")  # faststart: a browser can play it while it downloads
    assert len(frames) == SEGMENTED == result.frames and frames[0].shape[1] == 64 and frames[0].shape[0] >= 64
    record = json.loads(result.files[1].read_text())
    assert result.files[1].name == "my_clip.json" and record["frames"] == list(range(SEGMENTED))
    assert record["vocabulary"] == result.vocabulary and len(result.vocabulary) >= 1
    legend, colour_of = clip_legend(result)
    assert [name for name, _ in legend] == record["vocabulary"] and list(colour_of) == record["vocabulary"]
    # one palette per name: the legend's colour is the overlay's (and the image views') colour of that label
    for i, name in enumerate(record["vocabulary"], start=1):
        assert colour_of[name] == "#{:02x}{:02x}{:02x}".format(*palette(len(result.vocabulary) + 1)[i])
    assert colour_of == colours(record["vocabulary"])
    # the table's shares are the JSON's per-frame shares averaged; the label maps are on disk
    rows = clip_rows(result)
    assert [r[0] for r in rows[: len(result.vocabulary)]] == result.vocabulary
    fractions = record["pixel_fraction"].values()
    name = result.vocabulary[0]
    assert rows[0][1] == pytest.approx(100 * sum(f[name] for f in fractions) / SEGMENTED, abs=0.06)
    assert rows[0][2] == f"{sum(f[name] > 0 for f in fractions)} of {SEGMENTED}"
    assert len(list((result.overlay.parent / "my_clip").glob("*.png"))) == SEGMENTED
    assert describe_clip(result).startswith(f"my clip.mp4: {len(result.vocabulary)} names: {name}")
    assert record["settings"]["seed"] == 0 and record["settings"]["max_frames"] == SEGMENTED

    for done in (upload, result):  # a session's files go with it
        backend.release(done)
    assert not upload.path.exists() and not result.overlay.exists()


def test_bad_clips_get_a_clear_message_and_leave_nothing(backend, clip, tmp_path):
    text = tmp_path / "upload1" / "notes.mp4"
    text.parent.mkdir()
    text.write_text("not a video")
    with pytest.raises(VideoReadError, match="cannot read video notes.mp4") as e:
        keep_clip(backend, text)
    assert str(tmp_path) not in str(e.value)  # neither the upload's nor the kept copy's server path
    with pytest.raises(VideoReadError, match=r"photo.gif: not a clip; upload a video file \(.mp4 .webm"):
        keep_clip(backend, clip, "photo.gif")
    backend.max_pixels = 64 * 64 - 1
    limit = r"big.mp4: frames are 64 x 64 = 4,096 pixels, more than the limit of 4,095 \(raise it with --max-pixels"
    with pytest.raises(VideoReadError, match=limit):
        keep_clip(backend, clip, "big.mp4")
    assert list(backend.out_root.iterdir()) == []  # no request folder left behind
    backend.max_pixels = None
    upload, _ = keep_clip(backend, clip)
    with pytest.raises(ValueError, match="frames per clip must be at least 1"):
        segment_upload(backend, upload, backend.defaults, max_frames=0)
    upload.path.write_bytes(b"broken since it was uploaded")
    with pytest.raises(VideoReadError, match="clip_000000.mp4") as e:
        segment_upload(backend, upload, backend.defaults, max_frames=2)
    assert str(backend.out_root) not in str(e.value)
    assert [p.name for p in backend.out_root.iterdir()] == [upload.path.parent.name]  # only the upload's folder


@pytest.fixture
def handlers(backend):
    pytest.importorskip("gradio", reason="the page needs the app extra: pip install -e '.[app]'")
    from autoseg.app.backend import sample_images
    from autoseg.app.page import Handlers

    return Handlers(backend, sample_images(), clip_frames=SEGMENTED)


def test_handlers_upload_segment_and_a_bad_clip_clears_the_results(handlers, clip):
    from gradio.utils import get_upload_folder

    def uploaded(name: str, data: bytes) -> Path:
        path = Path(get_upload_folder()) / name[:3] / name
        path.parent.mkdir(parents=True)
        path.write_bytes(data)
        return path

    none = handlers.run_clip(None, None, 0, 2, 4, 1, 0.0)
    assert none[-1] == "Upload a short clip first." and len(none) == 6
    path = uploaded("walk.mp4", clip.read_bytes())
    chosen, preview, status, *cleared = handlers.choose_clip(str(path), None, None)
    assert chosen.name == "walk.mp4" and preview.size == (64, 64) and not path.exists()  # the server's copy is gone
    assert status == f"walk.mp4: 64 x 64 px at 10 fps. Press Segment clip (its first {SEGMENTED} frames)."
    assert cleared == [None, None, None, [], None]
    bad_settings = handlers.run_clip(chosen, None, 0, 5, 4, 1, 0.0)
    assert "Check the settings: page settings: bboost.k_max: expected an integer in [k_min (5), 64]" in bad_settings[-1]
    result, video, legend, table, downloads, status = handlers.run_clip(chosen, None, 0, 2, 4, 1, 0.0)
    assert len(decoded(Path(video))[2]) == SEGMENTED and status.startswith("walk.mp4: ")
    assert [t["token"] for t in legend.value] == json.loads(Path(downloads[1]).read_text())["vocabulary"]
    assert legend.color_map == colours(result.vocabulary) and [Path(f).suffix for f in downloads] == [".mp4", ".json"]
    again = handlers.run_clip(chosen, result, 1, 2, 4, 1, 0.0)[0]  # a new run replaces the result's files
    assert not result.overlay.exists() and again.overlay.exists()

    bad = uploaded("oops.mp4", b"\x00" * 100)
    chosen2, preview, status, *cleared = handlers.choose_clip(str(bad), chosen, again)
    assert chosen2 is None and preview is None and status.startswith("Cannot use this clip: ")
    assert "oops.mp4" in status and cleared == [None, None, None, [], None] and not bad.exists()
    assert not chosen.path.exists() and not again.overlay.exists()  # the clip before and its results are released
    assert list(handlers.backend.out_root.iterdir()) == []


def test_page_has_the_clip_section_and_the_command_line_checks_clip_frames(backend, capsys):
    pytest.importorskip("gradio", reason="the page needs the app extra: pip install -e '.[app]'")
    from autoseg.app.backend import sample_images
    from autoseg.app.page import SESSION_SECONDS, build_page
    from autoseg.cli.app import build_parser, main

    page = build_page(backend, sample_images(), clip_frames=12)
    ids = {b.elem_id for b in page.blocks.values() if getattr(b, "elem_id", None)}
    assert {"clip-upload", "clip-preview", "run-clip", "clip-status", "clip-video", "clip-legend", "clip-names"} <= ids
    video = next(b for b in page.blocks.values() if getattr(b, "elem_id", None) == "clip-video")
    assert video.format is None  # shown as written (H.264 MP4): no conversion, no ffmpeg needed
    upload = next(b for b in page.blocks.values() if getattr(b, "elem_id", None) == "clip-upload")
    assert upload.file_types == [".mp4", ".webm", ".mov", ".mkv", ".avi"]
    states = [b for b in page.blocks.values() if type(b).__name__ == "State"]
    assert len(states) == 4 and all(s.time_to_live == SESSION_SECONDS for s in states)
    assert sum(s.delete_callback is not None and s.delete_callback.__name__ == "release" for s in states) == 3
    markdown = " ".join(b.value for b in page.blocks.values() if type(b).__name__ == "Markdown")
    assert "its first 12 frames are segmented with one vocabulary" in markdown
    assert build_parser().parse_args([]).clip_frames == 48
    assert main(["--clip-frames", "0"]) == 2
    assert "--clip-frames must be a positive number of frames, got 0" in capsys.readouterr().err

"""SAM 3's video model on clips with a tiny random model saved like ``facebook/sam3`` (a ``sam3_video`` folder): the
chunked tracker equals transformers' pre-loaded-video run and its state stops growing, infer.py writes label maps,
tracks and the overlay, and a killed clip resumes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from autoseg.cli.infer import main
from autoseg.data.shapes_scene import ShapesConfig
from autoseg.data.shapes_video import write_video_dataset
from autoseg.models import scratch
from autoseg.models.segmenters.sam3_video import BoundedSession, Sam3ClipTracker, load_video_model, paint_objects
from autoseg.utils.video import ClipSource, iter_video
from autoseg.video import DEFAULT_SMOOTHING
from autoseg.video import outputs as clip_outputs

DEBUG_CONFIG = "configs/debug/pipeline.yaml"
FRAMES = 6
NAMES = ["circle", "square"]


@pytest.fixture(scope="module")
def sam3_video_dir(tmp_path_factory):
    torch.manual_seed(0)
    return scratch.save(*scratch.make_sam3_video(words=NAMES), tmp_path_factory.mktemp("sam3v") / "model")


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    return write_video_dataset(tmp_path_factory.mktemp("sv"), 1, 5, 12, ShapesConfig(size=64), progress=False)


def test_chunked_tracker_equals_the_preloaded_run_and_its_state_stops_growing(sam3_video_dir, clips):
    model, processor = load_video_model(str(sam3_video_dir))  # how infer.py loads it, by path
    frames = list(ClipSource(clips / "frames" / "clip_000000", "c").frames())
    tracker = Sam3ClipTracker(model, processor, chunk=5, horizon=len(frames))
    ours = list(tracker.track(frames, NAMES))
    # transformers' documented way: the whole video in the session, propagate_in_video_iterator
    session = processor.init_video_session(video=[im for _, im in frames], inference_device="cpu")
    processor.add_text_prompt(session, NAMES)
    seen = 0
    for out in model.propagate_in_video_iterator(inference_session=session):
        label_map, objects = paint_objects(processor.postprocess_outputs(session, out), session.obj_id_to_prompt_id)
        assert ours[out.frame_idx].index == out.frame_idx and np.array_equal(ours[out.frame_idx].label_map, label_map)
        assert ours[out.frame_idx].objects == objects
        seen += 1
    assert seen == len(frames) == 12 and any(f.objects for f in ours) and any(f.label_map.any() for f in ours)
    # transformers' session holds every frame; ours the current one, the memory of 4 frames and a conditioning frame
    assert BoundedSession.frames_held(session) == 12 and tracker.peak_frames_held == 4 + 1 + 1
    assert BoundedSession.state_bytes(session) > tracker.peak_state_bytes


def run(inputs, out, blip, seg, *extra):
    argv = [str(inputs), "-o", str(out), "--config", DEBUG_CONFIG, "--blip", str(blip), "--segmenter", str(seg)]
    return main([*argv, "--segmenter-backend", "sam3", "--seed", "3", "--key-every", "2", *extra])


def read(folder, name):
    record = json.loads((folder / f"{name}.json").read_text())
    maps = [np.asarray(Image.open(folder / name / f"{t:06d}.png")) for t in record["frames"]]
    return record, maps


def test_infer_tracks_a_clip_with_the_video_model(clips, tmp_path, tiny_blip_dir, sam3_video_dir):
    out = tmp_path / "out"
    assert run(clips / "videos", out, tiny_blip_dir, sam3_video_dir, "--chunk", "4", "--max-frames", "7") == 0
    record, maps = read(out, "clip_000000")
    names, tracks = record["vocabulary"], record["tracks"]
    assert record["frames"] == list(range(7)) and len(maps) == 7
    assert record["settings"]["smoothing"] is None and record["settings"]["tracker"] == {
        "model": "sam3_video",
        "chunk": 4,
    }
    assert names and tracks and any(m.any() for m in maps)
    for track in tracks.values():
        first, last = track["frames"]
        assert track["name"] in names and 0 <= first <= last < 7 and 1 <= track["n"] <= last - first + 1
    for t, m in enumerate(maps):  # every labelled pixel belongs to a track of that name running on frame t
        assert m.shape == (64, 64)
        running = {names.index(k["name"]) + 1 for k in tracks.values() if k["frames"][0] <= t <= k["frames"][1]}
        assert set(np.unique(m).tolist()) - {0} <= running
        counts = np.bincount(m.ravel(), minlength=len(names) + 1) / m.size
        assert record["pixel_fraction"][str(t)]["<unlabelled>"] == pytest.approx(counts[0])
    assert len(list(iter_video(out / "clip_000000_overlay.mp4"))) == 7
    assert not (out / "clip_000000.partial.json").exists()
    # --no-track: the same SAM 3 frame by frame (semantic, smoothed), no tracks
    plain = tmp_path / "plain"
    assert run(clips / "videos", plain, tiny_blip_dir, sam3_video_dir, "--no-track", "--max-frames", "3") == 0
    record = json.loads((plain / "clip_000000.json").read_text())
    assert "tracks" not in record and record["settings"]["smoothing"] == pytest.approx(DEFAULT_SMOOTHING)


@pytest.mark.parametrize("chunk,kill,restart", [(4, 2, 0), (2, 5, 4)])
def test_a_killed_tracked_clip_resumes_complete(
    chunk, kill, restart, clips, tmp_path, tiny_blip_dir, sam3_video_dir, monkeypatch
):
    video = clips / "videos" / "clip_000000.mp4"
    extra = ["--chunk", str(chunk), "--max-frames", str(FRAMES)]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert run(video, whole, tiny_blip_dir, sam3_video_dir, *extra) == 0
    original = clip_outputs.ClipOutputs.write_frame

    def killed(self, index, label_map, n_names):
        if index == kill:
            raise KeyboardInterrupt
        original(self, index, label_map, n_names)

    monkeypatch.setattr(clip_outputs.ClipOutputs, "write_frame", killed)
    with pytest.raises(KeyboardInterrupt):
        run(video, resumed, tiny_blip_dir, sam3_video_dir, *extra)
    partial = json.loads((resumed / "clip_000000.partial.json").read_text())
    assert partial.get("tracked_chunks", 0) * chunk == restart  # chunks whose label maps are all written
    folder = resumed / "clip_000000"
    before = {t: (folder / f"{t:06d}.png").stat().st_mtime_ns for t in range(kill)}
    monkeypatch.setattr(clip_outputs.ClipOutputs, "write_frame", original)
    assert run(video, resumed, tiny_blip_dir, sam3_video_dir, *extra, "--skip-existing") == 0
    assert {t: (folder / f"{t:06d}.png").stat().st_mtime_ns for t in range(kill)} == before  # kept
    (a, first), (b, again) = read(whole, "clip_000000"), read(resumed, "clip_000000")
    assert b["frames"] == list(range(FRAMES)) and len(again) == FRAMES and b["vocabulary"] == a["vocabulary"]
    assert len(list(iter_video(resumed / "clip_000000_overlay.mp4"))) == FRAMES
    assert all(k["frames"][1] < FRAMES for k in b["tracks"].values())
    if restart == 0:  # tracking restarted at frame 0: the same run as without the kill
        assert b["tracks"] == a["tracks"] and all(np.array_equal(x, y) for x, y in zip(first, again, strict=True))
    else:  # tracks before the restart kept, those after it numbered on
        saved = partial["tracks"]
        assert all(b["tracks"][k] == v for k, v in saved.items())
        assert any(int(k) > max(map(int, saved)) and v["frames"][0] >= restart for k, v in b["tracks"].items())

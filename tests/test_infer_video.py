"""infer.py on videos and --clips folders with tiny random models: per-clip outputs, one vocabulary, smoothing,
resuming a killed clip, a broken video beside a good one, and eval.py scoring the outputs."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from test_eval import main as eval_main

from autoseg.cli.infer import main
from autoseg.data.shapes_scene import ShapesConfig
from autoseg.data.shapes_video import write_video_dataset
from autoseg.utils.video import ClipSource, iter_video
from autoseg.video import outputs as clip_outputs
from autoseg.video.smoothing import LogitAverage, frame_tensor, warmup_frames
from autoseg.video.vocabulary import VocabularyOptions, merge_names

DEBUG_CONFIG = "configs/debug/pipeline.yaml"
FRAMES = 6


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    return write_video_dataset(tmp_path_factory.mktemp("sv"), 2, 11, FRAMES, ShapesConfig(size=64), progress=False)


def run(inputs, out, blip, seg, *extra):
    argv = [str(inputs), "-o", str(out), "--config", DEBUG_CONFIG, "--blip", str(blip), "--segmenter", str(seg)]
    return main([*argv, "--seed", "3", "--key-every", "2", *extra])


def label_maps(folder, frames):
    return [np.asarray(Image.open(folder / f"{t:06d}.png")) for t in frames]


def test_videos_give_one_vocabulary_label_maps_per_frame_and_an_overlay_video(
    clips, tmp_path, tiny_blip_dir, tiny_clipseg_dir
):
    out = tmp_path / "out"
    assert run(clips / "videos", out, tiny_blip_dir, tiny_clipseg_dir) == 0
    for name in ("clip_000000", "clip_000001"):
        record = json.loads((out / f"{name}.json").read_text())
        vocabulary = record["vocabulary"]
        assert record["frames"] == list(range(FRAMES)) and record["fps"] == pytest.approx(10.0)
        assert record["key_frames"][0] == 0 and set(record["key_frames"]) >= {0, 2, 4}
        maps = label_maps(out / name, range(FRAMES))
        for t, m in enumerate(maps):
            assert m.shape == (64, 64) and int(m.max()) <= len(vocabulary)
            counts = np.bincount(m.ravel(), minlength=len(vocabulary) + 1) / m.size
            assert record["pixel_fraction"][str(t)]["<unlabelled>"] == pytest.approx(counts[0])
            for i, n in enumerate(vocabulary):
                assert record["pixel_fraction"][str(t)][n] == pytest.approx(counts[i + 1])
        overlay = list(iter_video(out / f"{name}_overlay.mp4"))
        assert len(overlay) == FRAMES and overlay[0][1].width == 64 and overlay[0][1].height >= 64  # + legend
        assert not (out / f"{name}.partial.json").exists()
    # eval.py reads what infer.py wrote
    report = tmp_path / "report.json"
    argv = ["--dataset", "video-folder", "--root", str(clips), "--predictions", str(out), "--mapper", "exact"]
    assert eval_main([*argv, "--report", str(report), "--no-progress"]) == 0
    scored = json.loads(report.read_text())
    assert scored["n_frames"] == 2 * FRAMES and scored["missing_predictions"] == []


def test_clip_folders_with_stride_and_max_frames(clips, tmp_path, tiny_blip_dir, tiny_clipseg_dir):
    out = tmp_path / "out"
    extra = ["--clips", "--stride", "2", "--max-frames", "2", "--fps", "8"]
    assert run(clips / "frames", out, tiny_blip_dir, tiny_clipseg_dir, *extra) == 0
    record = json.loads((out / "clip_000001.json").read_text())
    assert record["frames"] == [0, 2] and record["fps"] == pytest.approx(4.0)
    assert sorted(p.name for p in (out / "clip_000001").iterdir()) == ["000000.png", "000002.png"]
    assert len(list(iter_video(out / "clip_000001_overlay.mp4"))) == 2


def test_without_smoothing_every_frame_is_the_image_path_with_the_clip_vocabulary(
    clips, tiny_blip_dir, tiny_clipseg_dir
):
    import autoseg

    pipeline = autoseg.load(DEBUG_CONFIG, blip=str(tiny_blip_dir), segmenter=str(tiny_clipseg_dir))
    source = ClipSource(clips / "frames" / "clip_000000", "clip_000000")
    names = ["circle", "sky", "grass"]
    frames = list(source.frames())
    got = [m for _, _, m in pipeline.segment_frames(frames, names, smoothing=0.0)]
    expected = [p.label_map for p in pipeline([im for _, im in frames], vocabulary=names)]
    assert len(got) == FRAMES and all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))
    smoothed = [m for _, _, m in pipeline.segment_frames(frames, names, smoothing=0.9)]
    assert np.array_equal(smoothed[0], expected[0])  # the average starts at the first frame


def test_still_pixels_are_averaged_and_moving_ones_follow_the_frame():
    average = LogitAverage(0.5, motion=25.0)
    still = torch.zeros(3, 4, 4)
    moved = still.clone()
    moved[:, :, 2:] = 200.0  # the right half of the frame changes colour
    a, b = torch.full((1, 4, 4), 4.0), torch.zeros(1, 4, 4)
    assert torch.equal(average(a, still), a)
    out = average(b, moved)
    assert torch.equal(out[0, :, :2], torch.full((4, 2), 2.0))  # still: 0.5 * 4 + 0.5 * 0
    assert torch.equal(out[0, :, 2:], torch.zeros(4, 2))  # moved: the new frame's logits alone
    again = average(a, moved)  # nothing moved since: every pixel averaged
    assert torch.equal(again[0, :, :2], torch.full((4, 2), 3.0)) and torch.equal(
        again[0, :, 2:], torch.full((4, 2), 2.0)
    )
    with pytest.raises(ValueError, match="motion"):
        LogitAverage(0.5, motion=0.0)


def test_logit_average_and_merge_rule_by_hand():
    average = LogitAverage(0.5)
    a, b = torch.full((1, 2, 2), 4.0), torch.full((1, 2, 2), 0.0)
    assert average(a)[0, 0, 0] == 4.0 and average(b)[0, 0, 0] == 2.0 and average(b)[0, 0, 0] == 1.0
    assert warmup_frames(0.5) == 7 and 0.5**7 < 0.01 < 0.5**6 and warmup_frames(0.0) == 0
    found = [{"dog": 0.5, "hat": 0.01}, {"dog": 0.4, "sky": 0.3}, {"grass": 0.02, "sky": 0.2}]
    # dog and sky recur; hat and grass are seen once on a small area
    assert merge_names(found, VocabularyOptions(min_key_frames=2, min_area=0.1)) == ["dog", "sky"]
    assert merge_names(found, VocabularyOptions(min_key_frames=2, min_area=0.015)) == ["dog", "sky", "grass"]
    assert merge_names(found[:1], VocabularyOptions(min_key_frames=2, min_area=0.5)) == ["dog", "hat"]


def test_a_killed_clip_resumes_with_the_same_outputs(clips, tmp_path, tiny_blip_dir, tiny_clipseg_dir, monkeypatch):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    video = clips / "videos" / "clip_000000.mp4"
    assert run(video, whole, tiny_blip_dir, tiny_clipseg_dir) == 0
    original = clip_outputs.ClipOutputs.write_frame
    written = []

    def dies_at_frame_4(self, index, label_map, n_names):
        if index == 4:
            raise KeyboardInterrupt  # killed while segmenting
        written.append(index)
        original(self, index, label_map, n_names)

    monkeypatch.setattr(clip_outputs.ClipOutputs, "write_frame", dies_at_frame_4)
    with pytest.raises(KeyboardInterrupt):
        run(video, resumed, tiny_blip_dir, tiny_clipseg_dir)
    assert written == [0, 1, 2, 3] and not (resumed / "clip_000000.json").exists()
    assert (resumed / "clip_000000.partial.json").exists()
    before = {t: (resumed / "clip_000000" / f"{t:06d}.png").stat().st_mtime_ns for t in range(4)}
    monkeypatch.setattr(clip_outputs.ClipOutputs, "write_frame", original)
    assert run(video, resumed, tiny_blip_dir, tiny_clipseg_dir, "--skip-existing") == 0
    assert {t: (resumed / "clip_000000" / f"{t:06d}.png").stat().st_mtime_ns for t in range(4)} == before
    a, b = json.loads((whole / "clip_000000.json").read_text()), json.loads((resumed / "clip_000000.json").read_text())
    assert a["vocabulary"] == b["vocabulary"] and a["pixel_fraction"] == b["pixel_fraction"]
    first, again = label_maps(whole / "clip_000000", range(FRAMES)), label_maps(resumed / "clip_000000", range(FRAMES))
    assert all(np.array_equal(x, y) for x, y in zip(first, again, strict=True))
    assert len(list(iter_video(resumed / "clip_000000_overlay.mp4"))) == FRAMES
    record = (resumed / "clip_000000.json").stat().st_mtime_ns
    assert run(video, resumed, tiny_blip_dir, tiny_clipseg_dir, "--skip-existing") == 0  # a finished clip is kept
    assert (resumed / "clip_000000.json").stat().st_mtime_ns == record


def test_a_broken_video_is_reported_and_the_others_are_segmented(
    clips, tmp_path, tiny_blip_dir, tiny_clipseg_dir, capsys
):
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "good.mp4").write_bytes((clips / "videos" / "clip_000001.mp4").read_bytes())
    (inputs / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video")
    assert run(inputs, tmp_path / "out", tiny_blip_dir, tiny_clipseg_dir) == 1
    err = capsys.readouterr().err
    assert "broken.mp4" in err and "good" not in err
    assert json.loads((tmp_path / "out" / "good.json").read_text())["frames"] == list(range(FRAMES))
    assert not (tmp_path / "out" / "broken.json").exists()


def test_frame_tensor_is_the_image_as_float_channels_without_a_warning():
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch.from_numpy of a PIL image's read-only array warned here
        out = frame_tensor(Image.fromarray(rgb))
    assert out.dtype == torch.float32 and out.shape == (3, 5, 7)
    assert np.array_equal(out.numpy(), rgb.transpose(2, 0, 1).astype(np.float32))

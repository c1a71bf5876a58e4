"""ShapesWorld video: determinism, masks against the drawn pixels, motions (enter, leave, drift), the written layout
and the mp4 decoding to the same frames."""

from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image
from scipy.ndimage import maximum_filter, minimum_filter

from autoseg.data import shapes
from autoseg.data.shapes_scene import COLOURS, STUFF_COLOURS, ShapesConfig
from autoseg.data.shapes_video import clip_name, render_clip, sample_clip, thing_at
from autoseg.utils.video import iter_video, video_fps

SMALL = ShapesConfig(size=64, supersample=2)


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_same_seed_same_frames_other_seed_differs():
    a = [(png_bytes(i), m.tobytes()) for i, m in render_clip(5, 1, 4, SMALL)]
    b = [(png_bytes(i), m.tobytes()) for i, m in render_clip(5, 1, 4, SMALL)]
    c = [(png_bytes(i), m.tobytes()) for i, m in render_clip(6, 1, 4, SMALL)]
    assert a == b
    assert a != c
    assert len({m for _, m in a}) > 1  # the masks change over the clip: things move


def test_masks_match_the_drawn_pixels_in_every_frame():
    """Flat colours: every pixel inside a region (5 x 5 neighbourhood of one class) has its class's colour."""
    config = ShapesConfig(size=64, supersample=2, textured=False)
    clip = sample_clip(2, 0, 5, config)
    allowed: dict[int, set[tuple[int, ...]]] = {}
    for cid, name in enumerate(config.classes):
        if name in STUFF_COLOURS:
            allowed[cid] = {STUFF_COLOURS[name]}
        else:
            allowed[cid] = {COLOURS[t.colour] for t in clip.scene.things if t.shape == name}
    checked = 0
    for image, mask in render_clip(2, 0, 5, config):
        rgb = np.asarray(image)
        interior = minimum_filter(mask, 5) == maximum_filter(mask, 5)
        for y, x in zip(*np.nonzero(interior), strict=True):
            assert tuple(int(v) for v in rgb[y, x]) in allowed[int(mask[y, x])]
            checked += 1
    assert checked > 5 * 64 * 64 * 0.5


def test_leaving_things_leave_and_entering_things_enter():
    size, frames = 64, 12
    modes = set()
    for index in range(12):
        clip = sample_clip(0, index, frames, SMALL)
        for thing, motion in zip(clip.scene.things, clip.motions, strict=True):
            modes.add(motion.mode)
            first, last = thing_at(thing, motion, 0, frames, size), thing_at(thing, motion, frames - 1, frames, size)
            for t in (first, last):
                assert abs(t.angle - thing.angle) <= 0.06 * frames + 1e-9
            outside = [
                p.cx < -p.radius or p.cx > size + p.radius or p.cy < -p.radius or p.cy > size + p.radius
                for p in (first, last)
            ]
            if motion.mode == "leave":
                assert outside == [False, True] and (first.cx, first.cy) == (thing.cx, thing.cy)
            elif motion.mode == "enter":
                assert outside == [True, False] and (last.cx, last.cy) == (thing.cx, thing.cy)
            else:  # drifting things stay where still scenes put them: at most a quarter of the radius outside
                for p in (first, last):
                    lo, hi = 0.75 * p.radius - 1e-6, size - 0.75 * p.radius + 1e-6
                    assert lo <= p.cx <= hi and lo <= p.cy <= hi
    assert modes == {"drift", "enter", "leave"}


def test_cli_writes_frames_masks_classes_and_a_video_of_the_same_frames(tmp_path):
    out = tmp_path / "sv"
    argv = ["--video", "--frames", "6", "--fps", "5", "--seed", "4", "--n", "2", "--size", "64", "--out", str(out)]
    assert shapes.main(argv) == 0
    assert (out / "classes.txt").read_text().split() == list(ShapesConfig().classes)
    assert json.loads((out / "shapesworld.json").read_text())["frames"] == 6
    for index in range(2):
        name = clip_name(index)
        frames = sorted((out / "frames" / name).glob("*.png"))
        masks = sorted((out / "masks" / name).glob("*.png"))
        assert [p.name for p in frames] == [f"{t:06d}.png" for t in range(6)] == [p.name for p in masks]
        expected = list(render_clip(4, index, 6, ShapesConfig(size=64)))
        for t, (image, mask) in enumerate(expected):
            assert np.array_equal(np.asarray(Image.open(frames[t])), np.asarray(image))
            assert np.array_equal(np.asarray(Image.open(masks[t])), mask)
        video = out / "videos" / f"{name}.mp4"
        decoded = list(iter_video(video))
        assert [i for i, _ in decoded] == list(range(6))
        assert abs(video_fps(video) - 5.0) < 1e-6
        for (_, got), (image, _) in zip(decoded, expected, strict=True):  # lossy H.264, but the same picture
            diff = np.abs(np.asarray(got, np.float64) - np.asarray(image, np.float64))
            assert got.size == image.size and diff.mean() < 12.0

"""ShapesWorld video: seeded clips of ShapesWorld scenes whose things move, rotate, enter and leave the frame.

A clip starts from a ShapesWorld scene (:func:`autoseg.data.shapes_scene.sample_scene`); the stuff layout and the
camera stay fixed while every thing follows its own :class:`Motion`:

- ``drift``: constant velocity, bouncing off the borders it may only slightly cross (as in still scenes);
- ``leave``: starts where the still scene put it and leaves the frame for good during the clip;
- ``enter``: the time-reverse of ``leave`` (it is outside at first and ends where the scene put it).

Every thing also spins at a constant rate. Each frame is drawn by the still renderer
(:func:`autoseg.data.shapes_scene.render_scene`) from a fresh ``numpy.random.default_rng([seed, index, 1])``, so
textures and shading are identical across frames and only the geometry moves; mask and image of a frame come from
the same supersampled label map, exactly as for still images. Moving things may occlude each other more than
``ShapesConfig.min_visible`` allows in still scenes.

Output (read by ``autoseg.data.video_datasets.video_folder``)::

    DIR/classes.txt                    one class name per line; mask value = 0-based line number
    DIR/videos/NAME.mp4                H.264 at ``fps`` (lossy: the PNG frames are the exact pixels)
    DIR/frames/NAME/000000.png ...     RGB frames, frame index with 6 digits
    DIR/masks/NAME/000000.png ...      single-channel uint8 masks of the same frames
    DIR/shapesworld.json               seed, indices, frames, fps and the generator config

Clip ``i`` of seed ``s`` (named ``clip_00000i``) uses ``numpy.random.default_rng([s, i])`` for its scene and
motions, so any clip is reproducible on its own; its motions depend on the number of frames (enter/leave timing).
CLI: ``python -m autoseg.data.shapes --video --frames F --seed S --n N --out DIR [--fps FPS]``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from autoseg.data.shapes_scene import GENERATOR_VERSION, Scene, ShapesConfig, Thing, render_scene, sample_scene
from autoseg.utils.io import atomic_write_json, atomic_write_text, save_image_atomic
from autoseg.utils.video import VideoWriter

MOTION_MODES = ("drift", "enter", "leave")
MOTION_WEIGHTS = (0.6, 0.2, 0.2)
MAX_SPEED = 1.2  # pixels per frame at 128 px (scaled with the size)
MAX_SPIN = 0.06  # radians per frame


@dataclass(frozen=True)
class Motion:
    """How one thing moves: velocity ``(vx, vy)`` in pixels per frame, ``spin`` in radians per frame, ``mode`` one
    of ``MOTION_MODES``."""

    vx: float
    vy: float
    spin: float
    mode: str = "drift"


@dataclass
class Clip:
    """A ShapesWorld clip: the still scene (positions at the reference frame), one motion per thing, its length."""

    scene: Scene
    motions: list[Motion]
    frames: int


def clip_name(index: int) -> str:
    """Name of clip ``index`` (folder and file stem)."""
    return f"clip_{index:06d}"


def _exit_distance(cx: float, cy: float, dx: float, dy: float, radius: float, size: int) -> float:
    """Distance along the unit direction ``(dx, dy)`` after which a shape of ``radius`` centred at ``(cx, cy)`` is
    completely outside the ``size x size`` frame."""
    steps = []
    for c, d in ((cx, dx), (cy, dy)):
        if d > 1e-9:
            steps.append((size + radius - c) / d)
        elif d < -1e-9:
            steps.append((c + radius) / -d)
    return min(steps)


def sample_motion(thing: Thing, frames: int, size: int, rng: np.random.Generator) -> Motion:
    """Draw the motion of ``thing`` over a clip of ``frames`` frames (see the module docstring)."""
    mode = str(rng.choice(MOTION_MODES, p=MOTION_WEIGHTS))
    spin = float(rng.uniform(-MAX_SPIN, MAX_SPIN))
    a = rng.uniform(0.0, 2.0 * np.pi)
    dx, dy = math.cos(a), math.sin(a)
    if mode == "drift" or frames < 2:
        speed = rng.uniform(0.2, 1.0) * MAX_SPEED * size / 128
        return Motion(vx=speed * dx, vy=speed * dy, spin=spin, mode="drift")
    # out of the frame after a fraction of the clip, and never back
    distance = _exit_distance(thing.cx, thing.cy, dx, dy, thing.radius, size)
    speed = distance / (rng.uniform(0.4, 0.9) * (frames - 1))
    return Motion(vx=speed * dx, vy=speed * dy, spin=spin, mode=mode)


def _bounce(x: float, lo: float, hi: float) -> float:
    """``x`` reflected into ``[lo, hi]`` (a triangle wave)."""
    if hi <= lo:
        return lo
    period = 2.0 * (hi - lo)
    r = (x - lo) % period
    return lo + (r if r <= hi - lo else period - r)


def thing_at(thing: Thing, motion: Motion, t: int, frames: int, size: int) -> Thing:
    """``thing`` moved to frame ``t`` of a clip of ``frames`` frames."""
    if motion.mode == "enter":
        t = frames - 1 - t  # the time-reverse of leaving: at its scene position on the last frame
    cx, cy = thing.cx + motion.vx * t, thing.cy + motion.vy * t
    if motion.mode == "drift":
        lo, hi = 0.75 * thing.radius, size - 0.75 * thing.radius
        cx, cy = _bounce(cx, lo, hi), _bounce(cy, lo, hi)
    return replace(thing, cx=cx, cy=cy, angle=thing.angle + motion.spin * t)


def sample_clip(seed: int, index: int, frames: int, config: ShapesConfig) -> Clip:
    """The scene and motions of clip ``index`` of ``seed`` (``frames`` frames)."""
    if seed < 0 or index < 0 or frames < 1:
        raise ValueError(f"seed={seed} and index={index} must be >= 0 and frames={frames} >= 1")
    rng = np.random.default_rng([seed, index])
    scene = sample_scene(rng, config)
    motions = [sample_motion(t, frames, config.size, rng) for t in scene.things]
    return Clip(scene=scene, motions=motions, frames=frames)


def render_clip(
    seed: int, index: int, frames: int, config: ShapesConfig | None = None
) -> Iterator[tuple[Image.Image, np.ndarray]]:
    """Draw clip ``index`` of ``seed`` frame by frame.

    Yields:
        ``(image, mask)`` per frame: RGB PIL image ``S x S`` and ``S x S`` uint8 mask indexing ``config.classes``.
    """
    config = config or ShapesConfig()
    clip = sample_clip(seed, index, frames, config)
    for t in range(frames):
        moved = zip(clip.scene.things, clip.motions, strict=True)
        scene = replace(clip.scene, things=[thing_at(th, m, t, frames, config.size) for th, m in moved])
        yield render_scene(scene, config, np.random.default_rng([seed, index, 1]))  # same textures every frame


def write_video_dataset(
    out: str | Path,
    n: int,
    seed: int,
    frames: int,
    config: ShapesConfig | None = None,
    fps: float = 10.0,
    start: int = 0,
    progress: bool = True,
) -> Path:
    """Write clips ``start .. start + n - 1`` of ``seed``, ``frames`` frames each, into ``out`` (layout in the
    module docstring). Every file is written atomically; the video is encoded while the frames are drawn.

    Returns:
        ``out`` as a Path.
    """
    config = config or ShapesConfig()
    if n < 0 or start < 0 or seed < 0 or frames < 1 or fps <= 0:
        raise ValueError(f"n={n}, start={start}, seed={seed} must be >= 0, frames={frames} >= 1 and fps={fps} > 0")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "classes.txt", "\n".join(config.classes) + "\n")
    meta = {
        "generator": "autoseg.data.shapes_video",
        "version": GENERATOR_VERSION,
        "seed": seed,
        "start": start,
        "n": n,
        "frames": frames,
        "fps": fps,
        "config": asdict(config),
    }
    atomic_write_json(out / "shapesworld.json", meta)
    bar = tqdm(total=n * frames, desc=f"ShapesWorld video -> {out}", unit="frame", disable=not progress)
    for index in range(start, start + n):
        name = clip_name(index)
        with VideoWriter(out / "videos" / f"{name}.mp4", fps=fps) as video:
            for t, (image, mask) in enumerate(render_clip(seed, index, frames, config)):
                save_image_atomic(out / "frames" / name / f"{t:06d}.png", image)
                save_image_atomic(out / "masks" / name / f"{t:06d}.png", Image.fromarray(mask, mode="L"))
                video.write(image)
                bar.update()
    bar.close()
    return out

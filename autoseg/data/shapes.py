"""ShapesWorld: a seeded synthetic domain of textured "stuff" and simple "things", with exact masks and captions.

Each image shows 1-3 stuff regions stacked top to bottom (e.g. sky above a wavy horizon, water, then sand), each
filled with a procedural numpy texture, and 1-4 solid-coloured things (circle, square, triangle, star, cross, ...)
with random sizes, rotations and partial occlusion. The domain is built to be learnable from scratch by tiny
models: few, large, distinct outlines; things always contrast with the stuff under them and with each other.

Geometry and pixels are rendered at ``supersample`` times the output size; the same high-resolution label map
decides the colour of every high-resolution pixel, so image and mask cannot disagree. Downsampling:

- image: mean of each ``s x s`` block (anti-aliasing);
- mask: the class covering the most of the block's ``s * s`` sub-pixels (ties go to the higher class id, i.e.
  things before stuff and later things before earlier ones, which keeps thin corners); with
  ``ignore_ambiguous=True`` a pixel whose winning class covers half of the block or less is set to 255.

Output (the generic folder format read by ``autoseg.data.datasets``)::

    DIR/classes.txt          one class name per line; mask value = 0-based line number
    DIR/images/NAME.png      RGB
    DIR/masks/NAME.png       single-channel uint8, 255 = ignore
    DIR/captions/NAME.json   {"caption": str, "regions": [{"class": str, "class_id": int, "caption": str}, ...]}
    DIR/shapesworld.json     seed, range of indices and the generator config (for reproducibility)

``regions`` holds one entry per class present in the mask, sorted by ``class_id``. Every class name in a caption
is a plain noun (tagged NN/NNS by spaCy); the only other nouns used are generic ones ("picture", "image").
Sample ``i`` of seed ``s`` uses ``numpy.random.default_rng([s, i])``, so any subset is reproducible on its own.

CLI: ``python -m autoseg.data.shapes --seed S --n N --out DIR [--size PX] [--shards PATTERN_OR_DIR]``;
with ``--video --frames F [--fps FPS]`` it writes N clips instead (:mod:`autoseg.data.shapes_video`).
The scene model (classes, geometry, textures, rendering) is :mod:`autoseg.data.shapes_scene`; this module adds the
captions, the samples and the dataset writer.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from autoseg.data.shapes_scene import (  # noqa: F401 - the scene model is part of this module's API
    COLOURS,
    DEFAULT_THINGS,
    GENERATOR_VERSION,
    IGNORE,
    SHAPE_SCALE,
    SHAPES,
    STUFF_CLASSES,
    STUFF_COLOURS,
    Horizon,
    Scene,
    ShapesConfig,
    Thing,
    render_scene,
    sample_scene,
    thing_mask,
)
from autoseg.utils.io import atomic_write_json, atomic_write_text, save_image_atomic

# Caption vocabulary. Every adjective here is checked by the tests not to be tagged as a noun by spaCy.
STUFF_ADJECTIVES: dict[str, tuple[str, ...]] = {
    "sky": ("blue", "cloudy", "clear", "bright"),
    "grass": ("green", "short", "fresh"),
    "water": ("blue", "calm", "dark", "deep"),
    "sand": ("yellow", "dry", "soft", "warm"),
    "wall": ("red", "old", "tall", "rough"),
}
MASS_NOUNS = frozenset({"grass", "water", "sand"})  # "green grass", never "a green grass"
STUFF_PREPOSITIONS: dict[str, tuple[str, ...]] = {
    "sky": ("in", "against"),
    "grass": ("on",),
    "water": ("on", "above"),
    "sand": ("on",),
    "wall": ("against", "on"),
}
# spaCy's small English model (which extracts the nouns in the pipeline) mis-tags the shape in a few phrases: "an
# orange cross" as a proper noun; "a small purple cross", "a square and ..." and "a small orange square and ..." as
# adjectives. These things are named in a safe form instead: without the colour, or (squares) always with the colour
# and never with a size word. tests/test_shapes.py checks every phrase the generator can produce.
NO_COLOUR_WORD = frozenset({("orange", "cross"), ("purple", "cross")})
ALWAYS_COLOURED = frozenset({"square"})  # and never with a size word
COUNT_WORDS = {2: "two", 3: "three", 4: "four"}


# ----------------------------------------------------------------------------------------------------- captions


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _plural(noun: str) -> str:
    return noun + ("es" if noun.endswith(("s", "x", "ch", "sh")) else "s")


def _join(parts: Sequence[str]) -> str:
    # "a, b and c" makes spaCy's small model tag some nouns in long lists as NNP/JJ; "a and b and c" does not.
    return " and ".join(parts)


def _stuff_at(scene: Scene, x: float, y: float, size: int) -> str:
    """The stuff class at output-pixel position (x, y) (ignoring things)."""
    k = 0
    for h in scene.horizons:
        k += y >= h.y0 + h.amp * math.sin(2.0 * math.pi * h.freq * x / size + h.phase) + h.tilt * (x - size / 2.0)
    return scene.stuff[k]


def _stuff_np(name: str, rng: np.random.Generator, definite: bool | None = None) -> str:
    """A stuff noun phrase: "the cloudy sky", "green grass", "a red wall", "the sand" ..."""
    adj = str(rng.choice(STUFF_ADJECTIVES[name])) + " " if rng.random() < 0.5 else ""
    if definite is None:
        definite = bool(rng.random() < 0.5)
    if definite:
        return f"the {adj}{name}"
    return f"{adj}{name}" if name in MASS_NOUNS else _article(f"{adj}{name}")


def thing_phrase(shape: str, colour: str = "", size_word: str = "") -> str:
    """The noun phrase for one thing, e.g. "a big red star"; ``colour``/``size_word`` may be "" and may be dropped
    (see ``NO_COLOUR_WORD``)."""
    if shape in ALWAYS_COLOURED:
        size_word = ""
    if (colour, shape) in NO_COLOUR_WORD:
        colour = ""
    return _article(" ".join(w for w in (size_word, colour, shape) if w))


def _thing_np(thing: Thing, rng: np.random.Generator, size: int) -> str:
    """A random noun phrase for a thing: "a red star", "a big blue circle", "a cross" ..."""
    size_word = ""
    relative = thing.radius / (SHAPE_SCALE.get(thing.shape, 1.0) * size)
    if rng.random() < 0.3 and not 0.19 < relative < 0.24:
        size_word = "big" if relative >= 0.24 else "small"
    keep_colour = rng.random() < 0.85 or thing.shape in ALWAYS_COLOURED
    return thing_phrase(thing.shape, thing.colour if keep_colour else "", size_word)


def _things_phrase(things: Sequence[Thing], rng: np.random.Generator, size: int) -> tuple[str, bool]:
    """A noun phrase for several things (same shapes sometimes counted: "two circles"); True if plural."""
    parts = []
    for shape in dict.fromkeys(t.shape for t in things):
        group = [t for t in things if t.shape == shape]
        if len(group) > 1 and rng.random() < 0.4:
            parts.append(f"{COUNT_WORDS[len(group)]} {_plural(shape)}")
        else:
            parts += [_thing_np(t, rng, size) for t in group]
    return _join(parts), len(parts) > 1 or len(things) > 1


def make_captions(scene: Scene, mask: np.ndarray, config: ShapesConfig, rng: np.random.Generator) -> dict[str, Any]:
    """A full-image caption and one caption per class present in ``mask``, with varied phrasing.

    Every class present in the mask is named in the full caption; a region caption names its own class and no other
    (thing regions: "a red star", "a picture of two circles"; stuff regions: "green grass", "the cloudy sky").
    Absent classes (e.g. a stuff region completely hidden by things) are never named.

    Returns:
        ``{"caption": str, "regions": [{"class": name, "class_id": int, "caption": str}, ...]}`` sorted by id.
    """
    classes = config.classes
    present_ids = sorted(int(v) for v in np.unique(mask) if v != IGNORE)
    present = [classes[i] for i in present_ids]
    things = [t for t in scene.things if t.shape in present]
    stuff = [s for s in scene.stuff if s in present]  # top to bottom
    size = config.size

    regions = []
    for cid, name in zip(present_ids, present, strict=True):
        if name in STUFF_CLASSES:
            options = [_stuff_np(name, rng, definite=False), _stuff_np(name, rng, definite=True)]
            options += [f"a picture of the {name}", name]
        else:
            group = [t for t in things if t.shape == name]
            phrase, _ = _things_phrase(group, rng, size)
            options = [phrase, f"a picture of {phrase}"]
        regions.append({"class": name, "class_id": cid, "caption": str(rng.choice(options))})

    things_text, plural = _things_phrase(things, rng, size) if things else ("", False)
    if not stuff:
        caption = things_text if rng.random() < 0.5 else f"a picture of {things_text}"
    elif not things:
        scene_np = _join([_stuff_np(s, rng, definite=True) for s in stuff])
        caption = scene_np if rng.random() < 0.5 else f"a picture of {scene_np}"
    else:
        anchor = _stuff_at(scene, things[0].cx, things[0].cy, size)
        anchor = anchor if anchor in stuff else stuff[-1]
        loc = f"{rng.choice(STUFF_PREPOSITIONS[anchor])} {_stuff_np(anchor, rng, definite=True)}"
        rest = [s for s in stuff if s != anchor]
        tail = ""
        if rest:
            rest_np = _join([_stuff_np(s, rng, definite=True) for s in rest])
            above = all(stuff.index(s) < stuff.index(anchor) for s in rest)
            link = rng.choice(["under", "below", "and"] if above else ["with", "and", "near"])
            tail = f" {link} {rest_np}"
        scene_np = _join([_stuff_np(s, rng, definite=True) for s in stuff])  # "sky and sand": sand, a verb
        caption = str(
            rng.choice(
                [
                    f"{things_text} {loc}{tail}",
                    f"a picture of {things_text} {loc}{tail}",
                    f"{'there are' if plural else 'there is'} {things_text} {loc}{tail}",
                    f"{scene_np} with {things_text}",
                    f"an image of {scene_np} with {things_text}",
                ]
            )
        )
    return {"caption": caption, "regions": regions}


# ----------------------------------------------------------------------------------------------------- API and CLI


def generate_sample(
    rng_or_seed: np.random.Generator | int, index: int = 0, config: ShapesConfig | None = None
) -> tuple[Image.Image, np.ndarray, dict[str, Any]]:
    """One ShapesWorld sample.

    Args:
        rng_or_seed: a generator to draw from, or a dataset seed; with a seed the sample uses
            ``numpy.random.default_rng([seed, index])``, so it does not depend on any other sample.
        index: sample index (only used with a seed).
        config: drawing settings (defaults: ``ShapesConfig()``).

    Returns:
        ``(image, mask, captions)``: RGB PIL image ``S x S``, ``S x S`` uint8 mask indexing ``config.classes``
        (255 = ignore), and the captions dict described in the module docstring.
    """
    config = config or ShapesConfig()
    if isinstance(rng_or_seed, np.random.Generator):
        rng = rng_or_seed
    else:
        if int(rng_or_seed) < 0 or int(index) < 0:
            raise ValueError(f"seed={rng_or_seed} and index={index} must be non-negative integers")
        rng = np.random.default_rng([int(rng_or_seed), int(index)])
    scene = sample_scene(rng, config)
    image, mask = render_scene(scene, config, rng)
    return image, mask, make_captions(scene, mask, config, rng)


def sample_name(index: int) -> str:
    """File stem of sample ``index``."""
    return f"{index:06d}"


def _write_sample(job: tuple[Path, int, int, ShapesConfig]) -> str:
    out, seed, index, config = job
    image, mask, captions = generate_sample(seed, index, config)
    name = sample_name(index)
    save_image_atomic(out / "images" / f"{name}.png", image)
    save_image_atomic(out / "masks" / f"{name}.png", Image.fromarray(mask, mode="L"))
    atomic_write_json(out / "captions" / f"{name}.json", captions)
    return name


def write_dataset(
    out: str | Path,
    n: int,
    seed: int,
    config: ShapesConfig | None = None,
    start: int = 0,
    shards: str | Path | None = None,
    maxcount: int = 1000,
    workers: int = 0,
    progress: bool = True,
) -> Path:
    """Generate samples ``start .. start + n - 1`` of ``seed`` into ``out`` (generic folder format).

    Args:
        out: dataset folder (created).
        n: number of samples.
        seed: dataset seed; sample ``i`` is the same whatever ``n``, ``start`` and ``workers`` are.
        config: drawing settings.
        start: first sample index.
        shards: also convert the folder to WebDataset shards: a folder (gets ``shard-%06d.tar``) or a pattern.
        maxcount: samples per shard.
        workers: worker processes (0 = generate in this process).
        progress: show a tqdm bar.

    Returns:
        ``out`` as a Path.
    """
    config = config or ShapesConfig()
    if n < 0 or start < 0 or seed < 0:
        raise ValueError(f"n={n}, start={start} and seed={seed} must be non-negative")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "classes.txt", "\n".join(config.classes) + "\n")
    meta = {
        "generator": "autoseg.data.shapes",
        "version": GENERATOR_VERSION,
        "seed": seed,
        "start": start,
        "n": n,
        "config": asdict(config),
    }
    atomic_write_json(out / "shapesworld.json", meta)
    jobs = [(out, seed, i, config) for i in range(start, start + n)]
    bar = tqdm(total=n, desc=f"ShapesWorld -> {out}", unit="img", disable=not progress)
    if workers > 0:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for _ in pool.imap_unordered(_write_sample, jobs, chunksize=16):
                bar.update()
    else:
        for job in jobs:
            _write_sample(job)
            bar.update()
    bar.close()
    if shards is not None:
        from autoseg.data.shards import write_shards

        write_shards(out, shards, maxcount=maxcount, progress=progress)
    return out


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m autoseg.data.shapes",
        description="Generate a ShapesWorld dataset (images, masks, captions, classes.txt) and optional shards.",
    )
    p.add_argument("--seed", type=int, required=True, help="dataset seed (use a new one for held-out sets)")
    p.add_argument("--n", type=int, required=True, help="number of samples")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--size", type=int, default=ShapesConfig.size, help="image side in pixels (default: 128)")
    p.add_argument("--start", type=int, default=0, help="first sample index (default: 0)")
    p.add_argument(
        "--things",
        default=",".join(DEFAULT_THINGS),
        help=f"comma-separated thing classes from {','.join(SHAPES)} (default: %(default)s)",
    )
    p.add_argument("--max-things", type=int, default=ShapesConfig.max_things, help="most things per image")
    p.add_argument("--ignore-ambiguous", action="store_true", help="mask pixels without a strict majority -> 255")
    p.add_argument("--flat", action="store_true", help="flat colours instead of textures (debugging)")
    p.add_argument("--shards", default=None, help="also write WebDataset shards: a folder or a %%06d pattern")
    p.add_argument("--maxcount", type=int, default=1000, help="samples per shard (default: 1000)")
    p.add_argument("--workers", type=int, default=0, help="worker processes (default: 0 = none)")
    p.add_argument("--video", action="store_true", help="write N clips (videos/, frames/, masks/) instead of images")
    p.add_argument("--frames", type=int, default=30, help="frames per clip with --video (default: 30)")
    p.add_argument("--fps", type=float, default=10.0, help="frame rate of the clips' videos (default: 10)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    config = ShapesConfig(
        size=args.size,
        things=tuple(t.strip() for t in args.things.split(",") if t.strip()),
        max_things=args.max_things,
        min_things=min(ShapesConfig.min_things, args.max_things),
        ignore_ambiguous=args.ignore_ambiguous,
        textured=not args.flat,
    )
    if args.video:
        if args.shards is not None:
            raise SystemExit("--shards is not supported with --video")
        from autoseg.data.shapes_video import write_video_dataset

        write_video_dataset(args.out, args.n, args.seed, args.frames, config, fps=args.fps, start=args.start)
        return 0
    write_dataset(
        args.out,
        args.n,
        args.seed,
        config,
        start=args.start,
        shards=args.shards,
        maxcount=args.maxcount,
        workers=args.workers,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

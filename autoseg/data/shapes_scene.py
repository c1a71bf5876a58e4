"""The ShapesWorld scene model behind :mod:`autoseg.data.shapes`: classes and colours, the scene description
(stuff horizons, things), its geometry, procedural textures, sampling and rendering at a supersampled resolution.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

STUFF_CLASSES: tuple[str, ...] = ("sky", "grass", "water", "sand", "wall")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "heart", "ring")
# Five outlines that stay distinct at 8-16 px patches: smooth, 4 corners, 3 corners, 5 spikes, 4 arms.
DEFAULT_THINGS: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
IGNORE = 255
# Bumped whenever the same (seed, index, config) would draw different pixels or captions; caches should key on it.
GENERATOR_VERSION = 1
# Shapes that fill little of their circumcircle (triangle 41 %, star 42 %, square 64 %, circle 100 %) are drawn larger
# so that their outlines span enough patches to be recognised.
SHAPE_SCALE: dict[str, float] = {"triangle": 1.2, "star": 1.2, "heart": 1.05}

# Nominal colours: stuff textures vary around these; things are filled with one of COLOURS.
STUFF_COLOURS: dict[str, tuple[int, int, int]] = {  # also the flat colours of ``textured=False``
    "sky": (130, 185, 235),
    "grass": (70, 135, 45),
    "water": (30, 95, 150),
    "sand": (215, 190, 135),
    "wall": (160, 75, 55),
}
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (245, 220, 40),
    "blue": (35, 60, 210),
    "purple": (125, 45, 165),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
# Colours that occur in each texture (nominal colour, clouds, mortar); a thing must contrast with all of them.
STUFF_PALETTES: dict[str, tuple[tuple[int, int, int], ...]] = {
    "sky": (STUFF_COLOURS["sky"], (245, 245, 245)),
    "grass": (STUFF_COLOURS["grass"],),
    "water": (STUFF_COLOURS["water"],),
    "sand": (STUFF_COLOURS["sand"],),
    "wall": (STUFF_COLOURS["wall"],),
}
MIN_STUFF_CONTRAST = 120.0  # RGB distance between a thing's colour and the colours of stuff it covers
MIN_THING_CONTRAST = 80.0  # RGB distance between the colours of two things in one image


@dataclass(frozen=True)
class ShapesConfig:
    """How ShapesWorld images are drawn.

    Attributes:
        size: output side in pixels (images are square).
        supersample: high-resolution factor used for drawing (anti-aliasing and exact masks).
        things: thing classes, a subset of ``SHAPES``; ``classes.txt`` lists ``STUFF_CLASSES`` then these.
        min_things: fewest things per image.
        max_things: most things per image.
        min_radius: smallest circumradius of a thing, as a fraction of ``size`` (times ``SHAPE_SCALE``).
        max_radius: largest circumradius of a thing, as a fraction of ``size`` (times ``SHAPE_SCALE``).
        min_visible: every thing keeps at least this fraction of its area visible after occlusion.
        max_stuff: most stuff regions per image (1-3).
        textured: procedural textures and shading; False draws every region in its flat nominal colour.
        ignore_ambiguous: set mask pixels without a strict majority class to 255.
    """

    size: int = 128
    supersample: int = 4
    things: tuple[str, ...] = DEFAULT_THINGS
    min_things: int = 1
    max_things: int = 4
    min_radius: float = 0.15
    max_radius: float = 0.28
    min_visible: float = 0.7
    max_stuff: int = 3
    textured: bool = True
    ignore_ambiguous: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "things", tuple(self.things))
        unknown = [t for t in self.things if t not in SHAPES]
        if unknown or not self.things or len(set(self.things)) != len(self.things):
            raise ValueError(
                f"ShapesConfig.things={list(self.things)}: expected distinct names from {list(SHAPES)}"
                + (f"; unknown: {unknown}" if unknown else "")
            )
        if self.size < 16 or self.supersample < 1:
            raise ValueError(f"ShapesConfig: size={self.size} must be >= 16 and supersample={self.supersample} >= 1")
        if not 1 <= self.min_things <= self.max_things:
            raise ValueError(
                f"ShapesConfig: need 1 <= min_things ({self.min_things}) <= max_things ({self.max_things})"
            )
        if not 0 < self.min_radius <= self.max_radius <= 0.5:
            raise ValueError(
                f"ShapesConfig: need 0 < min_radius ({self.min_radius}) <= max_radius ({self.max_radius}) <= 0.5"
            )
        if not 0 < self.min_visible <= 1:
            raise ValueError(f"ShapesConfig: min_visible={self.min_visible} must be in (0, 1]")
        if self.max_stuff not in (1, 2, 3):
            raise ValueError(f"ShapesConfig: max_stuff={self.max_stuff} must be 1, 2 or 3")

    @property
    def classes(self) -> tuple[str, ...]:
        """Class names; a mask value is an index into this tuple."""
        return STUFF_CLASSES + self.things


@dataclass
class Thing:
    """One drawn shape, in output-pixel coordinates.

    Attributes:
        shape: a name from ``SHAPES``.
        colour: a name from ``COLOURS``.
        cx: centre column (pixels, 0 = left edge of the image).
        cy: centre row.
        radius: circumradius (pixels): the shape fits in the circle of this radius around the centre.
        angle: rotation in radians (counter-clockwise on screen).
    """

    shape: str
    colour: str
    cx: float
    cy: float
    radius: float
    angle: float = 0.0


@dataclass
class Horizon:
    """A wavy boundary between two stacked stuff regions: ``row(x) = y0 + amp * sin(2 pi freq x / size + phase)
    + tilt * (x - size / 2)``, in output pixels."""

    y0: float
    amp: float = 0.0
    freq: float = 1.0
    phase: float = 0.0
    tilt: float = 0.0


@dataclass
class Scene:
    """What an image shows: stuff regions from top to bottom, the horizons between them, things in draw order."""

    stuff: list[str]
    horizons: list[Horizon] = field(default_factory=list)
    things: list[Thing] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------- geometry


def _unit_polygons(shape: str) -> list[tuple[np.ndarray, int]]:
    """Outline(s) of ``shape`` with circumradius 1 around the origin, y pointing down: ``[(N x 2 vertices, fill)]``;
    later polygons are drawn over earlier ones (fill 0 cuts a hole)."""
    t = np.linspace(0.0, 2.0 * np.pi, 256, endpoint=False)
    circle = np.stack([np.cos(t), np.sin(t)], axis=1)
    if shape == "circle":
        return [(circle, 1)]
    if shape == "ring":
        return [(circle, 1), (0.55 * circle, 0)]
    if shape in ("square", "triangle"):
        n = 4 if shape == "square" else 3
        a = -np.pi / 2 + (np.pi / 4 if n == 4 else 0.0) + 2.0 * np.pi * np.arange(n) / n
        return [(np.stack([np.cos(a), np.sin(a)], axis=1), 1)]
    if shape == "star":
        a = -np.pi / 2 + np.pi * np.arange(10) / 5
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        return [(np.stack([r * np.cos(a), r * np.sin(a)], axis=1), 1)]
    if shape == "cross":
        w = 0.35  # half-width of an arm; arm tips touch the unit circle
        arm = math.sqrt(1.0 - w * w)
        quarter = np.array([[w, -arm], [w, -w], [arm, -w]])
        pts = [
            quarter @ np.array([[math.cos(q), math.sin(q)], [-math.sin(q), math.cos(q)]])
            for q in np.pi / 2 * np.arange(4)
        ]
        return [(np.concatenate(pts), 1)]
    if shape == "heart":
        x = 16.0 * np.sin(t) ** 3
        y = -(13.0 * np.cos(t) - 5.0 * np.cos(2 * t) - 2.0 * np.cos(3 * t) - np.cos(4 * t))
        pts = np.stack([x, y], axis=1)
        pts -= (pts.max(0) + pts.min(0)) / 2.0
        return [(pts / np.linalg.norm(pts, axis=1).max(), 1)]
    raise ValueError(f"unknown shape {shape!r}; expected one of {list(SHAPES)}")


def thing_mask(thing: Thing, size: int, supersample: int = 1) -> np.ndarray:
    """Rasterise one thing.

    Args:
        thing: the shape and its placement (output-pixel units).
        size: output side in pixels.
        supersample: raster factor; the result is ``(size * supersample) x (size * supersample)``.

    Returns:
        ``H x W`` bool array, True inside the shape (sub-pixel centres inside the outline).
    """
    side = size * supersample
    canvas = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(canvas)
    c, s = math.cos(thing.angle), math.sin(thing.angle)
    rot = np.array([[c, -s], [s, c]])  # counter-clockwise on screen with y down
    for unit, fill in _unit_polygons(thing.shape):
        pts = unit @ rot * thing.radius + (thing.cx, thing.cy)
        # PIL polygons are in pixel-centre coordinates: continuous u maps to u * s - 0.5.
        pts = pts * supersample - 0.5
        draw.polygon([tuple(p) for p in pts.tolist()], fill=fill)
    return np.asarray(canvas) > 0


def stuff_labels(scene: Scene, size: int, supersample: int = 1) -> np.ndarray:
    """Index into ``scene.stuff`` of every (sub-)pixel: ``H x W`` int array, 0 = top region."""
    side = size * supersample
    x = (np.arange(side) + 0.5) / supersample
    y = (np.arange(side) + 0.5) / supersample
    out = np.zeros((side, side), dtype=np.int64)
    for h in scene.horizons:
        row = h.y0 + h.amp * np.sin(2.0 * np.pi * h.freq * x / size + h.phase) + h.tilt * (x - size / 2.0)
        out += y[:, None] >= row[None, :]
    return out


# ----------------------------------------------------------------------------------------------------- textures


def _noise(rng: np.random.Generator, side: int, cells: tuple[float, float]) -> np.ndarray:
    """Smooth value noise in about [0, 1]: a random ``cells`` grid (rows, cols) upsampled bicubically to ``side``."""
    gh, gw = max(2, round(cells[0]) + 1), max(2, round(cells[1]) + 1)
    grid = Image.fromarray(rng.random((gh, gw)).astype(np.float32), mode="F")
    return np.asarray(grid.resize((side, side), Image.BICUBIC), dtype=np.float32)


def _fbm(rng: np.random.Generator, side: int, cells: float, octaves: int = 3) -> np.ndarray:
    """Fractal noise: octaves of value noise, each twice as fine and half as strong, normalised to [0, 1]."""
    total = np.zeros((side, side), np.float32)
    for k in range(octaves):
        total += 0.5**k * _noise(rng, side, (cells * 2**k, cells * 2**k))
    total -= total.min()
    return total / max(float(total.max()), 1e-6)


def _jitter(rng: np.random.Generator, rgb: tuple[int, int, int], amount: float) -> np.ndarray:
    return np.asarray(rgb, np.float32) + rng.uniform(-amount, amount, 3).astype(np.float32)


_REF = 128  # texture scales are defined for a 128-px image and scale with the size


def _texture(name: str, rng: np.random.Generator, side: int) -> np.ndarray:
    """Procedural texture of a stuff class over a ``side x side`` canvas: ``H x W x 3`` float32 in about [0, 255]."""
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) * (_REF / side)  # units of a 128-px image
    if name == "sky":
        top = _jitter(rng, (70, 130, 220), 15)
        low = _jitter(rng, (175, 210, 245), 10)
        t = (yy / _REF)[..., None] ** 0.8
        img = top * (1 - t) + low * t
        clouds = np.clip((_fbm(rng, side, rng.uniform(2.5, 5.0)) - rng.uniform(0.45, 0.65)) * 4.0, 0, 1)
        return img * (1 - clouds[..., None]) + np.float32(245) * clouds[..., None]
    if name == "grass":
        base = _jitter(rng, STUFF_COLOURS["grass"], 15)
        blades = _noise(rng, side, (_REF / rng.uniform(5, 8), _REF / rng.uniform(1.0, 1.6)))  # tall thin streaks
        patches = _fbm(rng, side, 3.0, octaves=2)
        light = 0.65 + 0.45 * blades + 0.25 * (patches - 0.5)
        return base * light[..., None]
    if name == "water":
        base = _jitter(rng, STUFF_COLOURS["water"], 12)
        wavelength = rng.uniform(5.0, 9.0)
        warp = _fbm(rng, side, 3.0, octaves=2)
        waves = np.sin(2 * np.pi * (yy / wavelength + 1.2 * warp + rng.uniform(-0.02, 0.02) * xx))
        crest = np.clip((waves - 0.3) / 0.7, 0, 1) ** 2
        body = 0.85 + 0.3 * _noise(rng, side, (4, 4))
        return base * body[..., None] + np.float32([80, 100, 95]) * 0.8 * crest[..., None]
    if name == "sand":
        base = _jitter(rng, STUFF_COLOURS["sand"], 12)
        speckle = _noise(rng, side, (_REF / 1.5, _REF / 1.5))
        a = rng.uniform(0, np.pi)
        dunes = np.sin(2 * np.pi * ((xx * np.cos(a) + yy * np.sin(a)) / rng.uniform(10, 18) + _fbm(rng, side, 2.0, 2)))
        light = 1.0 + 0.07 * dunes + 0.22 * (speckle - 0.5)
        return base * light[..., None]
    if name == "wall":
        brick = _jitter(rng, STUFF_COLOURS["wall"], 15)
        mortar = _jitter(rng, (190, 185, 175), 8)
        bh = rng.uniform(7.0, 10.0)  # brick height
        bw = bh * rng.uniform(2.0, 2.6)
        yo = yy + rng.uniform(0, bh)
        row = np.floor(yo / bh)
        xs = xx + rng.uniform(0, bw) + (row % 2) * bw / 2  # alternate rows shifted by half a brick
        col = np.floor(xs / bw)
        table = rng.normal(0.0, 0.1, (int(row.max()) + 1, int(col.max()) + 1)).astype(np.float32)
        shade = 1.0 + table[row.astype(np.int64), col.astype(np.int64)]
        grain = 0.9 + 0.2 * _noise(rng, side, (_REF / 2, _REF / 2))
        joint = (yo % bh < 1.2) | (xs % bw < 1.2)
        img = brick * (shade * grain)[..., None]
        return np.where(joint[..., None], mortar * grain[..., None], img)
    raise ValueError(f"unknown stuff class {name!r}; expected one of {list(STUFF_CLASSES)}")


# ----------------------------------------------------------------------------------------------------- sampling


def _colour_distance(a: Sequence[float], b: Sequence[float]) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64)))


def _sample_horizons(rng: np.random.Generator, stuff: list[str], size: int) -> list[Horizon]:
    """Boundaries between stacked regions: a low-amplitude line under sky or wall, wavier ones between grounds."""
    if len(stuff) == 1:
        return []
    if len(stuff) == 2:
        rows = [rng.uniform(0.3, 0.65)]
    else:
        first = rng.uniform(0.25, 0.42)
        rows = [first, rng.uniform(first + 0.2, 0.8)]
    horizons = []
    for k, row in enumerate(rows):
        flat = k == 0 and stuff[0] == "wall"  # the foot of a wall is straight
        amp = 0.0 if flat else rng.uniform(0.0, 0.03 if k == 0 else 0.05)
        horizons.append(
            Horizon(
                y0=row * size,
                amp=amp * size,
                freq=rng.uniform(0.5, 2.0),
                phase=rng.uniform(0.0, 2.0 * np.pi),
                tilt=rng.uniform(-0.12, 0.12),
            )
        )
    return horizons


def sample_scene(rng: np.random.Generator, config: ShapesConfig) -> Scene:
    """Draw a random scene: 1-``max_stuff`` stuff regions and ``min_things``-``max_things`` things.

    Stuff layout: a single region of any class, or sky/wall on top of one or two distinct grounds (grass, water,
    sand). Things are placed one after another (later ones in front); a placement is rejected when it would leave
    an earlier thing less than ``min_visible`` of its area, and a thing's colour must contrast with every stuff
    region it covers and with the other things' colours.
    """
    size = config.size
    check_ss = min(config.supersample, 2)  # placement checks at 2x are accurate enough and 4x cheaper
    for _ in range(100):
        weights = np.array([0.2, 0.5, 0.3][: config.max_stuff])
        n_stuff = int(rng.choice(np.arange(1, config.max_stuff + 1), p=weights / weights.sum()))
        if n_stuff == 1:
            stuff = [str(rng.choice(STUFF_CLASSES))]
        else:
            grounds = rng.choice(["grass", "water", "sand"], n_stuff - 1, replace=False)
            stuff = [str(rng.choice(["sky", "wall"]))] + [str(g) for g in grounds]
        scene = Scene(stuff=stuff, horizons=_sample_horizons(rng, stuff, size))
        region = stuff_labels(scene, size, check_ss)
        full: list[int] = []  # unoccluded area of each placed thing
        visible: list[np.ndarray] = []  # what is still visible of each placed thing
        for _k in range(int(rng.integers(config.min_things, config.max_things + 1))):
            for _attempt in range(40):
                shape = str(rng.choice(config.things))
                radius = rng.uniform(config.min_radius, config.max_radius) * size * SHAPE_SCALE.get(shape, 1.0)
                lo, hi = 0.75 * radius, size - 0.75 * radius  # at most a small part leaves the frame
                thing = Thing(
                    shape=shape,
                    colour="",
                    cx=rng.uniform(lo, hi),
                    cy=rng.uniform(lo, hi),
                    radius=radius,
                    angle=rng.uniform(0.0, 2.0 * np.pi),
                )
                m = thing_mask(thing, size, check_ss)
                if not m.any() or any(
                    (v & ~m).sum() < config.min_visible * a for v, a in zip(visible, full, strict=True)
                ):
                    continue
                covered = [stuff[i] for i in np.unique(region[m])]
                used = [COLOURS[t.colour] for t in scene.things]
                options = [
                    name
                    for name, rgb in COLOURS.items()
                    if all(_colour_distance(rgb, c) >= MIN_STUFF_CONTRAST for s in covered for c in STUFF_PALETTES[s])
                    and all(_colour_distance(rgb, u) >= MIN_THING_CONTRAST for u in used)
                ]
                if not options:
                    continue
                thing.colour = str(rng.choice(options))
                visible = [v & ~m for v in visible] + [m]
                full.append(int(m.sum()))
                scene.things.append(thing)
                break
        if len(scene.things) >= config.min_things:
            return scene
    raise RuntimeError(f"could not place {config.min_things} things in 100 scenes; relax ShapesConfig ({config})")


# ----------------------------------------------------------------------------------------------------- rendering


def _block_majority(
    labels: np.ndarray, size: int, ss: int, num_classes: int, ignore_ambiguous: bool, used: Sequence[int]
) -> np.ndarray:
    """``(size*ss) x (size*ss)`` labels (values among ``used``) -> ``size x size`` uint8: the most frequent label of
    each ``ss x ss`` block, ties to the higher label."""
    blocks = labels.reshape(size, ss, size, ss).transpose(0, 2, 1, 3).reshape(size, size, ss * ss)
    counts = np.zeros((size, size, num_classes), np.int64)
    for c in used:
        counts[..., c] = (blocks == c).sum(axis=2)
    win = num_classes - 1 - np.argmax(counts[..., ::-1], axis=-1)
    out = win.astype(np.uint8)
    if ignore_ambiguous:
        out[2 * counts.max(axis=-1) <= ss * ss] = IGNORE
    return out


def paint_texture(img: np.ndarray, sel: np.ndarray, tex: np.ndarray) -> None:
    """``img[sel] = tex`` upsampled by pixel repetition to ``img``'s side (``img``: S x S x 3, ``sel``: S x S bool,
    ``tex``: s x s x 3 with s dividing S), in place: the texture is broadcast over each pixel's block, not copied."""
    side, rep = tex.shape[0], img.shape[0] // tex.shape[0]
    blocks = img.reshape(side, rep, side, rep, 3)  # a view: each texture pixel's rep x rep sub-pixels
    np.copyto(blocks, tex[:, None, :, None], where=sel.reshape(side, rep, side, rep)[..., None])


def render_scene(scene: Scene, config: ShapesConfig, rng: np.random.Generator) -> tuple[Image.Image, np.ndarray]:
    """Draw a scene.

    Args:
        scene: stuff layout and things; thing shapes must be in ``config.things``.
        config: size, supersampling, textures.
        rng: draws the textures and the shading of things.

    Returns:
        ``(image, mask)``: an RGB PIL image ``size x size`` and its ``size x size`` uint8 mask (values index
        ``config.classes``; 255 only with ``ignore_ambiguous``).
    """
    size, ss = config.size, config.supersample
    side = size * ss
    index = {name: i for i, name in enumerate(config.classes)}
    missing = [n for n in [*scene.stuff, *(t.shape for t in scene.things)] if n not in index]
    if missing:
        raise ValueError(f"scene uses {missing}, which are not in the config's classes {list(config.classes)}")
    region = stuff_labels(scene, size, ss)
    labels = np.asarray([index[s] for s in scene.stuff], np.min_scalar_type(len(index)))[region]  # side x side
    img = np.zeros((side, side, 3), np.float32)
    # Textures hold little detail above 2x the output resolution: draw them at 2x (4x cheaper) and repeat.
    tex_ss = math.gcd(ss, 2)
    for i, name in enumerate(scene.stuff):
        sel = region == i
        if config.textured:
            paint_texture(img, sel, _texture(name, rng, size * tex_ss))
        else:
            img[sel] = STUFF_COLOURS[name]
    for thing in scene.things:
        m = thing_mask(thing, size, ss)
        labels[m] = index[thing.shape]
        fill = np.asarray(COLOURS[thing.colour], np.float32)
        if config.textured:  # a soft linear light gradient across the shape
            rows, cols = np.nonzero(m)
            d = rng.uniform(0.0, 2.0 * np.pi)
            dx, dy = (cols + 0.5) / ss - thing.cx, (rows + 0.5) / ss - thing.cy
            ramp = (dx * np.cos(d) + dy * np.sin(d)) / (2.0 * thing.radius)
            img[rows, cols] = fill * (1.0 + rng.uniform(0.15, 0.3) * ramp.astype(np.float32))[:, None]
        else:
            img[m] = fill
    small = img.reshape(size, ss, size, ss, 3).mean(axis=(1, 3))
    image = Image.fromarray(np.clip(np.rint(small), 0, 255).astype(np.uint8), mode="RGB")
    used = sorted({index[n] for n in [*scene.stuff, *(t.shape for t in scene.things)]})
    return image, _block_majority(labels, size, ss, len(index), config.ignore_ambiguous, used)

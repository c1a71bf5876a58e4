"""One backend registry: a new backend is one file plus its entry in ``BACKENDS``, and then the config checks,
infer.py, ``autoseg.load`` and save_pretrained all take it."""

import json
from pathlib import Path

import numpy as np
import pytest
import toy_backend
from PIL import Image

import autoseg
from autoseg.cli.infer import main as infer_main
from autoseg.config import ConfigError, load_config
from autoseg.models.segmenters import BACKENDS

REPO = Path(__file__).resolve().parents[1]
DEBUG = str(REPO / "configs" / "debug" / "pipeline.yaml")


@pytest.fixture
def bands(monkeypatch):
    monkeypatch.setitem(BACKENDS, "bands", toy_backend.BACKEND)


def expected_bands(h: int, w: int, n: int, direction: str) -> np.ndarray:
    """Computed here, pixel by pixel, from the rule the toy states: name i of n labels the i-th of n equal bands."""
    out = np.zeros((h, w), np.int32)
    for y in range(h):
        for x in range(w):
            pos, size = (y, h) if direction == "horizontal" else (x, w)
            out[y, x] = pos * n // size + 1 if n else 0
    return out


def test_the_config_takes_the_new_backend_and_checks_its_own_options(bands):
    config = load_config(None, {"segmenter": {"name": "bands", "direction": "vertical"}})
    assert config.segmenter.options.direction == "vertical"
    with pytest.raises(ConfigError, match=r"segmenter.direction: expected one of \['horizontal', 'vertical'\]"):
        load_config(None, {"segmenter": {"name": "bands", "direction": "diagonal"}})
    with pytest.raises(ConfigError, match=r"segmenter.templates: unknown key; allowed in segmenter: \[.*'direction'"):
        load_config(None, {"segmenter": {"name": "bands", "templates": ["{}"]}})


def test_infer_load_and_save_pretrained_run_the_new_backend(bands, tmp_path, tiny_blip_dir):
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for name, (h, w) in {"a": (40, 56), "b": (64, 48)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(photos / f"{name}.png")
    out = tmp_path / "out"
    argv = [
        str(photos),
        "-o",
        str(out),
        "--config",
        DEBUG,
        "--blip",
        str(tiny_blip_dir),
        "--segmenter-backend",
        "bands",
    ]
    assert infer_main(argv) == 0
    for stem in ("a", "b"):
        with Image.open(out / f"{stem}.png") as im:
            labels = np.asarray(im)
        vocabulary = json.loads((out / f"{stem}.json").read_text())["vocabulary"]
        assert np.array_equal(labels, expected_bands(*labels.shape, len(vocabulary), "horizontal"))
    seg = autoseg.load(DEBUG, blip=str(tiny_blip_dir), segmenter={"name": "bands", "direction": "vertical"})
    pred = seg(photos / "a.png")
    assert np.array_equal(pred.label_map, expected_bands(40, 56, len(pred.vocabulary), "vertical"))
    again = autoseg.load(seg.save_pretrained(tmp_path / "saved"))
    assert again.config.segmenter.name == "bands"
    assert np.array_equal(again(photos / "a.png").label_map, pred.label_map)

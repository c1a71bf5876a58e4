"""Pipeline config files: unknown keys, relative model paths, presets."""

import pytest

from autoseg import config as cfg
from autoseg.config import PipelineConfig, load_config


def test_defaults_and_overrides():
    c = load_config(None, {"seed": 3, "bboost": {"k_max": 5}, "segmenter": {"threshold": 0.2}})
    assert isinstance(c, PipelineConfig)
    assert (c.seed, c.bboost.k_max, c.bboost.k_min, c.segmenter.threshold) == (3, 5, 2, 0.2)
    assert c.scales == (384, 512)


def test_unknown_keys_name_the_allowed_ones(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("bboost:\n  k_maxx: 3\n")
    with pytest.raises(ValueError, match=r"c.yaml: bboost.k_maxx: unknown key; allowed in bboost: \[.*'k_max'"):
        load_config(f)
    f.write_text("- a list\n")
    with pytest.raises(ValueError, match="expected a mapping"):
        load_config(f)
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_dot_relative_model_paths_follow_the_yaml(tmp_path):
    (tmp_path / "conf").mkdir()
    f = tmp_path / "conf" / "p.yaml"
    f.write_text("blip: ./models/blip\nenhancer: ../head.safetensors\nsegmenter:\n  source: org/some-model\n")
    c = load_config(f)
    assert c.blip == str(tmp_path / "conf" / "models" / "blip")
    assert c.enhancer == str(tmp_path / "head.safetensors")
    assert c.segmenter.source == "org/some-model"  # a hub id stays as it is
    assert load_config(f, {"blip": "./elsewhere"}).blip == "./elsewhere"  # command-line values are not rewritten


def test_presets_are_found_by_name(tmp_path, monkeypatch):
    monkeypatch.setattr(cfg, "PRESETS_DIR", tmp_path)
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "pipeline.yaml").write_text("blip: ./blip\nseed: 7\n")
    (tmp_path / "not-a-preset").mkdir()  # a folder without pipeline.yaml
    assert cfg.presets() == ["tiny"]
    c = load_config(preset="tiny")
    assert c.seed == 7 and c.blip == str(tmp_path / "tiny" / "blip")
    with pytest.raises(ValueError, match=r"unknown preset 'demo'; available: \['tiny'\]"):
        load_config(preset="demo")
    with pytest.raises(ValueError, match="either a config file or a preset"):
        load_config(tmp_path / "tiny" / "pipeline.yaml", preset="tiny")

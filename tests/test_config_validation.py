"""Up-front config validation: types and ranges (load_config) and machine/model checks (check_runtime), no weights."""

import dataclasses
import re
import typing
from pathlib import Path

import pytest
import torch
import yaml

from autoseg import config as cfg
from autoseg.config import ConfigError, PipelineConfig, load_config, validate_config
from autoseg.config_checks import check_runtime, model_config
from autoseg.models.enhancer import EmbeddingEnhancer, EnhancerConfig, save_enhancer
from autoseg.vocab.bboost import BBoostConfig

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "autoseg" / "presets" / "demo"
GOOD = {"scales": [128, 192], "caption_scale": 128}


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


# (YAML settings, the key the message must name, a regex of what it must say is allowed and what it got)
BAD_VALUES = [
    ({"scales": 128}, "scales", r"a non-empty list of integers in \[1, 2048\], got 128$"),
    ({"scales": []}, "scales", r"non-empty list of integers"),
    ({"scales": [128, -64], "caption_scale": 128}, "scales", r"integers in \[1, 2048\], got \[128, -64\]"),
    ({"scales": [128, 1_600_000], "caption_scale": 128}, "scales", r"integers in \[1, 2048\], got \[128, 1600000\]"),
    ({"scales": [128, 192.0]}, "scales", r"list of integers"),
    ({"bboost": 5}, "bboost", r"a mapping of BBoostConfig settings \(k_min, k_max, .*\), got 5"),
    ({"bboost": None}, "bboost", r"a mapping of BBoostConfig settings"),
    ({"bboost": {"k_min": "six"}}, "bboost.k_min", r"expected an integer in \[1, 64\], got 'six'"),
    ({"bboost": {"k_min": True}}, "bboost.k_min", r"expected an integer in \[1, 64\], got True"),
    ({"bboost": {"k_min": 0}}, "bboost.k_min", r"in \[1, 64\], got 0"),
    ({"bboost": {"k_min": 6, "k_max": 3}}, "bboost.k_max", r"an integer in \[k_min \(6\), 64\], got 3"),
    ({"bboost": {"k_max": 100_000}}, "bboost.k_max", r"an integer in \[k_min \(2\), 64\], got 100000"),
    ({"bboost": {"n_init": 0}}, "bboost.n_init", r"in \[1, 1000\], got 0"),
    ({"bboost": {"pos_dim": 30}}, "bboost.pos_dim", r"multiple of 4"),
    ({"bboost": {"pos_weight": "1e-3"}}, "bboost.pos_weight", r"a number >= 0, got '1e-3'"),  # YAML 1.1: a string
    ({"bboost": {"pos_weight": float("nan")}}, "bboost.pos_weight", r"a number >= 0, got nan"),
    ({"bboost": {"crf_theta": 0}}, "bboost.crf_theta", r"a number > 0, got 0"),
    ({"bboost": {"normalize_tokens": "yes please"}}, "bboost.normalize_tokens", r"true or false"),
    ({"caption": {"n_passes": 0}}, "caption.n_passes", r"an integer in \[1, 100\], got 0"),
    ({"caption": {"mode": "panorama"}}, "caption.mode", r"one of \['concat', 'global', 'local', 'cls'\]"),
    ({"caption": {"top_p": 0}}, "caption.top_p", r"in \(0, 1\], got 0"),
    ({"caption": {"temperature": -1.0}}, "caption.temperature", r"> 0, got -1.0"),
    ({"caption": {"num_beams": 0}}, "caption.num_beams", r"in \[1, 100\]"),
    ({"caption": {"min_new_tokens": 8, "max_new_tokens": 4}}, "caption.max_new_tokens", r">= min_new_tokens \(8\)"),
    ({"caption": {"max_new_tokens": 0, "min_new_tokens": 0}}, "caption.max_new_tokens", r">= 1"),
    ({"caption": {"prompt": 3}}, "caption.prompt", r"expected a string, got 3"),
    ({"nouns": {"tags": []}}, "nouns.tags", r"non-empty list of part-of-speech tags"),
    ({"nouns": {"tags": "NN"}}, "nouns.tags", r"non-empty list"),
    ({"nouns": {"spacy_model": 3}}, "nouns.spacy_model", r"a string \(not empty\) or null, got 3$"),
    ({"segmenter": {"image_size": -352}}, "segmenter.image_size", r"an integer >= 1, got -352"),
    ({"segmenter": {"threshold": 1.5}}, "segmenter.threshold", r"a number in \[0, 1\], got 1.5"),
    ({"segmenter": {"class_chunk": 0}}, "segmenter.class_chunk", r">= 1"),
    ({"segmenter": {"name": "sam9"}}, "segmenter.name", r"one of \['clipseg'"),
    ({"segmenter": {"templates": ["a photo"]}}, "segmenter.templates", r"each with one '\{\}'"),
    ({"segmenter": {"templates": ["a {0} {}"]}}, "segmenter.templates", r"no other braces"),
    ({"segmenter": {"source": ""}}, "segmenter.source", r"a string \(not empty\), got ''"),
    ({**GOOD, "caption_scale": 100}, "caption_scale", r"one of the scales \[128, 192\] or null"),
    ({"seed": -1}, "seed", r"an integer in \[0, 4294967295\], got -1"),
    ({"seed": 1.5}, "seed", r"an integer in"),
    ({"batch_size": 0}, "batch_size", r"an integer >= 1, got 0"),
    ({"dtype": "fp16"}, "dtype", r"one of \['float32', 'float16', 'bfloat16'\], got 'fp16'"),
    ({"device": "tpu"}, "device", r"one of auto, cpu, cuda, cuda:N or mps, got 'tpu'"),
    ({"device": "cuda:x"}, "device", r"cuda:N"),
    ({"blip": ["a", "b"]}, "blip", r"a string \(not empty\), got \['a', 'b'\]"),
    ({"enhancer": 5}, "enhancer", r"a string \(not empty\) or null, got 5$"),
    ({"pipeline": [1]}, "pipeline", r"expected a mapping of pipeline settings"),
]


@pytest.mark.parametrize(("data", "key", "allowed"), BAD_VALUES, ids=[b[1] for b in BAD_VALUES])
def test_a_bad_value_in_a_yaml_names_the_file_the_key_and_what_is_allowed(tmp_path, data, key, allowed):
    path = write(tmp_path, data)
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: {re.escape(key)}: .*{allowed}") as err:
        load_config(path)
    assert "\n" not in str(err.value)
    assert (err.value.key, err.value.source) == (key, str(path))
    assert isinstance(err.value, ValueError)  # callers that catch ValueError keep working


def test_a_bad_command_line_value_names_the_command_line(tmp_path):
    path = write(tmp_path, {"bboost": {"k_min": 6}})
    with pytest.raises(ConfigError, match=r"^command line: batch_size: expected an integer >= 1, got 0$"):
        load_config(path, {"batch_size": 0}, overrides_source="command line")
    with pytest.raises(
        ConfigError, match=r"^overrides: bboost.k_max: expected an integer in \[k_min \(6\), 64\], got 2$"
    ):
        load_config(path, {"bboost": {"k_max": 2}})
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: bboost.k_max: .*k_min \(6\), 64\], got 2$"):
        load_config(write(tmp_path, {"bboost": {"k_min": 6, "k_max": 2}}), {"seed": 1})
    with pytest.raises(ConfigError, match=r"^overrides: bboost.k_maxx: unknown key; allowed in bboost: \[.*'k_max'"):
        load_config(None, {"bboost": {"k_maxx": 3}})


def test_not_valid_yaml_is_a_one_line_config_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("bboost: [1,\n  k_min: 2\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: not valid YAML") as err:
        load_config(path)
    assert "\n" not in str(err.value)


def test_configs_built_in_code_are_checked_too():
    validate_config(PipelineConfig())
    with pytest.raises(ConfigError, match=r"^config: bboost.k_min: expected an integer in \[1, 64\], got 0$"):
        validate_config(PipelineConfig(bboost=BBoostConfig(k_min=0)))
    with pytest.raises(ConfigError, match=r"^app: scales: "):
        validate_config(PipelineConfig(scales=(0,)), source="app")


SHIPPED = sorted((REPO / "configs" / "pipeline").glob("*.yaml")) + [REPO / "configs" / "debug" / "pipeline.yaml"]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_pipeline_configs_are_valid(path):
    validate_config(load_config(path), str(path))


def test_every_numeric_setting_has_an_allowed_range():
    """A new int or float field must say its range in RULES (types are checked from the hints automatically)."""
    missing, todo = [], [PipelineConfig]
    while todo:
        cls = todo.pop()
        for f in dataclasses.fields(cls):
            hint = typing.get_type_hints(cls)[f.name]
            if dataclasses.is_dataclass(hint):
                todo.append(hint)
            elif hint in (int, float, int | None, float | None) and f.name not in cfg.RULES.get(cls, {}):
                missing.append(f"{cls.__name__}.{f.name}")
    assert missing == []


# ------------------------------------------------------------------------------------------------ check_runtime
@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def no_weights(monkeypatch):
    """check_runtime reads config.json files only: loading any model's weights fails the test."""
    from transformers import PreTrainedModel

    def fail(*args, **kwargs):
        raise AssertionError("check_runtime loaded model weights")

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(fail))


def test_the_demo_preset_passes_every_check(no_weights):
    config = load_config(preset="demo")
    assert (model_config(config.blip).vision_config.patch_size, config.scales) == (16, (128, 192))
    check_runtime(config, "demo")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"scales": [100, 192], "caption_scale": 100},
            r"^command line: scales: expected multiples of BLIP's patch size 16 \(vision_config.patch_size of "
            r".*demo/blip\), got \[100, 192\]; e.g. 96 or 112 instead of 100$",
        ),
        ({"segmenter": {"image_size": 100}}, r"segmenter.image_size: .*segmenter's patch size 16 .* got 100; e.g. 96"),
        ({"segmenter": {"image_size": 8}}, r"segmenter.image_size: .*patch size 16 .*got 8; e.g. 16$"),
        ({"caption": {"max_new_tokens": 61}}, r"caption.max_new_tokens: expected <= 60 .* has 64 positions.*got 61"),
        ({"nouns": {"spacy_model": "/etc"}}, r"^command line: nouns.spacy_model: expected an installed spaCy pipeline"),
        ({"nouns": {"spacy_model": "no_such_pipeline"}}, r"^command line: nouns.spacy_model: .*got 'no_such_pipeline'"),
        ({"device": "cuda"}, r"^command line: device: 'cuda' requested but CUDA is not available.*use --device cpu"),
        ({"blip": str(REPO / "no" / "blip")}, r"^command line: blip: no such directory: .*no/blip.*--blip"),
        ({"segmenter": {"source": str(DEMO / "enhancer.safetensors")}}, r"segmenter.source: .* is a file"),
        ({"enhancer": str(DEMO / "nope.safetensors")}, r"^command line: enhancer: no such file: .*nope.safetensors"),
    ],
)
def test_runtime_problems_name_the_key_and_the_fix(no_cuda, no_weights, overrides, message):
    config = load_config(preset="demo", overrides=overrides)
    with pytest.raises(ConfigError, match=message) as err:
        check_runtime(config, "demo", overrides, "command line")
    assert "\n" not in str(err.value)


def test_runtime_problems_of_yaml_values_name_the_yaml(tmp_path, no_cuda, no_weights):
    data = yaml.safe_load(cfg.preset_path("demo").read_text())
    data.update(blip=str(DEMO / "blip"), enhancer=None)
    data["segmenter"].update(source=str(DEMO / "segmenter"), image_size=100)
    path = write(tmp_path, data)
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: segmenter.image_size: .*patch size 16"):
        check_runtime(load_config(path, {"device": "cpu"}), str(path), {"device": "cpu"}, "command line")


def test_half_precision_on_a_cpu_runs_with_one_line_saying_it_is_slow_and_is_fine_on_a_gpu(
    monkeypatch, no_weights, caplog
):
    for dtype in ("float16", "bfloat16"):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        caplog.clear()
        check_runtime(load_config(None, {"dtype": dtype, "device": "auto"}))
        warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert warned == [
            f"{dtype} on CPU: runs, but slowly on CPUs without {dtype} units (float32 is usually faster there)"
        ]
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
        check_runtime(load_config(None, {"dtype": dtype, "device": "auto"}))  # uncached hub ids: model checks skip
        check_runtime(load_config(None, {"dtype": dtype, "device": "cuda:1"}))
        with pytest.raises(ConfigError, match=r"^config: device: expected cuda or cuda:0 .. cuda:1 \(2 GPU\(s\) "):
            check_runtime(load_config(None, {"dtype": dtype, "device": "cuda:2"}))


def test_the_device_must_be_one_of_the_known_forms(no_cuda):
    config = load_config(None, {"device": "cpu"})
    config.device = "tpu"  # set after loading: check_runtime checks types and ranges again
    with pytest.raises(ConfigError, match=r"^config: device: expected one of auto, cpu, cuda, cuda:N or mps"):
        check_runtime(config)
    config.device = "cpu"
    check_runtime(config)


def test_patch_size_comes_from_a_saved_config_or_the_hub_cache_and_is_skipped_when_unknown(tmp_path, monkeypatch):
    from huggingface_hub import constants
    from transformers import BlipConfig

    BlipConfig(vision_config={"patch_size": 16}).save_pretrained(tmp_path / "blip")  # config.json only, no weights
    base = {"device": "cpu", "scales": [100], "caption_scale": None}
    with pytest.raises(ConfigError, match=r"scales: expected multiples of BLIP's patch size 16 .*got \[100\]"):
        check_runtime(load_config(None, {**base, "blip": str(tmp_path / "blip")}))
    snapshot = tmp_path / "hub" / "models--org--tiny-blip" / "snapshots" / ("0" * 40)
    BlipConfig(vision_config={"patch_size": 20}).save_pretrained(snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ConfigError, match=r"patch size 20 \(vision_config.patch_size of org/tiny-blip\).*80 or 100"):
        check_runtime(load_config(None, {**base, "scales": [90], "blip": "org/tiny-blip"}))
    check_runtime(load_config(None, {**base, "scales": [120], "blip": "org/tiny-blip"}))
    assert model_config("org/not-in-the-cache") is None
    check_runtime(load_config(None, {**base, "blip": "org/not-in-the-cache"}))  # unknown patch size: no check


def test_an_enhancer_for_another_blip_width_fails_before_loading(tmp_path, no_cuda, no_weights):
    head = save_enhancer(EmbeddingEnhancer(EnhancerConfig(dim=8, width=8, num_heads=2)), tmp_path / "e.safetensors")
    config = load_config(preset="demo", overrides={"enhancer": str(head)})
    with pytest.raises(ConfigError, match=r"^config: enhancer: .*e.safetensors was trained on 8-d .* has 96-d tokens"):
        check_runtime(config)


def test_a_yaml_alias_bomb_is_refused_in_one_line(tmp_path):
    """457 bytes that expand to billions of values (YAML aliases) under a known key."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]" for i in range(1, 9)]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\nbboost: {k_min: *a8}\n")
    assert path.stat().st_size < 600
    with pytest.raises(ConfigError, match=r"bomb.yaml: expands to over 100,000 values \(YAML aliases\)") as err:
        load_config(path)
    assert "\n" not in str(err.value)
    small = tmp_path / "anchors.yaml"  # aliases themselves are fine
    small.write_text("scales: [&s 128, 192]\ncaption_scale: *s\n")
    assert load_config(small).caption_scale == 128

"""Pipeline configuration: nested dataclasses read from YAML, checked against their types and allowed ranges.

Every problem raises :class:`ConfigError` with one line that names the key by its full path, where it came from and
what is allowed, e.g. ``configs/x.yaml: bboost.k_min: expected an integer >= 1, got 'six'``. Types are read from the
dataclasses' hints (:mod:`autoseg.utils.settings`); ranges live in :data:`RULES` (each segmenter backend brings the
rules of its own options). Checks that need the machine or the models' ``config.json`` files are in
:mod:`autoseg.config_checks`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from autoseg.models.blip import CAPTION_MODES, DEFAULT_BLIP, CaptionConfig
from autoseg.models.segmenters import BACKENDS, SegmenterConfig
from autoseg.utils.settings import (
    NON_EMPTY,
    ConfigError,
    Rule,
    above,
    at_least,
    between,
    config_error,
    find_problem,
    from_dict,
    merge,
    one_of,
    rule,
    show,
    to_dict,
)
from autoseg.vocab.bboost import BBoostConfig
from autoseg.vocab.nouns import NounConfig

__all__ = [
    "ConfigError",
    "PipelineConfig",
    "config_error",
    "from_dict",
    "load_config",
    "preset_path",
    "presets",
    "to_dict",
    "validate_config",
]

DTYPES = ("float32", "float16", "bfloat16")
DEVICE_FORMS = "auto, cpu, cuda, cuda:N or mps"
_DEVICE_RE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
PIPELINE_FILE = "pipeline.yaml"  # the pipeline YAML inside a saved pipeline folder (and a preset)
MAX_SCALE = 2048  # BLIP tokens grow with the square of the side: 2048 px at patch 16 is 16,384 tokens
MAX_CLUSTERS = 64
MAX_YAML_VALUES = 100_000  # a pipeline YAML has ~100; YAML aliases can make a few bytes stand for billions


@dataclass
class PipelineConfig:
    """Everything the auto-vocabulary pipeline needs; every hyperparameter of REFERENCE.md lives here.

    Attributes:
        blip: BLIP captioning model, Hugging Face id or local directory.
        scales: square input sizes at which BLIP patch tokens are extracted for clustering.
        caption_scale: which of ``scales`` the clusters are captioned at (None: the first).
        enhancer: optional embedding-enhancer weights (safetensors) applied to patch tokens before clustering.
        seed: seed of k-means and caption sampling; the same image and seed give the same output.
        device: "cpu", "cuda", "cuda:1", ... ("auto": cuda when available).
        dtype: "float32", "float16" or "bfloat16" (half precision is for GPUs: it runs on CPUs but slowly on those
            without half-precision units).
        batch_size: images encoded together.
        max_names: keep at most this many vocabulary names, those of the largest clusters (None: no cap); the
            segmenter's cost grows with the number of names.
        compile: run BLIP's vision encoder through ``torch.compile`` (first batches slower while it compiles).
    """

    blip: str = DEFAULT_BLIP
    scales: tuple[int, ...] = (384, 512)
    caption_scale: int | None = None
    bboost: BBoostConfig = field(default_factory=BBoostConfig)
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    nouns: NounConfig = field(default_factory=NounConfig)
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)
    enhancer: str | None = None
    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"
    batch_size: int = 4
    max_names: int | None = None
    compile: bool = False


# ---------------------------------------------------------------------------------------------------- allowed ranges
RULES: dict[type, Mapping[str, Rule]] = {
    PipelineConfig: {
        "blip": NON_EMPTY,
        "scales": rule(
            lambda v: len(v) > 0 and all(0 < s <= MAX_SCALE for s in v),
            f"a non-empty list of integers in [1, {MAX_SCALE}]",
            True,
        ),
        "caption_scale": Rule(
            lambda v, c: v in c.scales, lambda c: f"one of the scales {list(c.scales)} or null (the first)", True
        ),
        "enhancer": NON_EMPTY,
        "seed": between(0, 2**32 - 1),
        "device": rule(lambda v: _DEVICE_RE.fullmatch(v) is not None, f"one of {DEVICE_FORMS}", True),
        "dtype": one_of(DTYPES),
        "batch_size": at_least(1),
        "max_names": at_least(1),
    },
    BBoostConfig: {
        "k_min": between(1, MAX_CLUSTERS),
        "k_max": Rule(lambda v, c: c.k_min <= v <= MAX_CLUSTERS, lambda c: f"in [k_min ({c.k_min}), {MAX_CLUSTERS}]"),
        "n_init": between(1, 1000),
        "max_iter": between(0, 100_000),
        "pos_dim": rule(
            lambda v: 0 <= v <= 4096 and v % 4 == 0, "in [0, 4096] and a multiple of 4 (0: no position code)"
        ),
        "pos_weight": at_least(0),
        "crf_weight": at_least(0),
        "crf_theta": above(0),
        "crf_iters": between(0, 1000),
        "majority_max_passes": between(0, 1000),
    },
    CaptionConfig: {
        "mode": one_of(CAPTION_MODES),
        "n_passes": between(1, 100),
        "top_p": rule(lambda v: 0 < v <= 1, "in (0, 1]"),
        "temperature": above(0),
        "num_beams": between(1, 100),
        "repetition_penalty": above(0),
        "min_new_tokens": at_least(0),
        "max_new_tokens": Rule(
            lambda v, c: v >= max(1, c.min_new_tokens), lambda c: f">= 1 and >= min_new_tokens ({c.min_new_tokens})"
        ),
    },
    NounConfig: {
        "spacy_model": NON_EMPTY,
        "tags": rule(lambda v: len(v) > 0, "a non-empty list of part-of-speech tags (e.g. [NN, NNS])", True),
        "min_length": at_least(0),
    },
    SegmenterConfig: {
        "name": Rule(lambda v, _: v in BACKENDS, lambda _: f"one of {list(BACKENDS)}", True),
        "source": rule(lambda v: len(v) > 0, "null (the backend's default model) or a string (not empty)", True),
        "mode": Rule(
            lambda v, c: v in BACKENDS[c.name].modes,
            lambda c: f"one of {list(BACKENDS[c.name].modes)} for segmenter {c.name!r}, or null (its default)",
            True,
        ),
        "threshold": between(0, 1),
        "max_instances": at_least(1),
        "class_chunk": at_least(1),
        "pair_chunk": at_least(1),
    },
}


def rules() -> dict[type, Mapping[str, Rule]]:
    """:data:`RULES` and the rules of every registered backend's own options."""
    return {**RULES, **{backend.options: backend.rules for backend in BACKENDS.values()}}


def validate_config(config: PipelineConfig, source: str = "config") -> None:
    """Check every setting's type (from the dataclass hints) and allowed range (:func:`rules`); loads nothing.

    Args:
        config: a built config (e.g. from :func:`load_config`, or constructed in code).
        source: where it came from, named in the message (e.g. the YAML path).

    Raises:
        ConfigError: the first bad setting; the one-line message names its full key and what is allowed.
    """
    if not isinstance(config, PipelineConfig):
        raise config_error("config", f"expected a PipelineConfig, got {type(config).__name__}", source)
    problem = find_problem(config, PipelineConfig, rules())
    if problem:
        raise config_error(*problem, source)


PRESETS_DIR = Path(__file__).parent / "presets"


def presets() -> list[str]:
    """Names of the pipelines shipped with the package: folders ``autoseg/presets/NAME/`` holding a pipeline.yaml
    and its models, as :meth:`autoseg.pipeline.AutoSegPipeline.save_pretrained` writes them."""
    return sorted(p.parent.name for p in PRESETS_DIR.glob(f"*/{PIPELINE_FILE}"))


def preset_path(name: str) -> Path:
    """The YAML of preset ``name``; an unknown name (or a path: presets are names) lists the available ones."""
    if name not in presets():
        raise ValueError(f"unknown preset {name!r}; available: {presets()}")
    return PRESETS_DIR / name / PIPELINE_FILE


def read_yaml(path: Path) -> Any:
    """A YAML file's data (safe loader), refusing aliases that expand past :data:`MAX_YAML_VALUES` values.

    Raises:
        ConfigError: not valid YAML, or an alias bomb (the message names the file).
    """
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        problem = " ".join(str(e).split())
        raise ConfigError(f"{path}: not valid YAML ({problem})", source=str(path)) from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a text file ({e.reason}); expected a pipeline YAML", source=str(path)) from e
    budget = [MAX_YAML_VALUES]

    def count(node: Any) -> None:  # aliases share objects: count every path to a value, stop at the budget
        budget[0] -= 1
        if budget[0] < 0:
            raise ConfigError(
                f"{path}: expands to over {MAX_YAML_VALUES:,} values (YAML aliases); not a pipeline config",
                source=str(path),
            )
        for child in node.values() if isinstance(node, dict) else node if isinstance(node, list) else ():
            count(child)

    count(data)
    return data


def load_config(
    path: str | os.PathLike | None = None,
    overrides: dict[str, Any] | None = None,
    preset: str | None = None,
    overrides_source: str = "overrides",
) -> PipelineConfig:
    """Read a pipeline YAML (a mapping of ``PipelineConfig`` fields), apply ``overrides`` on top and validate.

    Model paths in a YAML that start with ``./`` or ``../`` are relative to the YAML's folder (so a config can sit
    next to its weights); any other value is a Hugging Face id or a path as given. Every value is checked against
    its type and allowed range (:func:`validate_config`); nothing is loaded.

    Args:
        path: the YAML file, or a folder holding ``pipeline.yaml`` (None: defaults).
        overrides: nested settings applied last (e.g. from command-line flags). Overrides that choose another
            segmenter backend (``segmenter.name``) start its section from that backend's defaults.
        preset: a shipped preset name instead of ``path`` (see :func:`presets`).
        overrides_source: how error messages name the origin of a bad value that came from ``overrides``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ConfigError: (a ``ValueError``) the YAML is not a mapping, or a key is unknown or has a bad type or value;
            the one-line message names the key, its source (the YAML or ``overrides_source``) and what is allowed.
        ValueError: unknown preset; both path and preset given.
    """
    if preset is not None:
        if path is not None:
            raise ValueError("give either a config file or a preset, not both")
        path = preset_path(preset)
    source = "config" if path is None else str(path)
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if p.is_dir() and (p / PIPELINE_FILE).is_file():  # a folder written by save_pretrained
            p = p / PIPELINE_FILE
            source = str(p)
        if not p.is_file():
            raise FileNotFoundError(
                f"{p}: config file not found (expected a pipeline YAML or a folder with {PIPELINE_FILE})"
            )
        data = read_yaml(p) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: expected a mapping of pipeline settings, got {type(data).__name__}", source=source)
        data = data.get("pipeline", data)
        if not isinstance(data, dict):
            raise config_error("pipeline", f"expected a mapping of pipeline settings, got {show(data)}", source)
        data = _resolve_model_paths(data, p.resolve().parent)
    return config_with(data, overrides, source, overrides_source)


def config_with(
    data: Mapping[str, Any],
    overrides: Mapping[str, Any] | None,
    source: str = "config",
    overrides_source: str = "overrides",
) -> PipelineConfig:
    """The checked config of plain settings ``data`` with ``overrides`` on top.

    Overrides that choose another segmenter backend (``segmenter.name``) start its section from that backend's
    defaults: the other backend's own settings would not apply.
    """
    overrides = dict(overrides or {})
    seg = overrides.get("segmenter")
    if isinstance(seg, Mapping) and "name" in seg and isinstance(data.get("segmenter"), Mapping):
        if seg["name"] != data["segmenter"].get("name", SegmenterConfig.name):
            data = {**data, "segmenter": {}}
    try:
        config = from_dict(PipelineConfig, merge(data, overrides), source)
        validate_config(config, source)
    except ConfigError as e:
        raise blame_overrides(e, overrides, overrides_source) from None
    return config


def blame_overrides(error: ConfigError, overrides: dict[str, Any] | None, overrides_source: str) -> ConfigError:
    """``error`` naming ``overrides_source`` as its source when its key was set in ``overrides`` (else unchanged)."""
    if not error.key:
        return error
    data: Any = overrides
    for part in error.key.split("."):
        if not isinstance(data, dict) or part not in data:
            return error
        data = data[part]
    return config_error(error.key, error.problem, overrides_source)


def _resolve_model_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    path_options = {name for backend in BACKENDS.values() for name in backend.path_options}
    keys_list = [("blip",), ("enhancer",), ("segmenter", "source"), *(("segmenter", k) for k in sorted(path_options))]
    for keys in keys_list:
        holder = data
        for k in keys[:-1]:
            holder = holder.get(k) if isinstance(holder.get(k), dict) else {}
        value = holder.get(keys[-1])
        if isinstance(value, str) and value.startswith(("./", "../")):
            holder[keys[-1]] = str((base / value).resolve())
    return data

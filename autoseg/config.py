"""Pipeline configuration: nested dataclasses read from YAML, checked against their types and allowed ranges.

Every problem raises :class:`ConfigError` with one line that names the key by its full path, where it came from and
what is allowed, e.g. ``configs/x.yaml: bboost.k_min: expected an integer >= 1, got 'six'``. Types are read from the
dataclasses' hints (so new fields are checked without more code); ranges live in :data:`RULES`. Checks that need the
machine or the models' ``config.json`` files are in :mod:`autoseg.config_checks`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from autoseg.models.blip import CAPTION_MODES, DEFAULT_BLIP, CaptionConfig
from autoseg.models.segmenters import MODES as SEGMENTER_MODES
from autoseg.models.segmenters import SEGMENTERS, SegmenterConfig
from autoseg.vocab.bboost import BBoostConfig
from autoseg.vocab.nouns import NounConfig

T = TypeVar("T")

DTYPES = ("float32", "float16", "bfloat16")
DEVICE_FORMS = "auto, cpu, cuda, cuda:N or mps"
_DEVICE_RE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


class ConfigError(ValueError):
    """An invalid pipeline setting. The message is one line: ``SOURCE: KEY: what is allowed, got VALUE``.

    Attributes:
        key: dotted path of the bad setting (e.g. ``bboost.k_min``); empty when the problem is the whole file.
        source: where the value came from (a YAML path, "overrides", ...).
    """

    def __init__(self, message: str, key: str = "", source: str = "", problem: str = ""):
        super().__init__(message)
        self.key = key
        self.source = source
        self.problem = problem or message


def config_error(key: str, problem: str, source: str = "config") -> ConfigError:
    """A :class:`ConfigError` whose message reads ``SOURCE: KEY: PROBLEM`` (on one line)."""
    problem = " ".join(problem.split())  # never more than one line
    return ConfigError(f"{source}: {key}: {problem}", key=key, source=source, problem=problem)


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
        dtype: "float32" (use on CPU), "float16" or "bfloat16" (GPU).
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
@dataclass(frozen=True)
class Rule:
    """What a field allows beyond its type.

    Attributes:
        ok: ``ok(value, parent)``; only called on values of the right type (never on None).
        allowed: ``allowed(parent)`` says what is allowed, e.g. ">= 1" (after the type) or "one of [...]".
        replaces_type: ``allowed`` is the whole description (the type is not named before it).
    """

    ok: Callable[[Any, Any], bool]
    allowed: Callable[[Any], str]
    replaces_type: bool = False


def rule(ok: Callable[[Any], bool], allowed: str, replaces_type: bool = False) -> Rule:
    """A :class:`Rule` that looks at the value only."""
    return Rule(lambda v, _: ok(v), lambda _: allowed, replaces_type)


def at_least(lo: float) -> Rule:
    """Numbers ``>= lo``."""
    return rule(lambda v: v >= lo, f">= {lo}")


def above(lo: float) -> Rule:
    """Numbers ``> lo``."""
    return rule(lambda v: v > lo, f"> {lo}")


def between(lo: float, hi: float) -> Rule:
    """Numbers in ``[lo, hi]``."""
    return rule(lambda v: lo <= v <= hi, f"in [{lo}, {hi}]")


def one_of(choices: typing.Iterable[Any]) -> Rule:
    """One of ``choices`` (the message lists them instead of the type)."""
    choices = tuple(choices)
    return rule(lambda v: v in choices, f"one of {list(choices)}", replaces_type=True)


def _template_ok(template: str) -> bool:
    try:
        template.format("x")
    except (IndexError, KeyError, ValueError):
        return False
    return "{}" in template


NON_EMPTY = rule(lambda v: len(v) > 0, "(not empty)")

RULES: dict[type, dict[str, Rule]] = {
    PipelineConfig: {
        "blip": NON_EMPTY,
        "scales": rule(lambda v: len(v) > 0 and all(s > 0 for s in v), "a non-empty list of integers > 0", True),
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
        "k_min": at_least(1),
        "k_max": Rule(lambda v, c: v >= c.k_min, lambda c: f">= k_min ({c.k_min})"),
        "n_init": at_least(1),
        "max_iter": at_least(0),
        "pos_dim": rule(lambda v: v >= 0 and v % 4 == 0, ">= 0 and a multiple of 4 (0: no position code)"),
        "pos_weight": at_least(0),
        "crf_weight": at_least(0),
        "crf_theta": above(0),
        "crf_iters": at_least(0),
        "majority_max_passes": at_least(0),
    },
    CaptionConfig: {
        "mode": one_of(CAPTION_MODES),
        "n_passes": at_least(1),
        "top_p": rule(lambda v: 0 < v <= 1, "in (0, 1]"),
        "temperature": above(0),
        "num_beams": at_least(1),
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
        "name": Rule(lambda v, _: v in SEGMENTERS, lambda _: f"one of {list(SEGMENTERS)}", True),
        "source": rule(lambda v: len(v) > 0, "null (the backend's default model) or a string (not empty)", True),
        "mode": Rule(
            lambda v, c: v in SEGMENTER_MODES.get(c.name, ()),
            lambda c: f"one of {list(SEGMENTER_MODES.get(c.name, ()))} for segmenter {c.name!r}, or null (its default)",
            True,
        ),
        "templates": rule(
            lambda v: len(v) > 0 and all(_template_ok(t) for t in v),
            "a non-empty list of strings, each with one '{}' for the name and no other braces",
            True,
        ),
        "threshold": between(0, 1),
        "score_threshold": between(0, 1),
        "box_threshold": between(0, 1),
        "text_threshold": between(0, 1),
        "sam_source": NON_EMPTY,
        "max_instances": at_least(1),
        "image_size": at_least(1),
        "class_chunk": at_least(1),
        "pair_chunk": at_least(1),
    },
}


# ---------------------------------------------------------------------------------------------------- type checks
def _union_args(hint: Any) -> tuple[Any, ...]:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return typing.get_args(hint)
    return ()


def _is_tuple(hint: Any) -> bool:
    return typing.get_origin(hint) is tuple or any(typing.get_origin(a) is tuple for a in _union_args(hint))


def type_matches(value: Any, hint: Any) -> bool:
    """Whether ``value`` has type ``hint`` as a config reads it: bool is not an int, an int is a float, NaN is not."""
    if _union_args(hint):
        return any(type_matches(value, a) for a in _union_args(hint))
    if hint is type(None) or hint is None:
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, tuple | list):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(type_matches(v, args[0]) for v in value)
        return len(value) == len(args) and all(type_matches(v, a) for v, a in zip(value, args, strict=True))
    if typing.get_origin(hint) is typing.Literal:
        return value in typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return isinstance(value, hint)
    return True  # a hint these configs do not use: not checked


def describe_type(hint: Any, plural: bool = False) -> str:
    """The type a config value needs, in words ("an integer", "a list of strings", "a number or null")."""
    if _union_args(hint):
        parts = [describe_type(a, plural) for a in _union_args(hint) if a is not type(None)]
        return " or ".join(parts + (["null"] if type(None) in _union_args(hint) else []))
    names = {int: ("an integer", "integers"), float: ("a number", "numbers"), str: ("a string", "strings")}
    if hint in names:
        return names[hint][plural]
    if hint is bool:
        return "true or false"
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {describe_type(args[0], plural=True)}"
        return f"a list of {len(args)}: [{', '.join(describe_type(a) for a in args)}]"
    if typing.get_origin(hint) is typing.Literal:
        return f"one of {list(typing.get_args(hint))}"
    if dataclasses.is_dataclass(hint):
        return f"a mapping of {hint.__name__} settings ({', '.join(f.name for f in dataclasses.fields(hint))})"
    return str(hint)


def show(value: Any, limit: int = 80) -> str:
    """A value as it appears in messages (tuples as lists), shortened to ``limit`` characters."""
    text = repr(list(value) if isinstance(value, tuple) else value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def find_problem(config: Any, cls: type, prefix: str = "") -> tuple[str, str] | None:
    """The first bad setting of dataclass instance ``config`` (checked as ``cls``), as ``(key, problem)``; or None.

    Types of all fields (recursively) are checked before any range, so a rule may compare fields of its parent.
    """
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls)]
    rules = RULES.get(cls, {})
    for name in fields:
        value, hint, key = getattr(config, name), hints[name], f"{prefix}{name}"
        if not type_matches(value, hint):
            return key, f"expected {_expected(hint, rules.get(name), config)}, got {show(value)}"
        if dataclasses.is_dataclass(hint):
            problem = find_problem(value, hint, f"{key}.")
            if problem:
                return problem
    for name in fields:
        value, r = getattr(config, name), rules.get(name)
        if r is not None and value is not None and not r.ok(value, config):
            return f"{prefix}{name}", f"expected {_expected(hints[name], r, config)}, got {show(value)}"
    return None


def _expected(hint: Any, r: Rule | None, parent: Any) -> str:
    if r is None:
        return describe_type(hint)
    if r.replaces_type:
        return r.allowed(parent)
    args = _union_args(hint)
    if type(None) in args:  # "a string (not empty) or null"
        kept = " or ".join(describe_type(a) for a in args if a is not type(None))
        return f"{kept} {r.allowed(parent)} or null"
    return f"{describe_type(hint)} {r.allowed(parent)}"


def validate_config(config: PipelineConfig, source: str = "config") -> None:
    """Check every setting's type (from the dataclass hints) and allowed range (:data:`RULES`); loads nothing.

    Args:
        config: a built config (e.g. from :func:`load_config`, or constructed in code).
        source: where it came from, named in the message (e.g. the YAML path).

    Raises:
        ConfigError: the first bad setting; the one-line message names its full key and what is allowed.
    """
    if not isinstance(config, PipelineConfig):
        raise config_error("config", f"expected a PipelineConfig, got {type(config).__name__}", source)
    problem = find_problem(config, PipelineConfig)
    if problem:
        raise config_error(*problem, source)


# ---------------------------------------------------------------------------------------------------- building
def from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "config") -> T:
    """Build dataclass ``cls`` from a (nested) dict; unknown keys raise a :class:`ConfigError` naming the allowed ones.

    Lists become tuples where the field is a tuple; values are not checked here (see :func:`validate_config`).

    Args:
        where: the source named in error messages (e.g. the YAML path).
    """
    return _build(cls, data, where, "")


def _build(cls: type[T], data: dict[str, Any] | None, where: str, prefix: str) -> T:
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        section = f" in {prefix[:-1]}" if prefix else ""
        raise config_error(f"{prefix}{unknown[0]}", f"unknown key; allowed{section}: {sorted(names)}", where)
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = _build(hint, value, where, f"{prefix}{key}.")
        elif _is_tuple(hint) and isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)


def to_dict(config: Any) -> dict[str, Any]:
    """Plain-data view of a config (tuples as lists), suitable for YAML/JSON."""
    return _plain(dataclasses.asdict(config))


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    return x


PRESETS_DIR = Path(__file__).parent / "presets"
MODEL_PATH_KEYS = (("blip",), ("enhancer",), ("segmenter", "source"), ("segmenter", "sam_source"))


def presets() -> list[str]:
    """Names of the pipeline presets shipped with the package (``autoseg/presets/NAME.yaml``)."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def preset_path(name: str) -> Path:
    """The YAML of preset ``name``; an unknown name (or a path: presets are names) lists the available ones."""
    path = PRESETS_DIR / f"{name}.yaml"
    if name not in presets() or not path.is_file():
        raise ValueError(f"unknown preset {name!r}; available: {presets()}")
    return path


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
        path: the YAML file (None: defaults).
        overrides: nested settings applied last (e.g. from command-line flags).
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
        if not p.is_file():
            raise FileNotFoundError(f"{p}: config file not found")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            problem = " ".join(str(e).split())
            raise ConfigError(f"{p}: not valid YAML ({problem})", source=source) from e
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: expected a mapping of pipeline settings, got {type(data).__name__}", source=source)
        data = data.get("pipeline", data)
        if not isinstance(data, dict):
            raise config_error("pipeline", f"expected a mapping of pipeline settings, got {show(data)}", source)
        data = _resolve_model_paths(data, p.resolve().parent)
    overrides = overrides or {}
    try:
        config = from_dict(PipelineConfig, _merge(data, overrides), source)
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
    for keys in MODEL_PATH_KEYS:
        holder = data
        for k in keys[:-1]:
            holder = holder.get(k) if isinstance(holder.get(k), dict) else {}
        value = holder.get(keys[-1])
        if isinstance(value, str) and value.startswith(("./", "../")):
            holder[keys[-1]] = str((base / value).resolve())
    return data


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out

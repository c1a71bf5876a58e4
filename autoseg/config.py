"""Pipeline configuration: nested dataclasses read from YAML, with errors that list the allowed keys."""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from autoseg.models.blip import DEFAULT_BLIP, CaptionConfig
from autoseg.models.segmenter import SegmenterConfig
from autoseg.vocab.bboost import BBoostConfig
from autoseg.vocab.nouns import NounConfig

T = TypeVar("T")


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


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "config") -> T:
    """Build dataclass ``cls`` from a (nested) dict; unknown keys raise a ``ValueError`` naming the allowed ones."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = from_dict(hint, value, f"{where}.{key}")
        elif _is_tuple(hint) and isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)


def _is_tuple(hint: Any) -> bool:
    origins = {typing.get_origin(a) for a in typing.get_args(hint)} if isinstance(hint, types.UnionType) else set()
    return typing.get_origin(hint) is tuple or tuple in origins


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
MODEL_PATH_KEYS = (("blip",), ("enhancer",), ("segmenter", "source"))


def presets() -> list[str]:
    """Names of the pipeline presets shipped with the package (``autoseg/presets/NAME.yaml``)."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def preset_path(name: str) -> Path:
    """The YAML of preset ``name``; an unknown name lists the available ones."""
    path = PRESETS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown preset {name!r}; available: {presets()}")
    return path


def load_config(
    path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None, preset: str | None = None
) -> PipelineConfig:
    """Read a pipeline YAML (a mapping of ``PipelineConfig`` fields) and apply ``overrides`` on top.

    Model paths in a YAML that start with ``./`` or ``../`` are relative to the YAML's folder (so a config can sit
    next to its weights); any other value is a Hugging Face id or a path as given.

    Args:
        path: the YAML file (None: defaults).
        overrides: nested settings applied last (e.g. from command-line flags).
        preset: a shipped preset name instead of ``path`` (see :func:`presets`).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the YAML is not a mapping or has unknown keys; unknown preset; both path and preset given.
    """
    if preset is not None:
        if path is not None:
            raise ValueError("give either a config file or a preset, not both")
        path = preset_path(preset)
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"{p}: config file not found")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{p}: not valid YAML ({e})") from e
        if not isinstance(data, dict):
            raise ValueError(f"{p}: expected a mapping of pipeline settings, got {type(data).__name__}")
        data = _resolve_model_paths(data.get("pipeline", data), p.resolve().parent)
    data = _merge(data, overrides or {})
    return from_dict(PipelineConfig, data, str(path or "config"))


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

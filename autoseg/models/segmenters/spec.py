"""What every segmenter backend declares (:class:`Backend`) and the settings common to all of them.

Each backend file (``clipseg.py``, ``sam3.py``, ``grounded_sam.py``) defines one :class:`Backend`; ``BACKENDS`` in
``__init__.py`` lists them. Inference, the config checks, training and the page read only this registry, so adding a
backend is one new file plus its entry there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from autoseg.utils.settings import FLAT_OPTIONS, Rule

if TYPE_CHECKING:
    from autoseg.models.segmenters.base import Segmenter


@dataclass
class NoOptions:
    """A backend without settings of its own."""


@dataclass(frozen=True)
class Backend:
    """Everything AutoSeg knows of one segmenter backend.

    Attributes:
        name: the name users write (``segmenter.name``, ``--segmenter-backend``).
        summary: one line for ``--help`` and error messages.
        default_source: the model loaded when ``segmenter.source`` is null (the one place its hub id is named).
        modes: the ways it makes a label map; the first is its default.
        model_types: ``model_type`` values of the ``config.json`` of a source it loads.
        options: dataclass of its own settings, written beside the common ones under ``segmenter:``.
        rules: allowed ranges of the ``options`` fields.
        load: ``load(source, config, flag) -> parts``: its models and processors from a hub id or a local folder
            (``flag``: how the user set ``source``, named in errors).
        make: ``make(words, **size) -> parts``: the same with random weights (``scratch:NAME`` sources, tests).
        assemble: ``assemble(parts, config) -> Segmenter``.
        scratch_sizes: the sizes ``scratch:NAME`` names (``make`` arguments).
        model_sources: ``model_sources(config) -> {setting: source}``: every model it loads, for the checks (default:
            ``segmenter.source``).
        check: ``check(config, read_model_config, where)``: its own checks against the models' ``config.json``
            (raises :class:`autoseg.utils.settings.ConfigError`); ``read_model_config(source)`` gives a transformers
            config or None.
        path_options: options holding model paths (``./`` in a YAML is relative to the YAML, as for ``source``).
        threshold_modes: the modes in which ``segmenter.threshold`` (unlabelled below a probability) applies.
        trainable: ``SegmenterModule`` can fine-tune it (per-name logits).
    """

    name: str
    summary: str
    default_source: str
    modes: tuple[str, ...]
    model_types: tuple[str, ...]
    load: Callable[[str, SegmenterConfig, str], tuple]
    make: Callable[..., tuple]
    assemble: Callable[[tuple, SegmenterConfig], Segmenter]
    scratch_sizes: Mapping[str, Mapping[str, Any]]
    options: type = NoOptions
    rules: Mapping[str, Rule] = field(default_factory=dict)
    model_sources: Callable[[SegmenterConfig], dict[str, str]] | None = None
    check: Callable[[SegmenterConfig, Callable[[str], Any], str], None] | None = None
    path_options: tuple[str, ...] = ()
    threshold_modes: tuple[str, ...] = ()
    trainable: bool = False

    def sources(self, config: SegmenterConfig) -> dict[str, str]:
        """Every model source ``config`` loads, by the setting that names it."""
        if self.model_sources is not None:
            return self.model_sources(config)
        return {"segmenter.source": segmenter_source(config)}


def _options_of(data: Mapping[str, Any]) -> type | None:
    """The options dataclass of the backend named in a raw ``segmenter:`` mapping (None: unknown name)."""
    from autoseg.models.segmenters import BACKENDS

    backend = BACKENDS.get(data.get("name", "clipseg")) if isinstance(data.get("name", "clipseg"), str) else None
    return backend.options if backend is not None else None


@dataclass
class SegmenterConfig:
    """Settings of the open-vocabulary segmenter: those common to every backend, and the backend's own (``options``).

    In a YAML both are written side by side under ``segmenter:``; ``options`` holds the chosen backend's fields
    (``BACKENDS[name].options``), e.g. ``templates`` and ``image_size`` for clipseg.

    Attributes:
        name: backend, a key of ``BACKENDS`` (clipseg, sam3, grounded_sam).
        source: Hugging Face id, local directory or ``scratch:NAME`` of the weights; null: the backend's default.
        mode: how the label map is made ("semantic": per-name logits, argmax; "instances": scored masks, merged);
            null: the backend's default (the first of its modes).
        threshold: semantic modes: a pixel whose best name scores below this probability is unlabelled (0). 0 gives
            every pixel a name, as the original AutoSeg does.
        max_instances: instance modes: at most this many best-scoring instances per image.
        class_chunk: names (or masks) upsampled to full image size at a time (bounds memory on large images).
        pair_chunk: (image, name) pairs decoded per call (Grounded SAM: prompts per Grounding DINO call and boxes per
            SAM call); bounds memory.
        options: the backend's own settings (None: its defaults).
    """

    name: str = "clipseg"
    source: str | None = None
    mode: str | None = None
    threshold: float = 0.0
    max_instances: int = 100
    class_chunk: int = 8
    pair_chunk: int = 8
    options: Any = field(default=None, metadata={FLAT_OPTIONS: _options_of})

    def __post_init__(self) -> None:
        if self.options is None:
            options = _options_of({"name": self.name})
            self.options = options() if options is not None else None

    def with_options(self, **values: Any) -> SegmenterConfig:
        """A copy with some of the backend's own settings changed."""
        return dataclasses.replace(self, options=dataclasses.replace(self.options, **values))


def backend_of(config: SegmenterConfig) -> Backend:
    """The registered backend of ``config``; an unknown name lists the available ones."""
    from autoseg.models.segmenters import BACKENDS

    if config.name not in BACKENDS:
        raise ValueError(f"unknown segmenter {config.name!r}; available: {list(BACKENDS)}")
    return BACKENDS[config.name]


def segmenter_source(config: SegmenterConfig) -> str:
    """The model source of ``config``: its ``source`` or the backend's default id."""
    return config.source if config.source is not None else backend_of(config).default_source


def segmenter_mode(config: SegmenterConfig) -> str:
    """The mode of ``config``: its ``mode`` or the backend's default."""
    return config.mode if config.mode is not None else backend_of(config).modes[0]


def vision_setting(model_config: Any, attr: str) -> int | None:
    """A positive integer ``vision_config.<attr>`` of a transformers config (None when absent)."""
    value = getattr(getattr(model_config, "vision_config", None), attr, None)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def nearest_multiples(value: int, step: int) -> str:
    """The multiples of ``step`` around ``value``, for messages ("320 or 352")."""
    low, high = value // step * step, (value // step + 1) * step
    return f"{low} or {high}" if low > 0 else str(high)

"""Checks of a pipeline config against this machine and the models' ``config.json`` files; no weights are loaded.

:func:`check_runtime` runs after :func:`autoseg.config.load_config` and before any model loads: the device exists,
the model paths exist, the spaCy pipeline is installed, the scales fit BLIP's patch size, the caption length fits
BLIP's text decoder, the enhancer was trained on tokens of BLIP's width, and the segmenter's model is of the kind its
backend loads (a CLIPSeg for clipseg, a SAM 3 for sam3, ...) plus the backend's own checks (``Backend.check``).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

import torch

from autoseg.config import DEVICE_FORMS, ConfigError, PipelineConfig, blame_overrides, config_error, validate_config
from autoseg.models import blip as blip_module
from autoseg.models.loading import is_scratch, scratch_model_config, scratch_size
from autoseg.models.segmenters import BACKENDS, backend_of
from autoseg.models.segmenters.spec import nearest_multiples, vision_setting

log = logging.getLogger("autoseg")
FLAGS = {"blip": "--blip", "segmenter.source": "--segmenter", "enhancer": "--enhancer"}


def check_runtime(
    config: PipelineConfig,
    source: str = "config",
    overrides: dict[str, Any] | None = None,
    overrides_source: str = "overrides",
) -> None:
    """Check what a valid config needs from this machine and its models, reading only ``config.json`` files.

    A model's ``config.json`` is read from its local directory or, for a Hugging Face id, from the local cache only
    (never the network); the checks that need it are skipped when it cannot be found.

    Args:
        config: the pipeline config (types and ranges are checked first, see :func:`autoseg.config.validate_config`).
        source: where the config came from, named in the message (e.g. the YAML path).
        overrides: the settings given on top of that file (as passed to ``load_config``): a problem with one of
            them names ``overrides_source`` (e.g. "command line") instead of ``source``.

    Raises:
        ConfigError: the first problem; the one-line message names the key, what is allowed and how to fix it.
    """
    try:
        _check_runtime(config, source)
    except ConfigError as e:
        raise blame_overrides(e, overrides, overrides_source) from None


def _check_runtime(config: PipelineConfig, source: str) -> None:
    validate_config(config, source)
    device = resolve_device(config.device, source)
    if device.type == "cpu" and config.dtype != "float32":
        log.warning(
            "%s on CPU: runs, but slowly on CPUs without %s units (float32 is usually faster there)",
            config.dtype,
            config.dtype,
        )
    check_model_source("blip", config.blip, source=source)
    for key, where in backend_of(config.segmenter).sources(config.segmenter).items():
        check_model_source(key, where, source=source)
    _check_spacy(config.nouns.spacy_model, source)
    if config.enhancer is not None and not Path(config.enhancer).expanduser().is_file():
        raise config_error(
            "enhancer",
            f"no such file: {config.enhancer}; expected a .safetensors head exported by `train.py fit` "
            "(under <log_dir>/export/), or leave it unset",
            source,
        )
    blip = model_config(config.blip)
    if blip is not None:
        _check_blip(config, blip, source)
    _check_segmenter(config, source)


def _check_spacy(name: str | None, source: str) -> None:
    """A named spaCy pipeline must be an installed package or a pipeline folder (``config.cfg`` + ``meta.json``)."""
    if name is None:
        return
    path = Path(name).expanduser()
    if path.is_dir() and (path / "config.cfg").is_file():
        return
    if not path.exists() and "/" not in name and importlib.util.find_spec(name) is not None:
        return
    raise config_error(
        "nouns.spacy_model",
        f"expected an installed spaCy pipeline package (e.g. en_core_web_sm) or a pipeline folder with config.cfg, "
        f"got {name!r}; or leave it null for the default",
        source,
    )


def resolve_device(device: str, source: str = "config") -> torch.device:
    """The torch device that ``device`` ("auto", "cpu", "cuda", "cuda:N", "mps") means on this machine.

    Raises:
        ConfigError: not one of those forms, or the accelerator it names is not available here.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps") or (dev.type != "cuda" and dev.index is not None):
        raise config_error("device", f"expected one of {DEVICE_FORMS}, got {device!r}", source)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise config_error(
                "device",
                f"{device!r} requested but CUDA is not available (torch {torch.__version__}, no GPU visible); "
                "use --device cpu (or auto)",
                source,
            )
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise config_error(
                "device",
                f"expected cuda or cuda:0 .. cuda:{count - 1} ({count} GPU(s) visible), got {device!r}",
                source,
            )
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise config_error("device", f"{device!r} requested but MPS is not available here; use --device cpu", source)
    return dev


def _looks_like_path(name: str) -> bool:
    """Whether a model source that does not exist was meant as a local path (the rule of ``load_pretrained``)."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def check_model_source(key: str, name: str, flag: str | None = None, source: str = "config") -> None:
    """A model source must be an existing directory, a name that can be a Hugging Face id (``org/name``) or
    ``scratch:NAME`` of a registered size.

    Args:
        key: the setting (``blip``, ``segmenter.source``, ...).
        flag: how a user sets it, named in the message (default: the command-line flag of ``key``, else ``key``).

    Raises:
        ConfigError: a file instead of a directory, a path that does not exist, an unknown scratch size.
    """
    flag = flag or FLAGS.get(key, key)
    if is_scratch(name):
        sizes = _scratch_sizes(key)
        try:
            scratch_size(name, sizes, key)
        except ValueError:
            raise config_error(key, f"unknown scratch size in {name!r}; available: {sorted(sizes)}", source) from None
        return
    path = Path(name).expanduser()
    if path.exists() and not path.is_dir():
        raise config_error(key, f"{name} is a file; expected a model directory (save_pretrained output)", source)
    if not path.exists() and _looks_like_path(name):
        raise config_error(
            key,
            f"no such directory: {name}; expected a model directory (save_pretrained output) or a Hugging Face id "
            f"(org/name), e.g. via {flag}",
            source,
        )


def _scratch_sizes(key: str, backend: str | None = None) -> dict[str, Any]:
    if key == "blip":
        return blip_module.SCRATCH_SIZES
    names = [backend] if backend else list(BACKENDS)
    return {size: spec for n in names for size, spec in BACKENDS[n].scratch_sizes.items()}


def model_config(name: str, key: str = "blip", backend: str | None = None) -> Any | None:
    """The ``transformers`` config of a local model directory or a cached Hugging Face id; None when not found.

    Reads ``config.json`` only (``local_files_only``: never the network); unknown model types also give None. For a
    ``scratch:NAME`` source of setting ``key`` (of segmenter ``backend``), the registered size's vision settings.
    """
    from transformers import AutoConfig

    if is_scratch(name):
        sizes = _scratch_sizes(key, backend)
        size = sizes.get(name.split(":", 1)[1])
        model_type = "blip" if key == "blip" else BACKENDS[backend].model_types[0] if backend else ""
        return scratch_model_config(size, model_type) if size is not None else None
    path = Path(name).expanduser()
    if not path.is_dir() and _looks_like_path(name):
        return None
    try:
        return AutoConfig.from_pretrained(str(path) if path.is_dir() else name, local_files_only=True)
    except (OSError, ValueError, KeyError):
        return None


def _check_blip(config: PipelineConfig, blip: Any, source: str) -> None:
    patch = vision_setting(blip, "patch_size")
    if patch is not None:
        bad = [s for s in config.scales if s % patch]
        if bad:
            raise config_error(
                "scales",
                f"expected multiples of BLIP's patch size {patch} (vision_config.patch_size of {config.blip}), "
                f"got {list(config.scales)}; e.g. {nearest_multiples(bad[0], patch)} instead of {bad[0]}",
                source,
            )
    positions = getattr(getattr(blip, "text_config", None), "max_position_embeddings", None)
    prompt_tokens = 1 + len(config.caption.prompt.split())  # [DEC] + at least one token per word
    if isinstance(positions, int) and prompt_tokens + config.caption.max_new_tokens > positions:
        raise config_error(
            "caption.max_new_tokens",
            f"expected <= {positions - prompt_tokens} (BLIP's text decoder has {positions} positions and the prompt "
            f"{config.caption.prompt!r} takes at least {prompt_tokens}), got {config.caption.max_new_tokens}",
            source,
        )
    width = vision_setting(blip, "hidden_size")
    dim = _enhancer_dim(config.enhancer) if config.enhancer is not None else None
    if width is not None and dim is not None and dim != width:
        raise config_error(
            "enhancer",
            f"{config.enhancer} was trained on {dim}-d BLIP tokens but BLIP {config.blip} has {width}-d tokens; "
            "use the BLIP it was trained with",
            source,
        )


def _enhancer_dim(path: str) -> int | None:
    """The token width an enhancer head was trained on, from its safetensors metadata (no tensors are read)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(Path(path).expanduser()), framework="pt", device="cpu") as f:
            dim = json.loads((f.metadata() or {}).get("config", "{}")).get("dim")
    except (SafetensorError, OSError, ValueError, AttributeError):
        return None
    return dim if isinstance(dim, int) else None


def _check_segmenter(config: PipelineConfig, source: str) -> None:
    """The segmenter's model is of a type its backend loads; then the backend's own checks."""
    seg = config.segmenter
    backend = backend_of(seg)
    read = functools.cache(lambda name: model_config(name, "segmenter.source", seg.name))  # each config.json once
    where = backend.sources(seg)["segmenter.source"]
    model = read(where)
    if model is not None and model.model_type not in backend.model_types:
        others = [name for name, b in BACKENDS.items() if model.model_type in b.model_types]
        hint = f"use --segmenter-backend {others[0]}, or " if others else ""
        raise config_error(
            "segmenter.source",
            f"{where} holds a {model.model_type!r} model but segmenter {seg.name!r} loads {list(backend.model_types)}; "
            f"{hint}pass a {seg.name} model with --segmenter (default {backend.default_source})",
            source,
        )
    if backend.check is not None:
        backend.check(seg, read, source)

"""Checks of a pipeline config against this machine and the models' ``config.json`` files; no weights are loaded.

:func:`check_runtime` runs after :func:`autoseg.config.load_config` and before any model loads: the device exists,
the dtype suits it, the model paths exist, the scales fit BLIP's patch size, the segmenter's input size fits its patch
size, the caption length fits BLIP's text decoder, and the enhancer was trained on tokens of BLIP's width; the
segmenter's model is of the kind its backend loads (a CLIPSeg for clipseg, a SAM 3 for sam3, ...).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from autoseg.config import DEVICE_FORMS, ConfigError, PipelineConfig, blame_overrides, config_error, validate_config
from autoseg.models.segmenters import DEFAULT_SOURCES, MODEL_TYPES, segmenter_source
from autoseg.models.segmenters.grounded_sam import DEFAULT_SAM, grounded_sources


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
        how = " ('auto' found no GPU)" if config.device == "auto" else ""
        raise config_error(
            "dtype",
            f"expected float32 on CPU (float16 and bfloat16 are for GPUs), got {config.dtype!r} with device "
            f"{config.device!r}{how}; use --dtype float32, or a CUDA device",
            source,
        )
    check_model_source("blip", config.blip, "--blip", source)
    _check_segmenter_sources(config, source)
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


def check_model_source(key: str, name: str, flag: str, source: str = "config") -> None:
    """A model source must be an existing directory, or a name that can be a Hugging Face id (``org/name``).

    Raises:
        ConfigError: a file instead of a directory, or a path that does not exist.
    """
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


def model_config(name: str) -> Any | None:
    """The ``transformers`` config of a local model directory or a cached Hugging Face id; None when not found.

    Reads ``config.json`` only (``local_files_only``: never the network); unknown model types also give None.
    """
    from transformers import AutoConfig

    path = Path(name).expanduser()
    if not path.is_dir() and _looks_like_path(name):
        return None
    try:
        return AutoConfig.from_pretrained(str(path) if path.is_dir() else name, local_files_only=True)
    except (OSError, ValueError, KeyError):
        return None


def _vision(model: Any, attr: str) -> int | None:
    value = getattr(getattr(model, "vision_config", None), attr, None)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _nearest_multiples(value: int, step: int) -> str:
    low, high = value // step * step, (value // step + 1) * step
    return f"{low} or {high}" if low > 0 else str(high)


def _check_blip(config: PipelineConfig, blip: Any, source: str) -> None:
    patch = _vision(blip, "patch_size")
    if patch is not None:
        bad = [s for s in config.scales if s % patch]
        if bad:
            raise config_error(
                "scales",
                f"expected multiples of BLIP's patch size {patch} (vision_config.patch_size of {config.blip}), "
                f"got {list(config.scales)}; e.g. {_nearest_multiples(bad[0], patch)} instead of {bad[0]}",
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
    width = _vision(blip, "hidden_size")
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


def _check_segmenter_sources(config: PipelineConfig, source: str) -> None:
    seg = config.segmenter
    check_model_source("segmenter.source", segmenter_source(seg), "--segmenter", source)
    if seg.name == "grounded_sam":  # its SAM: sam_source, the sam/ of a combined folder, or the default id
        _, sam = grounded_sources(segmenter_source(seg), seg.sam_source)
        check_model_source("segmenter.sam_source", sam, "segmenter.sam_source", source)


def _check_segmenter(config: PipelineConfig, source: str) -> None:
    seg = config.segmenter
    where = segmenter_source(seg)
    if seg.name == "grounded_sam":
        where, sam_where = grounded_sources(where, seg.sam_source)
        sam = model_config(sam_where)
        if sam is not None and sam.model_type != "sam":
            raise config_error(
                "segmenter.sam_source",
                f"{sam_where} holds a {sam.model_type!r} model; grounded_sam needs a SAM ('sam', e.g. {DEFAULT_SAM})",
                source,
            )
    model = model_config(where)
    if model is None:
        return
    expected = MODEL_TYPES[seg.name]
    if model.model_type not in expected:
        others = [name for name, types in MODEL_TYPES.items() if model.model_type in types]
        hint = f"use --segmenter-backend {others[0]}, or " if others else ""
        raise config_error(
            "segmenter.source",
            f"{where} holds a {model.model_type!r} model but segmenter {seg.name!r} loads {list(expected)}; "
            f"{hint}pass a {seg.name} model with --segmenter (default {DEFAULT_SOURCES[seg.name]})",
            source,
        )
    if seg.name != "clipseg":
        return  # SAM 3, Grounding DINO and SAM take their input size from their processors
    patch = _vision(model, "patch_size")
    size = seg.image_size
    if patch is not None and size % patch:
        raise config_error(
            "segmenter.image_size",
            f"expected a multiple of the segmenter's patch size {patch} (vision_config.patch_size of "
            f"{where}; other sizes crop the image's right and bottom edge), got {size}; "
            f"e.g. {_nearest_multiples(size, patch)}",
            source,
        )

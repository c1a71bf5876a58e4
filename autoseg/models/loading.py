"""One entry point for pretrained weights: a Hugging Face id, a local directory or ``scratch:NAME``, with errors that
say how to fix.

``scratch:NAME`` builds a randomly initialised model of a registered size with an offline tokenizer (see
:mod:`autoseg.models.scratch`); no network and no files are needed, which is what the debug configs and the tests use.
The random initialisation is seeded (``SCRATCH_SEED``), so the same source always gives the same weights: checkpoints
leave frozen weights out and take them from the source again when loaded.
"""

from __future__ import annotations

import inspect
import os
import socket
from collections.abc import Callable, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar
from urllib.parse import urlparse

from safetensors import SafetensorError

T = TypeVar("T")
SCRATCH_PREFIX = "scratch:"
SCRATCH_SEED = 0


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message names the source and how to provide it."""


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def load_pretrained(source: str | os.PathLike, what: str, loader: Callable[..., T], flag: str = "") -> T:
    """Load with ``loader(source, local_files_only=...)`` from a local directory or a hub id.

    A local directory is loaded as is. A hub id is first looked up in the local cache only (fast, no network);
    only when that misses and the hub is not marked offline is a download attempted, with short timeouts.

    Args:
        source: Hugging Face id (``org/name``) or local directory.
        what: human name for messages, e.g. "BLIP captioner".
        loader: e.g. ``BlipForConditionalGeneration.from_pretrained``.
        flag: the command-line flag that sets this source, named in the error.

    Raises:
        ModelLoadError: not loadable; the message names ``source`` and how to pass a local directory.
    """
    source = str(source)
    path = Path(source).expanduser()
    hint = f" (pass a local directory with {flag})" if flag else ""
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"{what}: {source} is a file; expected a model directory (save_pretrained output)")
        try:
            return loader(str(path), local_files_only=True)
        except SafetensorError as e:  # transformers lets the reader's error through, without the file's name
            raise ModelLoadError(
                f"{what}: the weights in {source} are damaged or truncated ({', '.join(_weight_files(path))}: {e}); "
                "save or copy the directory again"
            ) from e
        except (OSError, ValueError) as e:
            raise ModelLoadError(
                f"{what}: could not load the directory {source}: {e}\n"
                f"Expected a directory written by save_pretrained (config.json + weights + processor files){hint}."
            ) from e
    if source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise ModelLoadError(f"{what}: no such directory: {source}{hint}")
    try:
        return loader(source, local_files_only=True)
    except SafetensorError as e:
        raise ModelLoadError(
            f"{what}: the cached weights of '{source}' are damaged or truncated ({e}); remove them with "
            f"`hf cache rm model/{source}` and download again, or pass a local directory{hint}"
        ) from e
    except (OSError, ValueError) as cached_error:
        if hub_offline():
            raise ModelLoadError(_offline_message(what, source, flag, "HF_HUB_OFFLINE is set")) from cached_error
    reachable, why = hub_reachable()
    if not reachable:  # huggingface_hub would retry for ~30 s before giving up
        raise ModelLoadError(_offline_message(what, source, flag, why))
    try:
        return loader(source)
    except Exception as e:  # network, auth and missing-repo errors all mean the same thing to the user
        raise ModelLoadError(_offline_message(what, source, flag, f"{type(e).__name__}: {str(e)[:300]}")) from e


def _weight_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.safetensors")) or ["no *.safetensors file"]


def hub_reachable(timeout: float = 3.0) -> tuple[bool, str]:
    """Whether the Hugging Face endpoint accepts a TCP connection within ``timeout`` seconds (and why not)."""
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True, ""
    except OSError as e:
        return False, f"{url.hostname} unreachable: {e}"


def _offline_message(what: str, source: str, flag: str, reason: str) -> str:
    how = f"pass it with {flag} DIR" if flag else "pass that directory instead of the id"
    return (
        f"{what}: could not load '{source}': it is not a local directory, not in the Hugging Face cache, and the hub "
        f"could not be used ({reason}).\n"
        f"On a machine with internet run `hf download {source} --local-dir DIR` (or `save_pretrained(DIR)`), copy DIR "
        f"here and {how}."
    )


def is_scratch(source: str | os.PathLike | None) -> bool:
    """Whether ``source`` names a random model of a registered size (``scratch:NAME``)."""
    return isinstance(source, str) and source.startswith(SCRATCH_PREFIX)


def scratch_size(source: str, sizes: Mapping[str, Mapping[str, Any]], what: str) -> dict[str, Any]:
    """The registered size that ``scratch:NAME`` names; an unknown name lists the available ones."""
    name = source[len(SCRATCH_PREFIX) :]
    if name not in sizes:
        raise ValueError(f"{what} source {source!r}: unknown scratch size {name!r}; available: {sorted(sizes)}")
    return dict(sizes[name])


def build_scratch(
    source: str,
    sizes: Mapping[str, Mapping[str, Any]],
    what: str,
    make: Callable[..., T],
    overrides: Mapping[str, Any] | None = None,
    **extra: Any,
) -> T:
    """``make(**size, **extra)`` for a ``scratch:NAME`` source with seeded weights; ``overrides`` change the size.

    Raises:
        ValueError: an unknown size name, or an override that ``make`` does not take.
    """
    size = scratch_size(source, sizes, what)
    allowed = set(inspect.signature(make).parameters) - set(extra)
    unknown = sorted(set(overrides or {}) - allowed)
    if unknown:
        raise ValueError(f"{what} scratch options {unknown} unknown; allowed: {sorted(allowed)}")
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SCRATCH_SEED)
        return make(**{**size, **(overrides or {})}, **extra)


def check_no_scratch_options(source: str, overrides: Mapping[str, Any] | None, what: str) -> None:
    """Size overrides apply to ``scratch:NAME`` sources only."""
    if overrides and not is_scratch(source):
        raise ValueError(
            f"{what} source {source!r}: size options {dict(overrides)} only apply to 'scratch:NAME' sources"
        )


def scratch_model_config(size: Mapping[str, Any], model_type: str) -> SimpleNamespace:
    """What the config checks read of a model's ``config.json``, for a ``scratch:NAME`` size (no model is built)."""
    return SimpleNamespace(model_type=model_type, vision_config=SimpleNamespace(**size))

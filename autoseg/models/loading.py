"""One entry point for pretrained weights: a Hugging Face id, a local directory or ``scratch:NAME``, with errors that
say how to fix.

``scratch:NAME`` builds a randomly initialised model of a registered size with an offline tokenizer (see
:mod:`autoseg.models.scratch`); no network and no files are needed, which is what the debug configs and the tests use.
The random initialisation is seeded (``SCRATCH_SEED``), so the same source always gives the same weights: checkpoints
leave frozen weights out and take them from the source again when loaded.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import pickle
import re
import socket
from collections.abc import Callable, Iterator, Mapping
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
            return _load_checked(loader, what, path, str(path), local_files_only=True)
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
        return _load_checked(loader, what, _cached_snapshot(source), source, local_files_only=True)
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
        loaded = _load_checked(loader, what, None, source)
    except ModelLoadError:
        raise
    except Exception as e:  # network, auth and missing-repo errors all mean the same thing to the user
        raise ModelLoadError(_offline_message(what, source, flag, f"{type(e).__name__}: {str(e)[:300]}")) from e
    snapshot = _cached_snapshot(source)  # what was just downloaded: safetensors weights only, as for a folder
    if snapshot is not None:
        check_safetensors_only(snapshot, what)
    return loaded


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
SAFETENSORS_SUFFIXES = (".safetensors", ".safetensors.index.json")


def check_safetensors_only(folder: Path, what: str) -> None:
    """Refuse a model folder that would make transformers read pickled weights: AutoSeg loads only safetensors.

    transformers prefers ``*.safetensors`` when a folder has them; it falls back to ``torch.load`` for a folder with
    only pickles (``pytorch_model.bin``), or when ``config.json`` names one (``transformers_weights``). Unpickling can
    run code, so such a folder is refused before anything of it is read but its file names and ``config.json``.

    Raises:
        ModelLoadError: one line naming the folder, the pickled files and how to convert them.
    """
    how = (
        "AutoSeg loads only safetensors weights (unpickling a file can run code): convert them on a machine you trust "
        "(load the model there and `save_pretrained(DIR)` writes model.safetensors)"
    )
    named = _named_weights(folder / "config.json")
    if named is not None and not named.endswith(SAFETENSORS_SUFFIXES):
        raise ModelLoadError(f"{what}: {folder / 'config.json'} names pickled weights {named!r}; {how}")
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    pickled = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
    if pickled and not any(n.endswith(SAFETENSORS_SUFFIXES) for n in names):
        raise ModelLoadError(
            f"{what}: {folder} holds pickled weights ({', '.join(pickled)}) and no *.safetensors; {how}"
        )


def _named_weights(config_json: Path) -> str | None:
    """The ``transformers_weights`` file that a ``config.json`` names, if any (transformers then loads that file)."""
    try:
        named = json.loads(config_json.read_text(encoding="utf-8")).get("transformers_weights")
    except (OSError, ValueError, AttributeError):
        return None
    return str(named) if named is not None else None


def _cached_snapshot(repo_id: str) -> Path | None:
    """The local folder of ``repo_id`` in the Hugging Face cache (no network), or None when it is not cached."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached, or not a valid id: transformers' own error follows
        return None


def _load_checked(loader: Callable[..., T], what: str, folder: Path | None, source: str, **kwargs) -> T:
    """``loader(source, **kwargs)`` after :func:`check_safetensors_only` of ``folder`` (None: not local).

    Raises:
        ModelLoadError: pickled weights, or weights whose shapes do not fit the model of the folder's config (one line
            naming the file and the first tensor that differs).
    """
    if folder is not None:
        check_safetensors_only(folder, what)
    with _transformers_log() as log:
        try:
            return loader(source, **kwargs)
        except pickle.UnpicklingError as e:  # torch.load(weights_only=True) refused a pickle: nothing ran
            raise ModelLoadError(
                f"{what}: {source} holds pickled weights that the weights-only loader refused "
                f"({str(e).splitlines()[0][:200]}); AutoSeg loads only safetensors weights"
            ) from e
        except RuntimeError as e:
            if "mismatch" not in str(e):
                raise
            raise ModelLoadError(_mismatch_message(what, source, folder, log, e)) from e


@contextlib.contextmanager
def _transformers_log() -> Iterator[list[str]]:
    """The messages transformers logs meanwhile (its weight-loading report among them), ANSI colours removed."""
    messages: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(re.sub(r"\x1b\[[0-9;]*m", "", record.getMessage()))

    handler, logger = Keep(logging.WARNING), logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


_SIZE = r"torch\.Size\(\[([^\]]*)\]\)"
_MISMATCHES = (  # transformers v5's load report; torch's load_state_dict error
    re.compile(rf"^\s*(\S+)\s*\|\s*MISMATCH\s*\|.*ckpt: {_SIZE} vs model:\s*{_SIZE}"),
    re.compile(rf"size mismatch for (\S+): copying a param with shape {_SIZE} from checkpoint, .* model is {_SIZE}"),
)


def _mismatch_message(what: str, source: str, folder: Path | None, log: list[str], error: Exception) -> str:
    """One line: which tensor of which file has which shape, and the shape the model of ``config.json`` expects."""
    lines = [line for text in [*log, str(error)] for line in text.splitlines()]
    found = [m.groups() for line in lines for rx in _MISMATCHES if (m := rx.search(line))]
    files = ", ".join(_weight_files(folder)) if folder is not None else "its weights"
    if not found:
        detail = f"some tensors' shapes differ from the model's ({str(error).splitlines()[0][:200]})"
    else:
        key, ckpt, model = found[0]
        where = _file_with(folder, key) or files
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        detail = f"{where}: {key} has shape ({ckpt}) but the model needs ({model}){more}"
    return (
        f"{what}: the weights in {source} do not fit the model its config.json describes: {detail}; the folder is "
        "damaged or mixes two models: save or copy it again"
    )


def _file_with(folder: Path | None, key: str) -> str | None:
    """The ``*.safetensors`` file of ``folder`` that holds tensor ``key`` (headers only), if any."""
    from safetensors import safe_open

    for f in sorted(folder.glob("*.safetensors")) if folder is not None else []:
        try:
            with safe_open(str(f), framework="pt") as h:
                if key in h.keys():  # noqa: SIM118 - safe_open has no __contains__
                    return f.name
        except (SafetensorError, OSError):
            continue
    return None


def _weight_files(folder: Path) -> list[str]:
    """The ``*.safetensors`` files of ``folder`` by name (for messages)."""
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

"""Reading Lightning checkpoints safely: tensors and plain values only, from a file or a URL, with errors that say why.

Every ``.ckpt`` AutoSeg reads goes through :func:`load_checkpoint`: ``train.py`` installs :class:`SafeCheckpointIO` on
its trainer (``--ckpt_path``) and :meth:`autoseg.lit.base.AutoSegModule.load_from_checkpoint` uses it too. The file is
unpickled with ``torch.load(weights_only=True)``, so a checkpoint that holds anything but tensors and plain values
(a pickled object whose loading would run code) is refused. Lightning itself unpickles ``http(s)://`` checkpoints with
``weights_only=False``; here a URL is read into memory and loaded by exactly the rules of a local file.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import zipfile
from collections.abc import Callable
from typing import IO, Any
from urllib.parse import urlparse

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_warn

EXPECTED = "a Lightning checkpoint written by `train.py fit` (<log_dir>/checkpoints/last.ckpt or best-*.ckpt)"
REQUIRED_KEYS = ("state_dict", "pytorch-lightning_version")


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message names the file, what was expected and how to fix it."""


def is_remote(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a URL (``http://``, ``s3://``, ...) rather than a local file (``file://`` is local)."""
    scheme = urlparse(str(path)).scheme
    return len(scheme) > 1 and scheme != "file"  # one letter: a Windows drive


def open_checkpoint(path: str | os.PathLike) -> str | io.BytesIO:
    """A local checkpoint's path, or a URL's bytes read into memory (nothing is cached on disk).

    Raises:
        FileNotFoundError: no local file at ``path``.
        CheckpointError: ``path`` is a directory, or the URL could not be read.
    """
    if not is_remote(path):
        local = str(path).removeprefix("file://")
        if os.path.isdir(local):
            raise CheckpointError(f"{path}: is a directory; expected {EXPECTED}")
        if not os.path.isfile(local):
            raise FileNotFoundError(f"{path}: checkpoint not found; expected {EXPECTED}")
        return local
    import fsspec

    try:
        with fsspec.open(str(path), "rb") as f:
            return io.BytesIO(f.read())
    except Exception as e:  # network, auth and missing-file errors all mean the same thing here
        raise CheckpointError(
            f"{path}: could not download the checkpoint ({type(e).__name__}: {str(e)[:300]}); check the URL, or "
            "download the file and pass its local path"
        ) from e


def load_checkpoint(
    path: str | os.PathLike,
    map_location: Any = "cpu",
    weights_only: bool | None = None,
    source: str | IO[bytes] | None = None,
    mmap: bool = False,
) -> dict[str, Any]:
    """Load and check a Lightning checkpoint, from a local path or a URL.

    Args:
        path: the checkpoint file or URL.
        map_location: as in ``torch.load``.
        weights_only: None or True: tensors and plain values only (``torch.load(weights_only=True)``). False unpickles
            arbitrary objects, which can run code: only for files whose origin you trust.
        source: the already opened content of ``path`` (see :func:`open_checkpoint`), to avoid reading it twice.
        mmap: map a local file's tensors into memory instead of reading them (a quick check of a large file).

    Raises:
        FileNotFoundError: no local file at ``path``.
        CheckpointError: the file is refused (it holds other Python objects), damaged, truncated or not a Lightning
            checkpoint; or the URL cannot be read.
    """
    if str(path).endswith(".safetensors"):
        raise CheckpointError(
            f"{path}: is a safetensors weights file (what infer.py / eval.py load), not a training checkpoint; "
            f"expected {EXPECTED}"
        )
    source = open_checkpoint(path) if source is None else source
    mmap = mmap and isinstance(source, str) and zipfile.is_zipfile(source)  # torch maps only zip-format files
    try:
        checkpoint = torch.load(source, map_location=map_location, weights_only=weights_only is not False, mmap=mmap)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        if found:
            raise CheckpointError(
                f"{path}: refused: the checkpoint holds a Python object ({found.group(1)}) besides tensors and plain "
                "values, and loading it could run code; train.py never writes such checkpoints. Use a checkpoint "
                "written by `train.py fit`, or, only if you trust the file's origin, pass --weights_only=false"
            ) from e
        raise _damaged(path, e) from e
    except Exception as e:  # noqa: BLE001 - unpickling arbitrary bytes raises any type (IndexError, KeyError, ...)
        raise _damaged(path, e) from e
    _check_layout(path, checkpoint)
    return checkpoint


def _damaged(path: str | os.PathLike, error: Exception) -> CheckpointError:
    if not isinstance(error, (RuntimeError, EOFError, ValueError, OSError, pickle.UnpicklingError)):
        error = pickle.UnpicklingError(f"unreadable pickle data: {type(error).__name__} {error}")
    text = str(error).split("WeightsUnpickler error:")[-1]  # torch's own hint (weights_only=False) does not apply
    reason = next((line.strip().split(". ")[0][:200] for line in text.splitlines() if line.strip()), "")
    reason = reason or ("the file is empty or ends early" if isinstance(error, EOFError) else type(error).__name__)
    return CheckpointError(
        f"{path}: cannot be read: damaged, truncated or not a checkpoint ({reason}). Expected {EXPECTED}; copy the "
        "file again if it was cut short, or resume from another checkpoint of the run"
    )


def _check_layout(path: str | os.PathLike, checkpoint: Any) -> None:
    if isinstance(checkpoint, dict) and all(k in checkpoint for k in REQUIRED_KEYS):
        if isinstance(checkpoint["state_dict"], dict):
            return
    if isinstance(checkpoint, dict) and checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        found = f"a bare state dict of {len(checkpoint)} tensors (torch.save(model.state_dict()))"
    elif isinstance(checkpoint, dict):
        found = f"a dict with keys {sorted(map(str, checkpoint))[:8]}"
    else:
        found = f"a {type(checkpoint).__name__}"
    raise CheckpointError(f"{path}: not a Lightning checkpoint: found {found}; expected {EXPECTED}")


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` (same saving) whose loading goes through :func:`load_checkpoint`."""

    def load_checkpoint(
        self,
        path: str | os.PathLike,
        map_location: Callable | Any = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        return load_checkpoint(path, map_location=map_location, weights_only=weights_only)


def use_safe_checkpoint_io(trainer: Any) -> None:
    """Load ``trainer``'s checkpoints with :class:`SafeCheckpointIO` (a custom checkpoint plugin is kept; a warning)."""
    strategy = trainer.strategy
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = SafeCheckpointIO()
    elif not isinstance(strategy.checkpoint_io, SafeCheckpointIO):
        rank_zero_warn(
            f"checkpoints are loaded by the configured {type(strategy.checkpoint_io).__name__}, not by AutoSeg's "
            "SafeCheckpointIO: make sure it loads with weights_only=True"
        )

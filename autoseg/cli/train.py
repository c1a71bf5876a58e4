"""``train.py``: train the enhancer head, fine-tune the segmenter or the captioner with LightningCLI (fit / validate /
test / predict); see :mod:`autoseg.lit.trainer`.

Every run writes ``<default_root_dir>/lightning_logs/version_N/`` with TensorBoard events, the resolved
``config.yaml``, ``checkpoints/`` and, after ``fit`` with the ``ExportWeights`` callback, ``export/{last,best}/``; a
``fit`` ends with one line of its figures. ``--ckpt_path`` (a file or a URL) is loaded with
``torch.load(weights_only=True)`` (see :mod:`autoseg.lit.checkpoints`), and ``fit --ckpt_path=.../last.ckpt``
continues bit for bit as the uninterrupted run would have.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from autoseg.cli.common import EXIT_OK, EXIT_USAGE


def cli_main(argv: Sequence[str] | None = None, run: bool = True):
    """The LightningCLI of ``argv`` (with ``run``, executed); see :func:`autoseg.lit.trainer.build_cli`."""
    from autoseg.lit.trainer import build_cli

    return build_cli(argv, run)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``train.py``; returns 0, or 2 with a one-line message for a checkpoint, model or setting that
    cannot be used (LightningCLI exits with a usage message on bad arguments)."""
    from autoseg.config import ConfigError
    from autoseg.lit.checkpoints import CheckpointError
    from autoseg.lit.trainer import run
    from autoseg.models.loading import ModelLoadError

    try:
        result = run(argv)
    except Exception as e:  # LightningCLI wraps the errors of the classes it builds: report ours in one line
        known = user_error(e, (CheckpointError, ModelLoadError, ConfigError, FileNotFoundError))
        if known is None:
            raise
        print(f"train.py: error: {' '.join(str(known).split())}", file=sys.stderr)
        return EXIT_USAGE
    if result.subcommand == "fit" and is_rank_zero():
        print(result.summary(), flush=True)
    return EXIT_OK


def user_error(error: BaseException, kinds: tuple[type[BaseException], ...]) -> BaseException | None:
    """The outermost error of one of ``kinds`` in ``error``'s chain of causes (None: there is none)."""
    while error is not None:
        if isinstance(error, kinds):
            return error
        error = error.__cause__ or error.__context__
    return None


def is_rank_zero() -> bool:
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    return rank_zero_only.rank == 0

"""``train.py``: train the enhancer head, fine-tune the segmenter or the captioner with LightningCLI (fit / validate /
test / predict).

The model is chosen by class path in the YAML (``autoseg.lit.EnhancerModule``, ``autoseg.lit.SegmenterModule`` or
``autoseg.lit.CaptionerModule``); the data module's class names and ignore index are linked into the model, so a
config never repeats them. Every run writes ``<default_root_dir>/lightning_logs/version_N/`` with TensorBoard events,
the resolved ``config.yaml``, ``checkpoints/`` and, after ``fit`` with the ``ExportWeights`` callback,
``export/{last,best}/``.

``--ckpt_path`` (a file or a URL) is loaded with ``torch.load(weights_only=True)`` (see :mod:`autoseg.lit.checkpoints`),
and ``fit --ckpt_path=.../last.ckpt`` continues bit for bit as the uninterrupted run would have.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from autoseg.data.datamodules import SegmentationDataModule
from autoseg.lit.base import AutoSegModule
from autoseg.lit.checkpoints import CheckpointError, is_remote, load_checkpoint, use_safe_checkpoint_io
from autoseg.models.loading import ModelLoadError

EXIT_USAGE = 2


class AutoSegCLI(LightningCLI):
    """LightningCLI with the data -> model links AutoSeg needs and safe checkpoint loading."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.classes", "model.init_args.classes", apply_on="instantiate")
        parser.link_arguments("data.ignore_index", "model.init_args.ignore_index", apply_on="instantiate")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse, then check a local ``--ckpt_path`` before anything is built (Lightning reads its hyperparameters
        next, and would fail on a damaged file with a raw traceback)."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        options = self.config.get(subcommand) if subcommand else None
        ckpt_path = options.get("ckpt_path") if options else None
        if ckpt_path and not is_remote(ckpt_path) and os.path.isfile(ckpt_path):
            load_checkpoint(ckpt_path, "cpu", options.get("weights_only"), mmap=True)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        use_safe_checkpoint_io(trainer)
        return trainer


def cli_main(argv: Sequence[str] | None = None, run: bool = True) -> AutoSegCLI:
    """Build (and with ``run``, execute) the CLI; ``argv`` as on the command line, e.g. ``["fit", "-c", "x.yaml"]``."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return AutoSegCLI(
        model_class=AutoSegModule,
        subclass_mode_model=True,
        datamodule_class=SegmentationDataModule,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        args=list(argv) if argv is not None else None,
        run=run,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``train.py``; returns 0, or 2 with a one-line message for a checkpoint or model that cannot be
    loaded (LightningCLI exits with a usage message on bad arguments)."""
    try:
        cli_main(argv)
    except (CheckpointError, ModelLoadError, FileNotFoundError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    return 0

"""``train.py``: train the enhancer head, fine-tune the segmenter or the captioner with LightningCLI (fit / validate /
test / predict).

The model is chosen by class path in the YAML (``autoseg.lit.EnhancerModule``, ``autoseg.lit.SegmenterModule`` or
``autoseg.lit.CaptionerModule``); the data module's class names and ignore index are linked into the model, so a
config never repeats them. Every run writes ``<default_root_dir>/lightning_logs/version_N/`` with TensorBoard events,
the resolved ``config.yaml``, ``checkpoints/`` and, after ``fit`` with the ``ExportWeights`` callback,
``export/{last,best}/``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from lightning.pytorch.cli import LightningCLI

from autoseg.data.datamodules import SegmentationDataModule
from autoseg.lit.base import AutoSegModule


class AutoSegCLI(LightningCLI):
    """LightningCLI with the data -> model links AutoSeg needs."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.classes", "model.init_args.classes", apply_on="instantiate")
        parser.link_arguments("data.ignore_index", "model.init_args.ignore_index", apply_on="instantiate")


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
    """Entry point of ``train.py``; returns 0 (LightningCLI exits with a usage message on bad arguments)."""
    cli_main(argv)
    return 0

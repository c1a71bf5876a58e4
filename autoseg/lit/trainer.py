"""Running the LightningModules from configs: ``train.py``'s LightningCLI and :func:`run`, which returns the figures.

The model is chosen by class path in the YAML (``autoseg.lit.EnhancerModule``, ``autoseg.lit.SegmenterModule`` or
``autoseg.lit.CaptionerModule``); the data module's class names and ignore index are linked into the model, so a
config never repeats them. Optimizer and schedule are the module's own settings (``model.init_args.optimizer``,
``lr``, ``scheduler``, ...): LightningCLI's ``--optimizer`` / ``--lr_scheduler`` are not offered, so they cannot be
given and then ignored.

:func:`run` is what ``train.py`` and the recipes call: the same argv, in this process, and a :class:`RunResult`
with the logged figures, the best checkpoint and the exports (no console output to parse).
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from autoseg.data.datamodules import SegmentationDataModule
from autoseg.lit.base import AutoSegModule
from autoseg.lit.checkpoints import is_remote, load_checkpoint, use_safe_checkpoint_io


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
        prefix = "--model.init_args."
        given = [a.split("=")[0][len(prefix) :] for a in args or sys.argv[1:] if str(a).startswith(prefix)]
        init = options.get("model", {}).get("init_args", {}) if options else {}
        self._given_model_args = {k: init[k] for k in given if k in init}
        ckpt_path = options.get("ckpt_path") if options else None
        if ckpt_path and not is_remote(ckpt_path) and os.path.isfile(ckpt_path):
            load_checkpoint(ckpt_path, "cpu", options.get("weights_only"), mmap=True)

    def _parse_ckpt_path(self) -> None:
        """Lightning puts the checkpoint's hyperparameters over the parsed config; model settings given on the
        command line (e.g. ``--model.init_args.predict_pipeline``) still win over them."""
        super()._parse_ckpt_path()
        subcommand = self.config.get("subcommand")
        for key, value in getattr(self, "_given_model_args", {}).items():
            self.config[subcommand]["model"]["init_args"][key] = value

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        use_safe_checkpoint_io(trainer)
        return trainer


@dataclass
class RunResult:
    """What a run produced.

    Attributes:
        subcommand: fit, validate, test or predict.
        metrics: the last logged value of every figure (``trainer.callback_metrics``), as floats.
        step: optimizer steps taken (the global step).
        log_dir: the run's ``lightning_logs/version_N`` folder (None without a logger).
        monitor: the figure the checkpoint callback watched (None: none).
        best_score: its best value.
        best_checkpoint: the checkpoint of that value.
        exports: the folders written by ``ExportWeights``.
    """

    subcommand: str
    metrics: dict[str, float] = field(default_factory=dict)
    step: int = 0
    log_dir: str | None = None
    monitor: str | None = None
    best_score: float | None = None
    best_checkpoint: str | None = None
    exports: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line: the run's figures, its best checkpoint and its exports."""
        shown = {k: v for k, v in sorted(self.metrics.items()) if not k.startswith(("train/", "lr"))}
        figures = ", ".join(f"{k} {v:.4g}" for k, v in shown.items()) or "no validation figures"
        text = f"{self.subcommand} done after {self.step} steps: {figures}"
        if self.monitor and self.best_score is not None:
            text += f"; best {self.monitor} {self.best_score:.4g} ({self.best_checkpoint})"
        if self.exports:
            text += f"; weights exported to {', '.join(self.exports)}"
        return text


def build_cli(argv: Sequence[str] | None, run: bool = True) -> AutoSegCLI:
    """The CLI of ``argv`` (as on the command line, e.g. ``["fit", "-c", "x.yaml"]``); with ``run``, executed."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return AutoSegCLI(
        model_class=AutoSegModule,
        subclass_mode_model=True,
        datamodule_class=SegmentationDataModule,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,  # the modules configure their own (timm); see the module docstring
        args=list(argv) if argv is not None else None,
        run=run,
    )


def run(argv: Sequence[str] | None = None) -> RunResult:
    """Run ``train.py ARGV`` (None: the command line's) in this process and return its figures.

    Raises:
        SystemExit: LightningCLI's usage errors (bad arguments, ``--help``).
        autoseg.lit.checkpoints.CheckpointError / autoseg.models.loading.ModelLoadError / ValueError: see train.py.
    """
    cli = build_cli(argv)
    return result_of(cli.trainer, str(cli.config.get("subcommand")))


def result_of(trainer: Trainer, subcommand: str) -> RunResult:
    """The :class:`RunResult` of a finished trainer."""
    metrics = {}
    for key, value in trainer.callback_metrics.items():
        number = float(value)
        if math.isfinite(number):
            metrics[key] = number
    result = RunResult(subcommand, metrics, int(trainer.global_step), trainer.log_dir if trainer.loggers else None)
    checkpoint = next((c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and c.monitor), None)
    if checkpoint is not None and checkpoint.best_model_path:
        result.monitor = checkpoint.monitor
        result.best_score = float(checkpoint.best_model_score) if checkpoint.best_model_score is not None else None
        result.best_checkpoint = checkpoint.best_model_path
    for callback in trainer.callbacks:
        result.exports += [str(p) for p in getattr(callback, "written", [])]  # ExportWeights
    return result

"""Callbacks of ``train.py``: export trained weights at the end of ``fit``, write ``predict`` outputs, report the
final figures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info

from autoseg.outputs import RunManifest, SegmentationWriter, prediction_complete, read_status_lines
from autoseg.utils.io import prepare_output_dir


class ExportWeights(Callback):
    """At the end of ``fit``, export the weights that ``infer.py`` / ``eval.py`` load.

    Writes ``<dirpath>/last/`` (the weights at the end of training) and, when a ``ModelCheckpoint`` monitored a
    validation figure, ``<dirpath>/best/`` (the best checkpoint's weights). EnhancerModule exports
    ``enhancer.safetensors`` (``infer.py --enhancer``); SegmenterModule a ``segmenter/`` directory
    (``infer.py --segmenter``).

    Args:
        dirpath: export folder (None: ``<log_dir>/export``).
    """

    def __init__(self, dirpath: str | None = None):
        self.dirpath = dirpath
        self.written: list[Path] = []  # the folders exported by the last fit

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        log_dir = trainer.log_dir  # a collective call under DDP: every rank must make it
        if not trainer.is_global_zero or not hasattr(pl_module, "export"):
            return
        root = Path(self.dirpath or Path(log_dir or trainer.default_root_dir) / "export")
        written = [pl_module.export(root / "last")]
        best = next(
            (c.best_model_path for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and c.monitor),
            "",
        )
        if best and Path(best).is_file():
            checkpoint = torch.load(best, map_location="cpu", weights_only=True)
            written.append(pl_module.export(root / "best", state_dict=checkpoint["state_dict"]))
        self.written = written
        rank_zero_info("exported weights: " + ", ".join(str(w) for w in written))


class PredictionWriter(BasePredictionWriter):
    """Write ``predict`` outputs through the one writer, as ``infer.py`` does: per image ``NAME.png``, ``NAME.json``
    and ``NAME_overlay.jpg`` committed together, a status line per image in ``manifest.jsonl``, ``manifest.json`` at
    the end, the folder locked while the run writes. With ``skip_existing`` the modules do not predict the images
    whose outputs are complete (a killed ``predict`` resumes).

    Args:
        output_dir: output folder.
        skip_existing: keep complete outputs already in the folder.
    """

    def __init__(self, output_dir: str, skip_existing: bool = False):
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.skip_existing = skip_existing
        self._run: RunManifest | None = None
        self._writer: SegmentationWriter | None = None
        self._entries: list[dict] = []

    def is_done(self, name: str) -> bool:
        """Whether image ``name``'s outputs are complete and kept (``skip_existing``)."""
        return self.skip_existing and prediction_complete(self.output_dir, name) is not None

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        prepare_output_dir(self.output_dir)
        extra = {"module": type(pl_module).__name__}
        self._run = RunManifest(self.output_dir, extra, rank=trainer.global_rank).__enter__()
        self._entries = []
        self._run.start(self._entries)  # entries are added as images finish
        self._writer = SegmentationWriter(self.output_dir, self._run)

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: Any,
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        for b, pred in enumerate(prediction):
            name, path = batch["name"][b], (batch.get("path") or [""] * len(prediction))[b]
            entry = {"input": path or name, "output": name, "status": "pending"}
            self._entries.append(entry)
            if pred is None:  # complete outputs kept (skip_existing)
                entry.update(status="ok", skipped=True, vocabulary=prediction_complete(self.output_dir, name))
                self._run.record(entry)
            else:
                self._writer.commit(pred.image, path or name, name, entry, pred)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.strategy.barrier("autoseg-prediction-writer")  # every rank's status lines are written
        if trainer.is_global_zero:
            mine = {e["output"] for e in self._entries}
            self._entries += [e for out, e in read_status_lines(self.output_dir).items() if out not in mine]
        self._close(finish=True)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._close(finish=False)

    def _close(self, finish: bool) -> None:
        if self._run is None:
            return
        try:
            self._run.finish(complete=finish)
        finally:
            self._run.__exit__(None, None, None)
            self._run = None

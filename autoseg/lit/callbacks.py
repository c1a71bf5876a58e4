"""Callbacks of ``train.py``: export trained weights at the end of ``fit``, write ``predict`` outputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image

from autoseg.lit.base import to_uint8
from autoseg.outputs import Prediction, write_prediction
from autoseg.utils.io import load_image


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
        rank_zero_info("exported weights: " + ", ".join(str(w) for w in written))


class PredictionWriter(BasePredictionWriter):
    """Write ``predict`` outputs in ``infer.py``'s format: ``NAME.png`` label map, ``NAME.json``, overlay.

    Args:
        output_dir: output folder.
    """

    def __init__(self, output_dir: str):
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)

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
        for i, item in enumerate(prediction):
            if item["path"]:
                image = load_image(item["path"])
            else:  # shards carry no file: show the model's input, resized back to the original size
                h, w = (int(s) for s in batch["orig_size"][i])
                image = Image.fromarray(to_uint8(batch["image"][i])).resize((w, h), Image.BILINEAR)
            pred = Prediction(vocabulary=item["vocabulary"], label_map=item["label_map"])
            write_prediction(self.output_dir, item["name"], image, item["path"], pred)

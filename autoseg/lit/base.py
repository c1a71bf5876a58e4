"""What both AutoSeg LightningModules share: timm optimizer/scheduler, lean checkpoints, overlays, normalisation."""

from __future__ import annotations

import io
import math
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any, Self

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch import nn

from autoseg.data.datamodules import derive_seed, run_seed
from autoseg.lit.checkpoints import load_checkpoint, open_checkpoint
from autoseg.outputs import Prediction, palette
from autoseg.utils.io import atomic_write_json, load_image

SCHEDULERS = ("cosine", "constant")
FROZEN_KEY = "autoseg_frozen_prefixes"


class AutoSegModule(L.LightningModule):
    """Base class; subclasses set ``self.hparams`` (optimizer fields) and implement the hooks below.

    Subclass contract:
        ``trainable()``: the ``nn.Module`` whose trainable parameters the optimizer updates.
        ``frozen_prefixes()``: state-dict prefixes of frozen weights that are rebuilt from the model source and
            therefore left out of checkpoints (a BLIP-large checkpoint would otherwise carry 1.8 GB of fixed weights).
        ``export(out, state_dict=None)``: write the trained weights for ``infer.py`` / ``eval.py``.
        A subclass that overrides ``on_train_batch_start``, ``on_save_checkpoint`` or ``on_load_checkpoint`` calls
        ``super()`` first.
    """

    # ------------------------------------------------------------------ shared helpers
    @staticmethod
    def require_classes(classes: Sequence[str] | None, module: str) -> None:
        """The class names come from the data (``train.py`` links them); building a module without them is an error."""
        if not classes:
            raise ValueError(
                f"{module} needs the dataset's class names (model.classes); train.py links them from the data "
                "module, set them explicitly when building the module yourself"
            )

    def export_pretrained(
        self,
        attr: str,
        out: str | Path,
        folder: str,
        state_dict: dict[str, torch.Tensor] | None,
        info: dict[str, Any],
    ) -> Path:
        """``save_pretrained`` ``self.<attr>.model`` + processor into ``out/folder``, with ``autoseg_training.json``.

        ``state_dict``: this module's keys (e.g. a checkpoint's) to export instead of the current weights; keys it lacks
        (frozen weights left out of checkpoints) keep their current values.
        """
        wrapper = getattr(self, attr)
        target = Path(out) / folder
        weights = None
        if state_dict is not None:
            weights = wrapper.model.state_dict()
            prefix = f"{attr}.model."
            weights.update({k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)})
        wrapper.model.save_pretrained(target, state_dict=weights)
        wrapper.processor.save_pretrained(target)
        atomic_write_json(target / "autoseg_training.json", info)
        return target

    # ------------------------------------------------------------------ subclass hooks
    def trainable(self) -> nn.Module:
        raise NotImplementedError

    def frozen_prefixes(self) -> tuple[str, ...]:
        return ()

    def export(self, out: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        raise NotImplementedError

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        if hp.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler {hp.scheduler!r} unknown; choose one of {SCHEDULERS}")
        optimizer = create_optimizer_v2(self.trainable(), opt=hp.optimizer, lr=hp.lr, weight_decay=hp.weight_decay)
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else math.inf
        if hp.scheduler == "constant" or not math.isfinite(total):
            if hp.scheduler == "cosine":
                rank_zero_warn("cosine schedule needs a known number of steps; set trainer.max_steps. Using constant.")
            return {"optimizer": optimizer}
        scheduler = CosineLRScheduler(
            optimizer,
            t_initial=max(int(total), 1),
            lr_min=hp.lr * hp.min_lr_ratio,
            warmup_t=hp.warmup_steps,
            warmup_lr_init=hp.lr * 0.01,
            t_in_epochs=False,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def lr_scheduler_step(self, scheduler, metric) -> None:
        scheduler.step_update(num_updates=self.global_step)  # timm schedulers count optimizer updates

    # ------------------------------------------------------------------ reproducible training
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Seed torch, numpy and ``random`` from (run seed, step, batch, rank) before each training batch.

        Dropout and other random draws of a step then depend only on where training is, not on what was drawn before,
        so a run resumed from a checkpoint continues exactly as the uninterrupted run (the data side is in
        :class:`autoseg.data.datamodules.EpochSampler`).
        """
        seed = derive_seed(run_seed(), self.global_step, batch_idx, self.global_rank)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    # ------------------------------------------------------------------ lean checkpoints
    @classmethod
    def load_from_checkpoint(
        cls,
        checkpoint_path: str | os.PathLike | IO[bytes],
        map_location: Any = None,
        hparams_file: str | os.PathLike | None = None,
        strict: bool | None = None,
        weights_only: bool | None = None,
        **kwargs: Any,
    ) -> Self:
        """Lightning's ``load_from_checkpoint``, reading the file as ``train.py --ckpt_path`` does.

        Tensors and plain values only (unless ``weights_only=False``), a URL read into memory like a local file, and a
        :class:`autoseg.lit.checkpoints.CheckpointError` naming the file when it is damaged or not a ``train.py``
        checkpoint.
        """
        if isinstance(checkpoint_path, (str, os.PathLike)):
            source = open_checkpoint(checkpoint_path)
            load_checkpoint(checkpoint_path, "cpu", weights_only, source, mmap=True)  # checked first: clear errors
            if isinstance(source, io.BytesIO):
                source.seek(0)
            checkpoint_path = source
        return super().load_from_checkpoint(
            checkpoint_path, map_location, hparams_file, strict, weights_only=weights_only is not False, **kwargs
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        prefixes = self.frozen_prefixes()
        if prefixes:
            sd = checkpoint["state_dict"]
            for key in [k for k in sd if k.startswith(prefixes)]:
                del sd[key]
            checkpoint[FROZEN_KEY] = list(prefixes)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Put the frozen weights (rebuilt from the model source in ``__init__``) back before strict loading."""
        prefixes = tuple(checkpoint.get(FROZEN_KEY, ()))
        if prefixes:
            sd = checkpoint["state_dict"]
            for key, value in self.state_dict().items():
                if key.startswith(prefixes) and key not in sd:
                    sd[key] = value

    # ------------------------------------------------------------------ predict
    def predict_pipeline_with(self, source: str | None, **parts: Any):
        """The pipeline ``predict`` runs: the settings of ``source`` (a preset, YAML, saved folder or repo id; None:
        the defaults) with this module's trained ``parts`` (``captioner=``, ``enhancer=``) in place of its models."""
        from autoseg.api import build_pipeline, resolve_config

        overrides = {"blip": self.hparams.blip, "enhancer": None, "device": str(self.device)}
        config, where = resolve_config(source, overrides, "model.init_args.predict_pipeline")
        return build_pipeline(config, checked=True, where=where, **parts)

    def predict_todo(self, batch: dict[str, Any]) -> list[int]:
        """The batch items to predict: all, but those whose outputs a ``PredictionWriter(skip_existing=True)``
        already holds."""
        writers = [c for c in self.trainer.callbacks if hasattr(c, "is_done")] if self._trainer is not None else []
        return [b for b in range(len(batch["name"])) if not any(w.is_done(batch["name"][b]) for w in writers)]

    def predict_with(self, batch: dict[str, Any], predict) -> list[Prediction | None]:
        """``predict(images)`` on the batch's original images; one :class:`Prediction` per item (None: skipped)."""
        todo = self.predict_todo(batch)
        preds = predict([original_image(batch, b) for b in todo]) if todo else []
        out: list[Prediction | None] = [None] * len(batch["name"])
        for b, pred in zip(todo, preds, strict=True):
            out[b] = pred
        return out

    # ------------------------------------------------------------------ images for TensorBoard
    def log_overlays(self, tag: str, rows: Sequence[Sequence[np.ndarray]]) -> None:
        """Log one image per row: its panels (``H x W x 3`` uint8) side by side. Only with a TensorBoard logger."""
        logger = self.logger
        if not isinstance(logger, TensorBoardLogger) or not self.trainer.is_global_zero or not rows:
            return
        for i, panels in enumerate(rows):
            strip = np.concatenate([np.asarray(p) for p in panels], axis=1)  # H x (n W) x 3
            logger.experiment.add_image(f"{tag}/{i}", strip, self.global_step, dataformats="HWC")


def original_image(batch: dict[str, Any], b: int) -> Image.Image:
    """Item ``b`` of a batch as the pipeline takes it: its file, or (shards carry no file) the model's input resized
    back to the original size."""
    path = batch.get("path", [""] * (b + 1))[b]
    if path:
        return load_image(path)
    h, w = (int(s) for s in batch["orig_size"][b])
    return Image.fromarray(to_uint8(batch["image"][b])).resize((w, h), Image.BILINEAR)


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """``3 x H x W`` float image in [0, 1] -> ``H x W x 3`` uint8."""
    return (image.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()


def colourise(labels: torch.Tensor | np.ndarray, num_colours: int, ignore_index: int | None = None) -> np.ndarray:
    """``H x W`` ids -> ``H x W x 3`` uint8 colours (id ``i`` gets palette colour ``i + 1``; ignore is black)."""
    labels = np.asarray(torch.as_tensor(labels).cpu()).astype(np.int64)
    cols = palette(num_colours + 2)
    idx = np.clip(labels + 1, 0, num_colours + 1)
    if ignore_index is not None:
        idx[labels == ignore_index] = 0
    return cols[idx]


def normaliser(processor_mean: Sequence[float], processor_std: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """``3 x 1 x 1`` mean and std tensors from an image processor's ``image_mean`` / ``image_std``."""
    mean = torch.tensor(list(processor_mean), dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(list(processor_std), dtype=torch.float32).view(3, 1, 1)
    return mean, std

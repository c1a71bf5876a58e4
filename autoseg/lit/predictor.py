"""Multi-device prediction: the shared pipeline inside a thin LightningModule, run by ``Trainer.predict`` (DDP).

The run loop (:func:`autoseg.run.segment_into`) uses it for ``infer.py --devices N --num-nodes M`` and ``eval.py``.
Lightning gives every process its share of the inputs (an unrepeated distributed sampler); each process segments its
share with the same :class:`autoseg.pipeline.AutoSegPipeline` and writes the same per-image files through the one
writer, :class:`autoseg.outputs.SegmentationWriter`. Rank 0 holds the output folder's lock and writes ``manifest.json``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from autoseg.config import from_dict, to_dict
from autoseg.outputs import OutputWriteError, RunManifest, SegmentationWriter, plan_outputs
from autoseg.utils.io import DEFAULT_MAX_PIXELS, ImageReadError, load_image


class ImageFiles(Dataset):
    """``(file, stem, entry)`` items read as images in the data-loader; a bad file yields its error instead."""

    def __init__(self, items: Sequence[tuple[Path, Path, dict]], max_pixels: int | None = DEFAULT_MAX_PIXELS):
        self.items = list(items)
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        file, stem, entry = self.items[index]
        try:
            return {"image": load_image(file, self.max_pixels), "file": file, "stem": stem, "entry": entry}
        except ImageReadError as e:
            return {"image": None, "error": str(e), "file": file, "stem": stem, "entry": entry}


class PipelinePredictor(L.LightningModule):
    """``predict_step`` segments a batch with :class:`AutoSegPipeline` and commits each image's files.

    The pipeline is built in :meth:`setup` on this process's device from a plain config dict (so the module holds no
    model state of its own and ``Trainer.predict`` never wraps it in DDP); ``writer`` is set by the caller.

    Args:
        config: a ``PipelineConfig`` as a dict (``autoseg.config.to_dict``).
    """

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        self.save_hyperparameters()
        self.pipeline = None
        self.writer: SegmentationWriter | None = None

    def setup(self, stage: str) -> None:
        from autoseg.api import build_pipeline
        from autoseg.config import PipelineConfig

        device = self.trainer.strategy.root_device
        config = from_dict(PipelineConfig, {**self.hparams.config, "device": str(device)}, "pipeline config")
        self.pipeline = build_pipeline(config, checked=True)

    def predict_step(self, batch: list[dict[str, Any]], batch_idx: int) -> None:
        good = []
        for item in batch:
            if item["image"] is None:
                self.writer.fail(item["entry"], item["error"])
            else:
                good.append((item["image"], item["file"], item["stem"], item["entry"]))
        self.writer(self.pipeline.predict, good)

    def on_predict_end(self) -> None:
        self.trainer.strategy.barrier("autoseg-predict-end")  # every rank's status lines are written


def predict_on_devices(
    config,
    files: Sequence[tuple[Path, Path]],
    run: RunManifest,
    devices: int,
    num_nodes: int = 1,
    skip_existing: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    progress: bool = True,
) -> list[dict] | None:
    """Segment ``files`` into ``run.out_dir`` with ``devices`` x ``num_nodes`` processes (Lightning DDP).

    Every process runs this with the same arguments (Lightning's launcher re-runs the command for ranks > 0; torchrun
    and SLURM start them all); each builds the same plan, so the sampler's shares agree.

    Returns:
        rank 0: one manifest entry per file; other ranks: None.
    """
    entries, todo = plan_outputs(files, run.out_dir, skip_existing)
    run.start(entries if run.rank == 0 else [])
    module = PipelinePredictor(to_dict(config))
    module.writer = SegmentationWriter(run.out_dir, run)
    accelerator = (
        "gpu" if config.device.startswith("cuda") or (config.device == "auto" and torch.cuda.is_available()) else "cpu"
    )
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=devices,
        num_nodes=num_nodes,
        strategy="ddp",
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress,
        use_distributed_sampler=True,
    )
    loader = DataLoader(ImageFiles(todo, max_pixels), batch_size=config.batch_size, collate_fn=list)
    try:
        trainer.predict(module, loader, return_predictions=False)
    except OutputWriteError:
        with contextlib.suppress(OSError):
            run.finish(complete=False)
        raise
    if trainer.global_rank != 0:
        return None
    run.finish()
    return entries

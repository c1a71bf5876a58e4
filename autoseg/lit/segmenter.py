"""SegmenterModule: fine-tune the CLIPSeg decoder on a labelled dataset, prompted with the dataset's class names.

Per image the decoder scores every class name (text embeddings averaged over prompt templates); the ``B x C x H x W``
logits are upsampled to the mask size and trained with per-pixel cross-entropy over the classes (``loss="ce"``),
per-class binary cross-entropy (``"bce"``, CLIPSeg's own objective) or both (``"ce+bce"``), ignoring unscored
pixels. CLIP stays frozen unless ``unfreeze_clip``. Validation: dataset-level mIoU of the argmax (``val/mIoU``).
Export: a ``save_pretrained`` directory (``model.safetensors`` + config + processor) for ``--segmenter DIR``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from autoseg.lit.base import AutoSegModule, colourise, normaliser, to_uint8
from autoseg.lit.sources import build_clipseg
from autoseg.metrics import DatasetIoU
from autoseg.models.segmenter import DEFAULT_CLIPSEG, DEFAULT_TEMPLATES
from autoseg.utils.io import atomic_write_json

LOSSES = ("ce", "bce", "ce+bce")


class SegmenterModule(AutoSegModule):
    """CLIPSeg (frozen CLIP by default) with a trainable decoder.

    Args:
        segmenter: CLIPSeg source: Hugging Face id, local directory or ``scratch:tiny`` / ``scratch:small``.
        classes: dataset class names = the prompts (``train.py`` links them from the data module).
        ignore_index: mask value of unscored pixels (linked from the data module).
        templates: prompt templates with one ``{}`` (None: the segmenter's default ensemble).
        unfreeze_clip: also train CLIP (vision and text towers).
        loss: "ce", "bce" or "ce+bce".
        bce_weight: weight of the BCE term in "ce+bce".
        num_overlays: validation images logged to TensorBoard (image | ground truth | prediction).
        optimizer: timm optimizer name (``create_optimizer_v2``).
        lr: peak learning rate.
        weight_decay: weight decay (not applied to norms and biases).
        scheduler: "cosine" (timm, with warmup) or "constant".
        warmup_steps: linear warmup steps.
        min_lr_ratio: final learning rate as a fraction of ``lr``.
    """

    def __init__(
        self,
        segmenter: str = DEFAULT_CLIPSEG,
        classes: list[str] | None = None,
        ignore_index: int = 255,
        templates: list[str] | None = None,
        unfreeze_clip: bool = False,
        loss: str = "ce",
        bce_weight: float = 1.0,
        num_overlays: int = 4,
        optimizer: str = "adamw",
        lr: float = 1e-4,
        weight_decay: float = 0.05,
        scheduler: str = "cosine",
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.01,
    ):
        super().__init__()
        self.save_hyperparameters()
        if not classes:
            raise ValueError(
                "SegmenterModule needs the dataset's class names (model.classes); train.py links them from the data "
                "module, set them explicitly when building the module yourself"
            )
        if loss not in LOSSES:
            raise ValueError(f"loss {loss!r} unknown; choose one of {LOSSES}")
        self.segmenter = build_clipseg(
            segmenter, words=classes, templates=tuple(templates) if templates else DEFAULT_TEMPLATES
        )
        self.segmenter.model.requires_grad_(False)
        self.segmenter.model.decoder.requires_grad_(True)
        if unfreeze_clip:
            self.segmenter.model.clip.requires_grad_(True)
        processor = self.segmenter.processor.image_processor
        mean, std = normaliser(processor.image_mean, processor.image_std)
        self.register_buffer("pixel_mean", mean, persistent=False)
        self.register_buffer("pixel_std", std, persistent=False)
        self.val_iou = DatasetIoU(len(classes), ignore_index)

    # ------------------------------------------------------------------ parts
    def trainable(self) -> torch.nn.Module:
        return self.segmenter.model  # the optimizer skips parameters with requires_grad False

    def frozen_prefixes(self) -> tuple[str, ...]:
        return () if self.hparams.unfreeze_clip else ("segmenter.model.clip.",)

    def train(self, mode: bool = True):
        super().train(mode)
        if not self.hparams.unfreeze_clip:
            self.segmenter.model.clip.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits ``B x C x H x W`` (at the input size) of ``B x 3 x H x W`` images in [0, 1]."""
        pixels = (images - self.pixel_mean) / self.pixel_std
        logits = self.segmenter.logits(pixels, self.hparams.classes)
        if logits.shape[-2:] != images.shape[-2:]:
            logits = F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return logits

    # ------------------------------------------------------------------ objective
    def loss(self, logits: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """``logits``: ``B x C x H x W``; ``mask``: ``B x H x W`` class ids or ``ignore_index``."""
        hp = self.hparams
        if logits.shape[-2:] != mask.shape[-2:]:
            logits = F.interpolate(logits, size=mask.shape[-2:], mode="bilinear", align_corners=False)
        logits = logits.float()
        out: dict[str, torch.Tensor] = {}
        if "ce" in hp.loss.split("+"):
            out["ce"] = F.cross_entropy(logits, mask, ignore_index=hp.ignore_index)
        if "bce" in hp.loss.split("+"):
            scored = mask != hp.ignore_index  # B x H x W
            onehot = F.one_hot(mask.clamp(0, logits.shape[1] - 1), logits.shape[1]).permute(0, 3, 1, 2).float()
            per_pixel = F.binary_cross_entropy_with_logits(logits, onehot, reduction="none").mean(1)  # B x H x W
            out["bce"] = per_pixel[scored].mean() if scored.any() else logits.sum() * 0.0
        if hp.loss == "ce+bce":
            out["loss"] = out["ce"] + hp.bce_weight * out["bce"]
        else:
            out["loss"] = out[hp.loss]
        return out

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        losses = self.loss(self(batch["image"]), batch["mask"])
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, prog_bar=True, batch_size=len(batch["image"]))
        return losses["loss"]

    # ------------------------------------------------------------------ evaluation
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "test")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def _eval_step(self, batch: dict[str, Any], batch_idx: int, stage: str) -> None:
        logits = self(batch["image"])
        losses = self.loss(logits, batch["mask"])
        bs = len(batch["image"])
        self.log_dict({f"{stage}/{k}": v for k, v in losses.items()}, sync_dist=True, batch_size=bs)
        pred = logits.argmax(1)  # B x H x W
        self.val_iou.update(pred, batch["mask"])
        if batch_idx == 0 and not self.trainer.sanity_checking:
            n, ign = len(self.hparams.classes), self.hparams.ignore_index
            rows = [
                [to_uint8(batch["image"][b]), colourise(batch["mask"][b], n, ign), colourise(pred[b], n)]
                for b in range(min(bs, self.hparams.num_overlays))
            ]
            self.log_overlays(f"{stage}/overlay_image_gt_pred", rows)

    def _eval_epoch_end(self, stage: str) -> None:
        # DatasetIoU.compute() sums the confusion matrices of all processes: every rank has the same value already
        self.log(f"{stage}/mIoU", float(self.val_iou.compute()["mIoU"]), prog_bar=True, sync_dist=True)
        self.val_iou.reset()

    # ------------------------------------------------------------------ predict and export
    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """Label maps with the class names as vocabulary (label ``i`` = ``classes[i - 1]``), at original sizes."""
        logits = self(batch["image"])
        out = []
        for b in range(len(logits)):
            size = tuple(int(s) for s in batch["orig_size"][b])
            up = F.interpolate(logits[b : b + 1], size=size, mode="bilinear", align_corners=False)[0]
            out.append(
                {
                    "name": batch["name"][b],
                    "path": batch["path"][b],
                    "label_map": (up.argmax(0) + 1).cpu().numpy().astype("int32"),
                    "vocabulary": list(self.hparams.classes),
                }
            )
        return out

    def export(self, out: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        """``save_pretrained`` the CLIPSeg model and processor into ``out/segmenter`` (``model.safetensors``).

        Args:
            out: export folder.
            state_dict: this module's keys (e.g. a checkpoint's) to export instead of the current weights; keys it
                lacks (frozen weights left out of checkpoints) keep their current values.
        """
        target = Path(out) / "segmenter"
        weights = None
        if state_dict is not None:
            weights = self.segmenter.model.state_dict()
            prefix = "segmenter.model."
            weights.update({k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)})
        self.segmenter.model.save_pretrained(target, state_dict=weights)
        self.segmenter.processor.save_pretrained(target)
        atomic_write_json(
            target / "autoseg_training.json",
            {"classes": list(self.hparams.classes), "templates": list(self.segmenter.templates)},
        )
        return target

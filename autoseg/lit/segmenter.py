"""SegmenterModule: fine-tune a segmenter's per-name head on a labelled dataset, prompted with the class names.

Backends with per-name logits: ``clipseg`` (the CLIPSeg decoder; text embeddings averaged over prompt templates) and
``sam3`` (SAM 3's DETR encoder and mask decoder, read through the per-name ``semantic_seg`` output). Per image the head
scores every class name; the ``B x C x H x W`` logits are upsampled to the mask size and trained with per-pixel
cross-entropy over the classes (``loss="ce"``), per-class binary cross-entropy (``"bce"``, CLIPSeg's own objective) or
both (``"ce+bce"``), ignoring unscored pixels. The ``B x C`` (image, class) pairs are decoded the segmenter's
``pair_chunk`` at a time, each chunk recomputed in the backward (``PerNameSegmenter.decode``), so the head's
activations take one chunk's memory, not ``B x C`` pairs'. With ``train_names`` a training step decodes only each
image's own classes and the absent ones its patch head scores highest (a vocabulary, as at inference). The backbone
(CLIP; SAM 3's ViT + FPN and text encoder) stays frozen unless ``unfreeze_backbone``. Validation: dataset-level
mIoU of the argmax (``val/mIoU``). Export: a ``save_pretrained`` directory (``model.safetensors`` + config +
processor) for ``--segmenter DIR``.

SAM 3's instance path (DETR decoder queries, boxes, ``pred_logits``, presence token, instance masks) is not trained
here: it needs Hungarian matching of queries to ground-truth instances, which transformers' ``Sam3Model`` does not
provide (its forward takes no labels and returns no loss), and the semantic loss does not reach it (those parts take no
part in ``semantic_seg``). They are left as loaded (and left out of checkpoints); fine-tuning the shared DETR encoder
changes what they see.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from autoseg.lit.base import AutoSegModule, colourise, normaliser, to_uint8
from autoseg.lit.grouping import IGNORED, patch_labels
from autoseg.metrics import DatasetIoU
from autoseg.models.layers import use_patch_transpose_convs
from autoseg.models.segmenters import BACKENDS, PerNameSegmenter, SegmenterConfig, build_segmenter
from autoseg.outputs import Prediction
from autoseg.pipeline import segment_with

LOSSES = ("ce", "bce", "ce+bce")


def resize_logits(logits: torch.Tensor, size) -> torch.Tensor:
    """``N x C x h x w`` logits bilinearly resized to ``size`` (unchanged when already that size)."""
    if logits.shape[-2:] == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


class SegmenterModule(AutoSegModule):
    """A segmenter with per-name logits (frozen backbone by default) and a trainable head.

    Args:
        segmenter: model source: Hugging Face id, local directory or ``scratch:tiny`` / ``scratch:small`` (None:
            the backend's default id).
        classes: dataset class names = the prompts (``train.py`` links them from the data module).
        ignore_index: mask value of unscored pixels (linked from the data module).
        backend: "clipseg" or "sam3".
        templates: clipseg: prompt templates with one ``{}`` (None: the segmenter's default ensemble).
        unfreeze_backbone: also train the backbone (CLIP's vision and text towers; SAM 3's ViT, FPN neck and text
            encoder).
        unfreeze_clip: the CLIPSeg name of ``unfreeze_backbone`` (kept for existing configs).
        loss: "ce", "bce" or "ce+bce".
        bce_weight: weight of the BCE term in "ce+bce".
        class_weights: per-class weights of the cross-entropy terms (e.g. more weight on small "thing" classes).
        patch_class_weights: per-class weights of the auxiliary patch loss (None: ``class_weights``); the patch head
            is not exported, so they steer what the vision tower learns to tell apart without biasing the decoder.
        patch_loss_weight: clipseg: weight of an auxiliary per-patch class loss: a linear head (not exported) on the
            last CLIP vision layer predicts each patch's majority class. Helps a from-scratch vision tower learn shapes.
        decoder_loss_weight: weight of the decoder loss; 0 trains only the vision tower through the patch loss (a
            cheap first stage for from-scratch models: the per-class decoder dominates the cost of a step).
        scratch: for ``scratch:NAME`` sources, ``make_clipseg`` / ``make_sam3`` size overrides (``hidden_size``...).
        train_names: with the patch head and ``loss="ce"``: decode each training image against its own classes
            (those in its crop's mask) and the absent classes the patch head scores highest, up to this many names
            (None: every class). The cross-entropy runs over those names, as inference runs over a vocabulary of
            the names present and a few false ones; a step decodes fewer pairs (5 of 10 classes: 0.7x a step of the
            ShapesWorld recipe's second segmenter stage).
        pair_chunk: (image, class) pairs decoded per call while training (None: the segmenter's own). A chunk that
            holds every pair of a batch (batch size x classes) runs without activation checkpointing: faster (1.5x a
            step of the ShapesWorld recipe's small CLIPSeg on CPU), at the memory of all pairs' activations.
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
        segmenter: str | None = None,
        classes: list[str] | None = None,
        ignore_index: int = 255,
        backend: str = "clipseg",
        templates: list[str] | None = None,
        unfreeze_backbone: bool = False,
        unfreeze_clip: bool = False,
        loss: str = "ce",
        bce_weight: float = 1.0,
        class_weights: list[float] | None = None,
        patch_class_weights: list[float] | None = None,
        patch_loss_weight: float = 0.0,
        decoder_loss_weight: float = 1.0,
        scratch: dict[str, Any] | None = None,
        train_names: int | None = None,
        pair_chunk: int | None = None,
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
        self.require_classes(classes, "SegmenterModule")
        if loss not in LOSSES:
            raise ValueError(f"loss {loss!r} unknown; choose one of {LOSSES}")
        for name, values in (("class_weights", class_weights), ("patch_class_weights", patch_class_weights)):
            if values is not None and len(values) != len(classes):
                raise ValueError(f"{name} has {len(values)} values for {len(classes)} classes")
        if patch_loss_weight <= 0 and decoder_loss_weight <= 0:
            raise ValueError("nothing to train: patch_loss_weight and decoder_loss_weight are both 0")
        trainable = [name for name, b in BACKENDS.items() if b.trainable]
        if backend not in trainable:
            raise ValueError(f"backend {backend!r} cannot be fine-tuned; choose one of {trainable} (per-name logits)")
        config = SegmenterConfig(name=backend, source=segmenter)
        if templates:
            if not hasattr(config.options, "templates"):
                raise ValueError(f"templates is a setting of the CLIPSeg decoder; backend {backend!r} has no templates")
            config = config.with_options(templates=tuple(templates))
        self.segmenter: PerNameSegmenter = build_segmenter(
            config, words=classes, scratch=scratch, flag="--model.init_args.segmenter"
        )
        if pair_chunk is not None:
            if pair_chunk < 1:
                raise ValueError(f"pair_chunk must be at least 1, got {pair_chunk}")
            self.segmenter.pair_chunk = pair_chunk
        if train_names is not None and (train_names < 1 or patch_loss_weight <= 0 or loss != "ce"):
            raise ValueError(
                f"train_names={train_names} needs a positive count, patch_loss_weight > 0 (the patch head picks the "
                f"absent names) and loss 'ce' (got patch_loss_weight={patch_loss_weight}, loss={loss!r})"
            )
        if patch_loss_weight > 0 and not hasattr(self.segmenter, "vision_states"):
            raise ValueError(f"patch_loss_weight needs the CLIPSeg vision tower; backend {backend!r} has no patch head")
        use_patch_transpose_convs(self.segmenter.model)  # the same upsampling, a quarter of a CPU step less
        self.segmenter.model.requires_grad_(False)
        for part in self.segmenter.head() + (self.segmenter.backbone() if self.unfrozen else []):
            part.requires_grad_(True)
        processor = self.segmenter.image_processor
        mean, std = normaliser(processor.image_mean, processor.image_std)
        self.register_buffer("pixel_mean", mean, persistent=False)
        self.register_buffer("pixel_std", std, persistent=False)
        self.val_iou = DatasetIoU(len(classes), ignore_index)
        weights = torch.tensor(class_weights, dtype=torch.float32) if class_weights is not None else None
        self.register_buffer("class_weights", weights, persistent=False)
        patch_weights = torch.tensor(patch_class_weights, dtype=torch.float32) if patch_class_weights else weights
        self.register_buffer("patch_class_weights", patch_weights, persistent=False)
        self.patch_head = None
        if patch_loss_weight > 0:
            self.patch_head = torch.nn.Linear(self.segmenter.model.config.vision_config.hidden_size, len(classes))
            self.val_patch_iou = DatasetIoU(len(classes), IGNORED)
        self.train()  # the loaders return models in eval mode: the head trains (dropout on), frozen parts stay eval

    # ------------------------------------------------------------------ parts
    @property
    def unfrozen(self) -> bool:
        return self.hparams.unfreeze_backbone or self.hparams.unfreeze_clip

    def trainable(self) -> torch.nn.Module:
        return self  # the optimizer skips parameters with requires_grad False (the frozen backbone)

    def _frozen_parts(self) -> list[tuple[str, torch.nn.Module]]:
        """The model's top-level parts that nothing trains (CLIP; SAM 3's encoders and instance path)."""
        return [
            (name, part)
            for name, part in self.segmenter.model.named_children()
            if not any(p.requires_grad for p in part.parameters())
        ]

    def frozen_prefixes(self) -> tuple[str, ...]:
        return tuple(f"segmenter.model.{name}." for name, _ in self._frozen_parts())

    def train(self, mode: bool = True):
        super().train(mode)
        for _, part in self._frozen_parts():
            part.eval()
        return self

    @property
    def input_size(self) -> int | None:
        """The square side the segmenter's processor resizes images to at inference (SAM 3), else None (any side).

        The data module resizes evaluation images straight to it (one resize from the original, as at inference).
        """
        return self.segmenter.input_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits ``B x C x H x W`` (at the input size) of ``B x 3 x H x W`` images in [0, 1]."""
        return self._logits(self.segmenter.encode_image(self._pixels(images)), images.shape[-2:])

    def _pixels(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised pixels, resized to the model's input side when it needs one (SAM 3).

        Only training crops (``data.image_size``) are resized here: the data module resizes evaluation images from
        the original straight to :attr:`input_size`, the pixels ``Sam3Segmenter.preprocess`` gives at inference.
        """
        side = self.segmenter.input_size
        if side is not None and tuple(images.shape[-2:]) != (side, side):
            images = F.interpolate(images, size=(side, side), mode="bilinear", align_corners=False)
        return (images - self.pixel_mean) / self.pixel_std

    def _logits(self, features: Any, size, pairs: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """``B x C x H x W`` logits of every class, or only of the listed (image indices, class indices) ``pairs``
        (the others ``-inf``: no probability, no gradient)."""
        text = self.segmenter.text_embeddings(self.hparams.classes)
        if pairs is None:
            return resize_logits(self.segmenter.decode(features, text), size)
        listed = resize_logits(self.segmenter.decode_listed(features, text, *pairs)[:, None], size)[:, 0]  # P x H x W
        shape = (self.segmenter.num_images(features), len(self.hparams.classes), *listed.shape[-2:])
        logits = listed.new_full(shape, -torch.inf)  # resized before: -inf must not enter the interpolation
        logits[pairs] = listed
        return logits

    def _outputs(
        self, images: torch.Tensor, decode: bool = True, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Decoder logits ``B x C x H x W`` (None when not decoding) and patch-head logits ``B x N x C`` (or None).

        With ``mask`` (training with ``train_names``) only the names :meth:`training_names` picks are decoded; the
        others' logits are ``-inf`` (no probability, no gradient).
        """
        if self.patch_head is None:
            return self(images) if decode else None, None
        states = self.segmenter.vision_states(self._pixels(images))
        patch = self.patch_head(states[-1][:, 1:])
        if not decode:
            return None, patch
        features = [states[i + 1] for i in self.segmenter.model.extract_layers]
        pairs = None
        if mask is not None and self.hparams.train_names < len(self.hparams.classes):
            pairs = self.training_names(mask, patch.detach())
        return self._logits(features, images.shape[-2:], pairs), patch

    def training_names(self, mask: torch.Tensor, patch_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The (image, class) pairs a training step decodes with ``train_names``: every class in an image's mask
        and the absent classes whose strongest patch logit is highest, ``train_names`` per image (more when an image
        holds more classes). Returns image and class indices, image-major."""
        b, c = patch_logits.shape[0], patch_logits.shape[-1]
        labels = mask.flatten(1)
        labels = torch.where((labels >= 0) & (labels < c), labels, c)  # unscored pixels -> an extra column
        present = torch.zeros(b, c + 1, dtype=torch.bool, device=mask.device).scatter_(1, labels, True)[:, :c]
        k = max(self.hparams.train_names, int(present.sum(1).max()))
        score = patch_logits.float().amax(1).masked_fill(present.to(patch_logits.device), float("inf"))
        names = score.topk(k, dim=1).indices.sort(dim=1).values  # B x k, each image's names in class order
        return torch.arange(b, device=names.device).repeat_interleave(k), names.flatten()

    def _patch_grid(self, images_or_masks: torch.Tensor) -> tuple[int, int]:
        """The vision tower's patch grid for inputs of this size (masks have the images' size here)."""
        p = self.segmenter.model.config.vision_config.patch_size
        return images_or_masks.shape[-2] // p, images_or_masks.shape[-1] // p

    # ------------------------------------------------------------------ objective
    def loss(
        self, logits: torch.Tensor | None, mask: torch.Tensor, patch_logits: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """``logits``: ``B x C x H x W`` (or None); ``mask``: ``B x H x W`` class ids or ``ignore_index``;
        ``patch_logits``: ``B x N x C`` from the patch head (or None)."""
        hp = self.hparams
        out: dict[str, torch.Tensor] = {}
        total = mask.new_zeros((), dtype=torch.float32)
        if logits is not None:
            logits = resize_logits(logits, mask.shape[-2:]).float()
            if "ce" in hp.loss.split("+"):
                out["ce"] = F.cross_entropy(logits, mask, weight=self.class_weights, ignore_index=hp.ignore_index)
            if "bce" in hp.loss.split("+"):
                scored = mask != hp.ignore_index  # B x H x W
                onehot = F.one_hot(mask.clamp(0, logits.shape[1] - 1), logits.shape[1]).permute(0, 3, 1, 2).float()
                per_pixel = F.binary_cross_entropy_with_logits(logits, onehot, reduction="none").mean(1)  # B x H x W
                out["bce"] = per_pixel[scored].mean() if scored.any() else logits.sum() * 0.0
            decoder = out["ce"] + hp.bce_weight * out["bce"] if hp.loss == "ce+bce" else out[hp.loss]
            total = total + hp.decoder_loss_weight * decoder
        if patch_logits is not None:
            labels = patch_labels(mask, self._patch_grid(mask), hp.ignore_index)  # B x N
            weight = self.patch_class_weights
            out["patch"] = F.cross_entropy(
                patch_logits.flatten(0, 1).float(), labels.flatten(), weight=weight, ignore_index=IGNORED
            )
            total = total + hp.patch_loss_weight * out["patch"]
        out["loss"] = total
        return out

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        decode = self.hparams.decoder_loss_weight > 0
        mask = batch["mask"] if self.hparams.train_names is not None else None
        logits, patch = self._outputs(batch["image"], decode=decode, mask=mask)
        losses = self.loss(logits, batch["mask"], patch)
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
        logits, patch = self._outputs(batch["image"])
        losses = self.loss(logits, batch["mask"], patch)
        bs = len(batch["image"])
        if patch is not None:
            grid = self._patch_grid(batch["mask"])
            self.val_patch_iou.update(patch.argmax(-1), patch_labels(batch["mask"], grid, self.hparams.ignore_index))
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
        result = self.val_iou.compute()
        self.log(f"{stage}/mIoU", float(result["mIoU"]), prog_bar=True, sync_dist=True)
        for name, iou in zip(self.hparams.classes, result["iou"].tolist(), strict=True):
            if iou == iou:  # NaN: class absent from ground truth and predictions (skipped by the mmseg rule)
                self.log(f"{stage}/iou/{name}", iou, sync_dist=True)
        self.val_iou.reset()
        if self.patch_head is not None:  # majority class per patch from the auxiliary head
            self.log(f"{stage}/patch_mIoU", float(self.val_patch_iou.compute()["mIoU"]), sync_dist=True)
            self.val_patch_iou.reset()

    # ------------------------------------------------------------------ predict and export
    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[Prediction | None]:
        """The pipeline's segment stage with the class names as vocabulary (label ``i`` = ``classes[i - 1]``), on
        the original images (None: outputs already written, see ``PredictionWriter``)."""
        classes = list(self.hparams.classes)
        return self.predict_with(batch, lambda images: segment_with(self.segmenter, images, [classes] * len(images)))

    def export(self, out: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        """``save_pretrained`` the model and processor into ``out/segmenter`` (``model.safetensors``).

        Args:
            out: export folder.
            state_dict: this module's keys (e.g. a checkpoint's) to export instead of the current weights; keys it
                lacks (frozen weights left out of checkpoints) keep their current values.
        """
        info = {"backend": self.hparams.backend, "classes": list(self.hparams.classes)}
        if self.hparams.backend == "clipseg":
            info["templates"] = list(self.segmenter.templates)
        return self.export_pretrained("segmenter", out, "segmenter", state_dict, info)

"""EnhancerModule: train the embedding-enhancer head on frozen BLIP patch tokens with segmentation masks.

Objective: tokens of the same ground-truth class attract and others repel (supervised contrastive loss on the
enhanced tokens of patches whose majority class is known, over the whole batch or within each image), plus
``keep_weight`` times the relative squared change of the tokens, so that the enhanced tokens stay usable for cluster
captioning.

Validation figure ``val/cluster_mIoU``: each image's enhanced tokens are clustered (k-means with k = the number of
ground-truth classes in the image, or the full BBoost), clusters are Hungarian-matched to the ground-truth classes
on IoU, and a dataset-level confusion matrix gives the mIoU. The identity head's figure (plain BLIP tokens) is
computed once, in the first validation epoch, and logged as ``val/cluster_mIoU_identity``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.trainer.states import TrainerFn

from autoseg.lit.base import AutoSegModule, colourise, normaliser, to_uint8
from autoseg.lit.grouping import IGNORED, match_clusters, patch_labels, supervised_contrastive
from autoseg.metrics import DatasetIoU
from autoseg.models.blip import DEFAULT_BLIP, load_blip
from autoseg.models.enhancer import EmbeddingEnhancer, EnhancerConfig, save_enhancer
from autoseg.outputs import Prediction
from autoseg.vocab.bboost import BBoost, BBoostConfig, kmeans

CLUSTER_MODES = ("oracle_k", "bboost")
CONTRAST_MODES = ("batch", "image")
IDENTITY_KEY = "autoseg_cluster_miou_identity"


class EnhancerModule(AutoSegModule):
    """Frozen BLIP + trainable :class:`EmbeddingEnhancer`.

    Args:
        blip: BLIP source: Hugging Face id, local directory or ``scratch:tiny`` / ``scratch:small``.
        classes: dataset class names (``train.py`` links them from the data module).
        ignore_index: mask value of unscored pixels (linked from the data module).
        head_width: enhancer block width.
        head_depth: number of enhancer blocks.
        head_block: "attn" (timm ViT blocks) or "mlp" (per-token residual MLPs).
        head_heads: attention heads.
        head_mlp_ratio: MLP width / block width.
        head_pos_dim: sine position-code channels given to the head (0: none).
        temperature: supervised contrastive temperature.
        keep_weight: weight of the relative squared change of the tokens.
        contrast: "batch" (every labelled patch of the batch is a positive or negative of every other) or "image"
            (only patches of the same image, as BBoost clusters each image on its own; the loss is averaged over
            images).
        max_patches: patches sampled per batch for the contrastive loss (memory is quadratic in it).
        max_ignore: a patch with more unscored pixels than this fraction gets no label.
        cluster_mode: "oracle_k" (k-means, k = ground-truth classes in the image) or "bboost" (the pipeline's
            BBoost, k chosen by the algorithm) for the validation figure.
        cluster_pos_dim: position-code channels appended before "oracle_k" clustering (0: tokens only).
        kmeans_restarts: k-means restarts ("oracle_k").
        kmeans_iters: k-means iterations ("oracle_k").
        bboost: ``BBoostConfig`` fields for "bboost" mode.
        predict_pipeline: the pipeline ``predict`` runs this head in (a preset, YAML, saved folder or repo id; its
            BLIP and enhancer are this module's); None: AutoSeg's default settings.
        num_overlays: validation images logged to TensorBoard (image | ground truth | identity | enhanced).
        seed: k-means seed.
        optimizer: timm optimizer name (``create_optimizer_v2``), e.g. "adamw", "lamb", "sgd".
        lr: peak learning rate.
        weight_decay: weight decay (not applied to norms and biases).
        scheduler: "cosine" (timm ``CosineLRScheduler`` over all steps, with warmup) or "constant".
        warmup_steps: linear warmup steps.
        min_lr_ratio: final learning rate as a fraction of ``lr``.
    """

    def __init__(
        self,
        blip: str = DEFAULT_BLIP,
        classes: list[str] | None = None,
        ignore_index: int = 255,
        head_width: int = 256,
        head_depth: int = 2,
        head_block: str = "attn",
        head_heads: int = 4,
        head_mlp_ratio: float = 4.0,
        head_pos_dim: int = 64,
        temperature: float = 0.1,
        keep_weight: float = 1.0,
        contrast: str = "batch",
        max_patches: int = 4096,
        max_ignore: float = 0.5,
        cluster_mode: str = "oracle_k",
        cluster_pos_dim: int = 0,
        kmeans_restarts: int = 4,
        kmeans_iters: int = 50,
        bboost: dict[str, Any] | None = None,
        predict_pipeline: str | None = None,
        num_overlays: int = 4,
        seed: int = 0,
        optimizer: str = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        scheduler: str = "cosine",
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.01,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.require_classes(classes, "EnhancerModule")
        if contrast not in CONTRAST_MODES:
            raise ValueError(f"contrast {contrast!r} unknown; choose one of {CONTRAST_MODES}")
        if cluster_mode not in CLUSTER_MODES:
            raise ValueError(f"cluster_mode {cluster_mode!r} unknown; choose one of {CLUSTER_MODES}")
        self.blip = load_blip(blip, flag="--model.init_args.blip")
        self.blip.requires_grad_(False)
        self.enhancer = EmbeddingEnhancer(
            EnhancerConfig(
                dim=self.blip.hidden_size,
                width=head_width,
                depth=head_depth,
                block=head_block,
                num_heads=head_heads,
                mlp_ratio=head_mlp_ratio,
                pos_dim=head_pos_dim,
            )
        )
        self.bboost = BBoost(BBoostConfig(**(bboost or {})))
        processor = self.blip.processor.image_processor
        mean, std = normaliser(processor.image_mean, processor.image_std)
        self.register_buffer("pixel_mean", mean, persistent=False)
        self.register_buffer("pixel_std", std, persistent=False)
        self.val_iou = DatasetIoU(len(classes), ignore_index)
        self.val_iou_identity = DatasetIoU(len(classes), ignore_index)
        self.identity_miou: float | None = None  # computed in the first validation epoch, then kept

    # ------------------------------------------------------------------ parts
    def trainable(self) -> torch.nn.Module:
        return self.enhancer

    def frozen_prefixes(self) -> tuple[str, ...]:
        return ("blip.",)

    def train(self, mode: bool = True):
        super().train(mode)
        self.blip.eval()  # frozen: no dropout, ever
        return self

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Frozen BLIP patch tokens of ``B x 3 x S x S`` images in [0, 1]. Returns ``B x N x D`` and the grid."""
        p = self.blip.patch_size
        if images.shape[-1] % p or images.shape[-2] % p:
            raise ValueError(f"image size {tuple(images.shape[-2:])} is not a multiple of BLIP's patch size {p}")
        pixels = ((images - self.pixel_mean) / self.pixel_std).to(self.blip.dtype)
        with torch.no_grad():
            hidden = self.blip.run_encoder(self.blip.embed(pixels))  # B x (1 + N) x D
        return hidden[:, 1:].float(), (images.shape[-2] // p, images.shape[-1] // p)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """Plain and enhanced tokens (``B x N x D`` each) and the patch grid."""
        tokens, grid = self.encode(images)
        return tokens, self.enhancer(tokens, grid), grid

    # ------------------------------------------------------------------ objective
    def loss(self, tokens: torch.Tensor, enhanced: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Grouping + keep terms. ``tokens``/``enhanced``: ``B x N x D``; ``labels``: ``B x N`` (-1 = ignored)."""
        hp = self.hparams
        if hp.contrast == "image":
            scored = labels != IGNORED
            per_image = zip(enhanced, labels, scored, strict=True)
            terms = [supervised_contrastive(e[m], lab[m], hp.temperature) for e, lab, m in per_image]
            group = torch.stack(terms).mean()
        else:
            flat_labels = labels.reshape(-1)
            valid = (flat_labels != IGNORED).nonzero()[:, 0]
            if valid.numel() > hp.max_patches:
                valid = valid[torch.randperm(valid.numel(), device=valid.device)[: hp.max_patches]]
            group = supervised_contrastive(
                enhanced.reshape(-1, enhanced.shape[-1])[valid], flat_labels[valid], hp.temperature
            )
        keep = (enhanced - tokens).pow(2).sum(-1).mean() / tokens.pow(2).sum(-1).mean().clamp_min(1e-12)
        return {"loss": group + hp.keep_weight * keep, "group": group, "keep": keep}

    def _step(self, batch: dict[str, Any]) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, tuple]:
        tokens, enhanced, grid = self(batch["image"])
        labels = patch_labels(batch["mask"], grid, self.hparams.ignore_index, self.hparams.max_ignore)
        return self.loss(tokens, enhanced, labels), tokens, enhanced, grid

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        losses, *_ = self._step(batch)
        bs = batch["image"].shape[0]
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, prog_bar=True, batch_size=bs)
        return losses["loss"]

    # ------------------------------------------------------------------ validation: cluster mIoU
    def cluster(self, tokens: torch.Tensor, grid: tuple[int, int], k: int) -> torch.Tensor:
        """Cluster one image's ``N x D`` tokens. Returns an ``h x w`` cluster map."""
        hp = self.hparams
        gen = torch.Generator(device=tokens.device).manual_seed(hp.seed)
        if hp.cluster_mode == "bboost":
            return self.bboost([tokens], [grid], seed=hp.seed)
        feats = BBoost(BBoostConfig(pos_dim=hp.cluster_pos_dim)).features(tokens, grid)
        labels, _ = kmeans(feats, min(k, feats.shape[0]), hp.kmeans_restarts, hp.kmeans_iters, gen)
        return labels.reshape(grid)

    def matched_prediction(self, tokens: torch.Tensor, grid: tuple[int, int], target: torch.Tensor) -> torch.Tensor:
        """Cluster ``N x D`` tokens, upsample to the ``H x W`` target and name clusters by Hungarian matching."""
        hp = self.hparams
        k = int(torch.unique(target[target != hp.ignore_index]).numel())
        clusters = self.cluster(tokens, grid, max(k, 1))
        up = F.interpolate(clusters[None, None].float(), size=target.shape, mode="nearest")[0, 0].long()
        return match_clusters(up, target, len(hp.classes), hp.ignore_index)

    def on_validation_epoch_start(self) -> None:
        # cached while fitting (the same validation set every epoch); `train.py validate` may score another set or
        # image size than the checkpoint's run, so it always recomputes the identity figure on its own data
        fitting = self.trainer.state.fn == TrainerFn.FITTING
        self._identity_now = not self.trainer.sanity_checking and (self.identity_miou is None or not fitting)

    def on_test_epoch_start(self) -> None:
        self._identity_now = True

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "test")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def _eval_step(self, batch: dict[str, Any], batch_idx: int, stage: str) -> None:
        losses, tokens, enhanced, grid = self._step(batch)
        bs = batch["image"].shape[0]
        self.log_dict({f"{stage}/{k}": v for k, v in losses.items()}, sync_dist=True, batch_size=bs)
        n_overlays = 0 if batch_idx or self.trainer.sanity_checking else self.hparams.num_overlays
        overlays = []
        for b in range(bs):
            target = batch["mask"][b]
            pred = self.matched_prediction(enhanced[b], grid, target)
            self.val_iou.update(pred, target)
            if self._identity_now or b < n_overlays:
                identity = self.matched_prediction(tokens[b], grid, target)
                if self._identity_now:
                    self.val_iou_identity.update(identity, target)
                if b < n_overlays:
                    n, ign = len(self.hparams.classes), self.hparams.ignore_index
                    panels = [colourise(m, n + 1, ign) for m in (target, identity, pred)]
                    overlays.append([to_uint8(batch["image"][b]), *panels])
        self.log_overlays(f"{stage}/overlay_image_gt_identity_enhanced", overlays)

    def _eval_epoch_end(self, stage: str) -> None:
        # DatasetIoU.compute() sums the confusion matrices of all processes: every rank has the same value already
        self.log(f"{stage}/cluster_mIoU", float(self.val_iou.compute()["mIoU"]), prog_bar=True, sync_dist=True)
        self.val_iou.reset()
        identity = self.identity_miou
        if self._identity_now:
            identity = float(self.val_iou_identity.compute()["mIoU"])
            self.val_iou_identity.reset()
            if stage == "val":
                self.identity_miou = identity
        if identity is not None:
            self.log(f"{stage}/cluster_mIoU_identity", identity, sync_dist=True)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[IDENTITY_KEY] = self.identity_miou

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.identity_miou = checkpoint.get(IDENTITY_KEY)

    # ------------------------------------------------------------------ predict and export
    def on_predict_start(self) -> None:
        """The pipeline ``predict`` runs: ``predict_pipeline``'s settings with this module's BLIP and head."""
        self.pipeline = self.predict_pipeline_with(
            self.hparams.predict_pipeline, captioner=self.blip, enhancer=self.enhancer
        )

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[Prediction | None]:
        """The pipeline's predictions with this head (None: outputs already written, see ``PredictionWriter``)."""
        return self.predict_with(batch, self.pipeline.predict)

    def export(self, out: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        """Write ``out/enhancer.safetensors`` (``state_dict``: this module's keys, e.g. from a checkpoint)."""
        head = None
        if state_dict is not None:
            head = {k.removeprefix("enhancer."): v for k, v in state_dict.items() if k.startswith("enhancer.")}
        return save_enhancer(self.enhancer, Path(out) / "enhancer.safetensors", head)

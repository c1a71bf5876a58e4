"""The one auto-vocabulary inference path shared by ``infer.py``, ``eval.py`` and the LightningModules.

image -> BLIP patch tokens at several scales -> (optional enhancer) -> BBoost cluster map -> captions per cluster
-> nouns = vocabulary -> open-vocabulary segmenter on that vocabulary -> label map.

Every stage takes the whole batch and batches inside (one encoder call per scale, batched k-means, one padded encoder
call for all local re-runs, one ``generate`` for all clusters and passes, one spaCy pass); an image's output does not
depend on the other images of its batch.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from autoseg.config import PipelineConfig
from autoseg.config_checks import check_runtime, resolve_device
from autoseg.models.blip import BlipCaptioner, CaptionConfig
from autoseg.models.enhancer import load_enhancer
from autoseg.models.segmenters import Segmenter, build_segmenter
from autoseg.outputs import Prediction
from autoseg.vocab.bboost import BBoost, resize_labels
from autoseg.vocab.nouns import NounExtractor

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
STAGES = ("encode", "bboost", "cluster_states", "caption", "nouns", "segment")


class AutoSegPipeline:
    """Auto-vocabulary semantic segmentation of a batch of images.

    Args:
        captioner: BLIP encoder + captioner.
        segmenter: open-vocabulary segmenter.
        bboost: the grouping step.
        nouns: caption -> names.
        caption: decoding settings.
        scales: square input sizes for the clustering tokens.
        caption_scale: the scale (one of ``scales``) at which clusters are captioned.
        enhancer: optional module ``(B x N x D tokens, grid) -> B x N x D`` applied before clustering.
        seed: seed of k-means and caption sampling.
        max_names: keep at most this many names per image, those of the largest clusters (None: all).

    Attributes:
        last_stage_seconds: seconds per stage (:data:`STAGES`) of the last batch.
        stage_seconds: seconds per stage summed over every batch since construction.
    """

    def __init__(
        self,
        captioner: BlipCaptioner,
        segmenter: Segmenter,
        bboost: BBoost,
        nouns: NounExtractor,
        caption: CaptionConfig,
        scales: Sequence[int] = (384, 512),
        caption_scale: int | None = None,
        enhancer: nn.Module | None = None,
        seed: int = 0,
        max_names: int | None = None,
    ):
        if not scales:
            raise ValueError("need at least one scale")
        caption_scale = scales[0] if caption_scale is None else caption_scale
        if caption_scale not in scales:
            raise ValueError(f"caption_scale {caption_scale} must be one of the scales {list(scales)}")
        if max_names is not None and max_names < 1:
            raise ValueError(f"max_names must be >= 1 or None, got {max_names}")
        self.captioner = captioner
        self.segmenter = segmenter
        self.bboost = bboost
        self.nouns = nouns
        self.caption_config = caption
        self.scales = tuple(scales)
        self.caption_index = self.scales.index(caption_scale)
        self.enhancer = enhancer.eval() if enhancer is not None else None
        self.seed = seed
        self.max_names = max_names
        self.last_stage_seconds: dict[str, float] = {}
        self.stage_seconds: dict[str, float] = dict.fromkeys(STAGES, 0.0)

    @classmethod
    def from_config(cls, config: PipelineConfig, enhancer: nn.Module | None = None) -> AutoSegPipeline:
        """Build every part from a ``PipelineConfig`` (loads weights; no network when given local directories)."""
        check_runtime(config)  # types, ranges, device, dtype, patch sizes: one clear error before any weights load
        device, dtype = resolve_device(config.device), DTYPES[config.dtype]
        return cls(
            captioner=BlipCaptioner.from_pretrained(config.blip, device=device, dtype=dtype, compile=config.compile),
            segmenter=build_segmenter(config.segmenter, device=device, dtype=dtype),
            bboost=BBoost(config.bboost),
            nouns=NounExtractor(config.nouns),
            caption=config.caption,
            scales=config.scales,
            caption_scale=config.caption_scale,
            enhancer=enhancer.to(device) if enhancer is not None else None,
            seed=config.seed,
            max_names=config.max_names,
        )

    @contextlib.contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        """Add the wall time of the block to ``stage`` (waits for the GPU, so the time is the stage's own)."""
        sync = torch.cuda.synchronize if self.captioner.device.type == "cuda" else lambda: None
        sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            sync()
            seconds = time.perf_counter() - start
            self.last_stage_seconds[stage] = self.last_stage_seconds.get(stage, 0.0) + seconds
            self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + seconds

    @torch.inference_mode()
    def vocabulary(self, images: Sequence[Image.Image]) -> list[Prediction]:
        """Cluster, caption and extract nouns; returns predictions without label maps (``label_map`` is empty)."""
        self.last_stage_seconds = {}
        with self.timed("encode"):
            tokens = self.captioner.encode(images, self.scales)
            patches = [t.patches for t in tokens]  # per scale B x N x D
            if self.enhancer is not None:
                patches = [self.enhancer(p, t.grid) for p, t in zip(patches, tokens, strict=True)]
        cap_tokens = tokens[self.caption_index]
        with self.timed("bboost"):
            cluster_maps = self.bboost.batch(patches, [t.grid for t in tokens], seed=self.seed)  # per image H x W
            cap_maps = [caption_clusters(m, cap_tokens.grid) for m in cluster_maps]
        with self.timed("cluster_states"):
            # captions read BLIP's own tokens: the enhancer only regroups patches, the captioner never saw its output
            states = self.captioner.batch_cluster_states(cap_tokens, cap_maps, self.caption_config.mode)
        with self.timed("caption"):
            flat = self.captioner.caption(
                [s for per_image in states for s in per_image],
                self.caption_config,
                seed=self.seed,
                keys=[k for per_image in states for k in range(len(per_image))],  # a cluster's key: its index
            )
            captions = regroup(flat, [len(per_image) for per_image in states])  # per image, per cluster
        with self.timed("nouns"):
            orders = [cluster_order(m, len(c)) for m, c in zip(cap_maps, captions, strict=True)]  # big clusters first
            flat = self.nouns.nouns_per_group(
                [caps[k] for order, caps in zip(orders, captions, strict=True) for k in order]
            )
            nouns = regroup(flat, [len(order) for order in orders])  # per image, per cluster in that order
        parts = zip(cap_maps, captions, orders, nouns, strict=True)
        return [self.prediction(cap_map, caps, order, found) for cap_map, caps, order, found in parts]

    def prediction(
        self, cap_map: torch.Tensor, captions: list[list[str]], order: list[int], nouns: list[list[list[str]]]
    ) -> Prediction:
        """One image's prediction without its label map.

        Args:
            cap_map: ``h x w`` clusters on the captioning grid.
            captions: per cluster, its captions.
            order: cluster ids, biggest first.
            nouns: per cluster in ``order``, the nouns of each of its captions.
        """
        per_cluster = dict(zip(order, nouns, strict=True))
        vocab = list(dict.fromkeys(n for k in order for per_caption in per_cluster[k] for n in per_caption))
        return Prediction(
            vocabulary=vocab[: self.max_names],  # the names of the biggest clusters come first
            label_map=np.zeros((0, 0), np.int32),
            cluster_map=cap_map.cpu().numpy().astype(np.int32),
            captions=dict(enumerate(captions)),
            extra={
                "cluster_nouns": {str(k): sorted({n for c in per_cluster[k] for n in c}) for k in sorted(per_cluster)}
            },
        )

    def __call__(self, images: Sequence[Image.Image]) -> list[Prediction]:
        """Vocabulary and label map for each image (label maps at the images' own sizes)."""
        preds = self.vocabulary(images)
        with self.timed("segment"):
            label_maps = self.segmenter.segment(images, [p.vocabulary for p in preds])
        for p, lm in zip(preds, label_maps, strict=True):
            p.label_map = lm
        return preds


def build_pipeline(config: PipelineConfig) -> AutoSegPipeline:
    """Every model of ``config`` loaded, the enhancer (``config.enhancer``) included, checked against BLIP's width."""
    enhancer = load_enhancer(config.enhancer) if config.enhancer else None
    pipeline = AutoSegPipeline.from_config(config, enhancer=enhancer)
    if enhancer is not None and enhancer.dim != pipeline.captioner.hidden_size:
        raise ValueError(
            f"enhancer {config.enhancer} was trained on {enhancer.dim}-d BLIP tokens but BLIP {config.blip} has "
            f"{pipeline.captioner.hidden_size}-d tokens; use the BLIP it was trained with"
        )
    return pipeline


def caption_clusters(cluster_map: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """The cluster map on the captioning grid, relabelled ``0..K-1`` (clusters too small for that grid disappear)."""
    cap_map = resize_labels(cluster_map, grid)
    return torch.searchsorted(torch.unique(cap_map), cap_map)


def cluster_order(cluster_map: torch.Tensor, n_clusters: int) -> list[int]:
    """Cluster ids by decreasing area (ties: lower id first)."""
    areas = torch.bincount(cluster_map.flatten(), minlength=n_clusters)
    return torch.argsort(areas, descending=True, stable=True).tolist()


def regroup(items: list, sizes: Sequence[int]) -> list[list]:
    """Split a flat list into consecutive groups of the given sizes."""
    starts = np.cumsum([0, *sizes]).tolist()
    return [items[a:b] for a, b in zip(starts[:-1], starts[1:], strict=True)]

"""The one auto-vocabulary inference path shared by ``infer.py``, ``eval.py`` and the LightningModules.

image -> BLIP patch tokens at several scales -> (optional enhancer) -> BBoost cluster map -> captions per cluster
-> nouns = vocabulary -> open-vocabulary segmenter on that vocabulary -> label map.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from autoseg.config import PipelineConfig
from autoseg.config_checks import check_runtime, resolve_device
from autoseg.models.blip import BlipCaptioner, CaptionConfig
from autoseg.models.segmenter import Segmenter, build_segmenter
from autoseg.outputs import Prediction
from autoseg.vocab.bboost import BBoost, resize_labels
from autoseg.vocab.nouns import NounExtractor

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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
    ):
        if not scales:
            raise ValueError("need at least one scale")
        caption_scale = scales[0] if caption_scale is None else caption_scale
        if caption_scale not in scales:
            raise ValueError(f"caption_scale {caption_scale} must be one of the scales {list(scales)}")
        self.captioner = captioner
        self.segmenter = segmenter
        self.bboost = bboost
        self.nouns = nouns
        self.caption_config = caption
        self.scales = tuple(scales)
        self.caption_index = self.scales.index(caption_scale)
        self.enhancer = enhancer.eval() if enhancer is not None else None
        self.seed = seed

    @classmethod
    def from_config(cls, config: PipelineConfig, enhancer: nn.Module | None = None) -> AutoSegPipeline:
        """Build every part from a ``PipelineConfig`` (loads weights; no network when given local directories)."""
        check_runtime(config)  # types, ranges, device, dtype, patch sizes: one clear error before any weights load
        device, dtype = resolve_device(config.device), DTYPES[config.dtype]
        return cls(
            captioner=BlipCaptioner.from_pretrained(config.blip, device=device, dtype=dtype),
            segmenter=build_segmenter(config.segmenter, device=device, dtype=dtype),
            bboost=BBoost(config.bboost),
            nouns=NounExtractor(config.nouns),
            caption=config.caption,
            scales=config.scales,
            caption_scale=config.caption_scale,
            enhancer=enhancer.to(device) if enhancer is not None else None,
            seed=config.seed,
        )

    @torch.inference_mode()
    def vocabulary(self, images: Sequence[Image.Image]) -> list[Prediction]:
        """Cluster, caption and extract nouns; returns predictions without label maps (``label_map`` is empty)."""
        tokens = self.captioner.encode(images, self.scales)
        patches = [t.patches for t in tokens]  # per scale B x N x D
        if self.enhancer is not None:
            patches = [self.enhancer(p, t.grid) for p, t in zip(patches, tokens, strict=True)]
        grids = [t.grid for t in tokens]
        cap_tokens = tokens[self.caption_index]
        results = []
        for i in range(len(images)):
            cluster_map = self.bboost([p[i] for p in patches], grids, seed=self.seed)  # H x W on the finest grid
            cap_map = resize_labels(cluster_map, cap_tokens.grid)
            present = torch.unique(cap_map)
            cap_map = torch.searchsorted(present, cap_map)  # clusters too small for the caption grid disappear
            # captions read BLIP's own tokens: the enhancer only regroups patches, the captioner never saw its output
            states = self.captioner.cluster_states(cap_tokens, i, cap_map, self.caption_config.mode)
            captions = self.captioner.caption(states, self.caption_config, seed=self.seed)
            areas = torch.bincount(cap_map.flatten(), minlength=len(captions))
            order = torch.argsort(areas, descending=True, stable=True).tolist()  # name big clusters first
            per_caption = self.nouns.nouns_per_caption([c for k in order for c in captions[k]])
            vocab = list(dict.fromkeys(n for nouns in per_caption for n in nouns))
            cluster_nouns = {}
            pos = 0
            for k in order:
                cluster_nouns[k] = sorted({n for nouns in per_caption[pos : pos + len(captions[k])] for n in nouns})
                pos += len(captions[k])
            results.append(
                Prediction(
                    vocabulary=vocab,
                    label_map=np.zeros((0, 0), np.int32),
                    cluster_map=cap_map.cpu().numpy().astype(np.int32),
                    captions={k: captions[k] for k in range(len(captions))},
                    extra={"cluster_nouns": {str(k): v for k, v in sorted(cluster_nouns.items())}},
                )
            )
        return results

    def __call__(self, images: Sequence[Image.Image]) -> list[Prediction]:
        """Vocabulary and label map for each image (label maps at the images' own sizes)."""
        preds = self.vocabulary(images)
        label_maps = self.segmenter.segment(images, [p.vocabulary for p in preds])
        for p, lm in zip(preds, label_maps, strict=True):
            p.label_map = lm
        return preds

"""Open-vocabulary segmenters: given images and a list of names per image, a label map per image.

The vocabulary is always an argument. Backends (``SEGMENTERS``, chosen by ``SegmenterConfig.name`` or
``--segmenter-backend``):

- ``clipseg``: CLIPSeg, per-name logits on a 22 x 22 grid (the light default).
- ``sam3``: SAM 3 promptable concept segmentation; ``semantic`` (per-name logits, 288 x 288) or ``instances``.
- ``grounded_sam``: Grounding DINO boxes for the names, SAM masks for the boxes (instances).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from autoseg.models.segmenters.base import (
    PerNameSegmenter,
    Segmenter,
    labels_from_logits,
    merge_instances,
)
from autoseg.models.segmenters.clipseg import DEFAULT_CLIPSEG, DEFAULT_TEMPLATES, CLIPSegSegmenter
from autoseg.models.segmenters.grounded_sam import DEFAULT_GROUNDING_DINO, DEFAULT_SAM, GroundedSamSegmenter
from autoseg.models.segmenters.sam3 import DEFAULT_SAM3, Sam3Segmenter

__all__ = [
    "DEFAULT_SAM",
    "DEFAULT_SOURCES",
    "DEFAULT_TEMPLATES",
    "MODEL_TYPES",
    "MODES",
    "SEGMENTERS",
    "CLIPSegSegmenter",
    "GroundedSamSegmenter",
    "PerNameSegmenter",
    "Sam3Segmenter",
    "Segmenter",
    "SegmenterConfig",
    "build_segmenter",
    "labels_from_logits",
    "merge_instances",
    "segmenter_mode",
    "segmenter_source",
]

# Per backend: its default model (the one place each Hugging Face id is named), the ways it makes a label map (the
# first is its default) and the ``model_type`` values of the ``config.json`` it loads.
DEFAULT_SOURCES = {"clipseg": DEFAULT_CLIPSEG, "sam3": DEFAULT_SAM3, "grounded_sam": DEFAULT_GROUNDING_DINO}
MODES = {"clipseg": ("semantic",), "sam3": ("semantic", "instances"), "grounded_sam": ("instances",)}
MODEL_TYPES = {
    "clipseg": ("clipseg",),
    "sam3": ("sam3", "sam3_lite_text", "sam3_video"),
    "grounded_sam": ("grounding-dino", "mm-grounding-dino"),
}


@dataclass
class SegmenterConfig:
    """Settings of the open-vocabulary segmenter.

    Attributes:
        name: backend, a key of ``SEGMENTERS`` (clipseg, sam3, grounded_sam).
        source: Hugging Face id or local directory of the weights; null: the backend's default (``DEFAULT_SOURCES``).
            grounded_sam: a Grounding DINO id/directory, or a folder with ``detector/`` and ``sam/``.
        mode: "semantic" (per-name logits, argmax) or "instances" (scored masks, merged); null: the backend's
            default (the first of ``MODES[name]``).
        templates: clipseg: prompt templates (``{}`` = the name); embeddings are averaged over them.
        threshold: semantic: a pixel whose best name scores below this probability is unlabelled (0). 0 gives every
            pixel a name, as the original AutoSeg does.
        score_threshold: sam3 instances: keep instances with ``sigmoid(pred_logits) * sigmoid(presence_logits)``
            above this.
        box_threshold: grounded_sam: keep boxes whose name's best token probability (the box's score) is above this.
        text_threshold: grounded_sam: ... and whose name's mean token probability is above this (a box's name: the
            one with the highest mean).
        sam_source: grounded_sam: the SAM model (null: ``source``/sam of a combined folder, else ``DEFAULT_SAM``).
        max_instances: instances: at most this many best-scoring instances per image.
        image_size: clipseg: square input side (CLIPSeg's decoder needs a square patch grid). SAM 3, Grounding DINO
            and SAM use their processors' sizes.
        class_chunk: names (or masks) upsampled to full image size at a time (bounds memory on large images).
        pair_chunk: (image, name) pairs decoded per call (Grounded SAM: prompts per Grounding DINO call and boxes per
            SAM call); bounds memory.
    """

    name: str = "clipseg"
    source: str | None = None
    mode: str | None = None
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    threshold: float = 0.0
    score_threshold: float = 0.5
    box_threshold: float = 0.35
    text_threshold: float = 0.25
    sam_source: str | None = None
    max_instances: int = 100
    image_size: int = 352
    class_chunk: int = 8
    pair_chunk: int = 8


def segmenter_source(config: SegmenterConfig) -> str:
    """The model source of ``config``: its ``source`` or the backend's default id."""
    return config.source if config.source is not None else DEFAULT_SOURCES[config.name]


def segmenter_mode(config: SegmenterConfig) -> str:
    """The mode of ``config``: its ``mode`` or the backend's default."""
    return config.mode if config.mode is not None else MODES[config.name][0]


def _clipseg(config: SegmenterConfig, device: str | torch.device, dtype: torch.dtype) -> Segmenter:
    return CLIPSegSegmenter.from_pretrained(
        segmenter_source(config),
        device=device,
        dtype=dtype,
        templates=config.templates,
        threshold=config.threshold,
        image_size=config.image_size,
        class_chunk=config.class_chunk,
        pair_chunk=config.pair_chunk,
    )


def _sam3(config: SegmenterConfig, device: str | torch.device, dtype: torch.dtype) -> Segmenter:
    return Sam3Segmenter.from_pretrained(
        segmenter_source(config),
        device=device,
        dtype=dtype,
        mode=segmenter_mode(config),
        threshold=config.threshold,
        score_threshold=config.score_threshold,
        max_instances=config.max_instances,
        class_chunk=config.class_chunk,
        pair_chunk=config.pair_chunk,
    )


def _grounded_sam(config: SegmenterConfig, device: str | torch.device, dtype: torch.dtype) -> Segmenter:
    return GroundedSamSegmenter.from_pretrained(
        segmenter_source(config),
        sam_source=config.sam_source,
        device=device,
        dtype=dtype,
        box_threshold=config.box_threshold,
        text_threshold=config.text_threshold,
        max_instances=config.max_instances,
        class_chunk=config.class_chunk,
        pair_chunk=config.pair_chunk,
    )


SEGMENTERS: dict[str, Callable[[SegmenterConfig, str | torch.device, torch.dtype], Segmenter]] = {
    "clipseg": _clipseg,
    "sam3": _sam3,
    "grounded_sam": _grounded_sam,
}


def build_segmenter(config: SegmenterConfig, device: str | torch.device = "cpu", dtype=torch.float32) -> Segmenter:
    """Build the segmenter named by ``config.name``; an unknown name (or a mode it lacks) lists the options."""
    if config.name not in SEGMENTERS:
        raise ValueError(f"unknown segmenter {config.name!r}; available: {list(SEGMENTERS)}")
    if segmenter_mode(config) not in MODES[config.name]:
        modes = list(MODES[config.name])
        raise ValueError(f"segmenter {config.name!r} has no mode {config.mode!r}; available: {modes}")
    return SEGMENTERS[config.name](config, device, dtype)

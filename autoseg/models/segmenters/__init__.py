"""Open-vocabulary segmenters: given images and a list of names per image, a label map per image.

The vocabulary is always an argument. Every backend is one file that declares a :class:`Backend` (its default model,
modes, model types, own options, loaders, checks, scratch sizes, trainable or not); :data:`BACKENDS` lists them, and
inference, the config checks, training and the page read only that registry:

- ``clipseg``: CLIPSeg, per-name logits on a 22 x 22 grid (the light default).
- ``sam3``: SAM 3 promptable concept segmentation; ``semantic`` (per-name logits, 288 x 288) or ``instances``.
- ``grounded_sam``: Grounding DINO boxes for the names, SAM masks for the boxes (instances).

Adding a backend: write ``segmenters/NAME.py`` with a :class:`Segmenter` subclass and ``BACKEND = Backend(...)``, and
add ``NAME.BACKEND`` to the registry below.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from autoseg.models.loading import build_scratch, check_no_scratch_options, is_scratch
from autoseg.models.segmenters import clipseg, grounded_sam, sam3
from autoseg.models.segmenters.base import PerNameSegmenter, Segmenter, labels_from_logits, merge_instances
from autoseg.models.segmenters.clipseg import DEFAULT_TEMPLATES, CLIPSegSegmenter
from autoseg.models.segmenters.grounded_sam import GroundedSamSegmenter
from autoseg.models.segmenters.sam3 import Sam3Segmenter
from autoseg.models.segmenters.spec import Backend, SegmenterConfig, backend_of, segmenter_mode, segmenter_source

BACKENDS: dict[str, Backend] = {b.name: b for b in (clipseg.BACKEND, sam3.BACKEND, grounded_sam.BACKEND)}

__all__ = [
    "BACKENDS",
    "DEFAULT_TEMPLATES",
    "Backend",
    "CLIPSegSegmenter",
    "GroundedSamSegmenter",
    "PerNameSegmenter",
    "Sam3Segmenter",
    "Segmenter",
    "SegmenterConfig",
    "backend_of",
    "build_segmenter",
    "labels_from_logits",
    "merge_instances",
    "segmenter_mode",
    "segmenter_source",
]


def build_segmenter(
    config: SegmenterConfig,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    words: Sequence[str] = (),
    scratch: Mapping[str, Any] | None = None,
    flag: str = "--segmenter",
) -> Segmenter:
    """The segmenter of ``config``, loaded from its source (or made at random for ``scratch:NAME``), on ``device``.

    Args:
        config: backend, source, mode and settings.
        words: ``scratch:`` sources: words the random model's tokenizer keeps whole (e.g. the class names).
        scratch: ``scratch:`` sources: arguments that override the registered size (e.g. ``{"hidden_size": 64}``).
        flag: how the user set the source, named in load errors (e.g. ``--model.init_args.segmenter``).

    Raises:
        ValueError: an unknown backend or mode (the message lists the options), or ``scratch`` with another source.
        autoseg.models.loading.ModelLoadError: the weights cannot be loaded (the message says how to provide them).
    """
    backend = backend_of(config)
    if segmenter_mode(config) not in backend.modes:
        raise ValueError(f"segmenter {config.name!r} has no mode {config.mode!r}; available: {list(backend.modes)}")
    source = segmenter_source(config)
    check_no_scratch_options(source, scratch, config.name)
    if is_scratch(source):
        parts = build_scratch(source, backend.scratch_sizes, config.name, backend.make, scratch, words=list(words))
    else:
        parts = backend.load(source, config, flag)
    return backend.assemble(parts, config).to(device=device, dtype=dtype)

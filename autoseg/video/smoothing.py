"""Temporal smoothing of the segmenter: the clip's names segmented on every frame, logits averaged over time.

For backends with per-name logits (:class:`autoseg.models.segmenters.base.PerNameSegmenter`: CLIPSeg, SAM 3's
semantic head) each frame's ``C x h x w`` logits (at the decoder's resolution) enter an exponential moving average

    ``s_t = alpha * s_{t-1} + (1 - alpha) * l_t``   (``s_0 = l_0``, and ``s_t = l_t`` after a scene cut)

and the label map is the thresholded argmax of ``s_t`` upsampled to the frame (the same as for images). The state is
one ``C x h x w`` tensor, so memory does not grow with the clip. ``alpha = 0`` is no smoothing. Other backends
(instance modes) segment each frame with the clip's names, unsmoothed.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from autoseg.models.segmenters.base import PerNameSegmenter, Segmenter, labels_from_logits
from autoseg.video import DEFAULT_SMOOTHING


def warmup_frames(alpha: float, tolerance: float = 0.01) -> int:
    """Frames after which a frame's weight in the moving average is below ``tolerance`` (what a resumed clip
    re-reads before its first missing frame so that it continues with nearly the same state)."""
    if alpha <= 0:
        return 0
    return math.ceil(math.log(tolerance) / math.log(alpha))


class LogitAverage:
    """The exponential moving average of per-name logits over frames (module docstring)."""

    def __init__(self, alpha: float) -> None:
        if not 0 <= alpha < 1:
            raise ValueError(f"smoothing must be in [0, 1), got {alpha}")
        self.alpha = alpha
        self.state: torch.Tensor | None = None

    def reset(self) -> None:
        self.state = None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """Add one frame's ``C x h x w`` logits; returns the smoothed ``C x h x w`` logits."""
        logits = logits.float()
        if self.state is None or self.alpha == 0:
            self.state = logits
        else:
            self.state = self.alpha * self.state + (1.0 - self.alpha) * logits
        return self.state


def _batches(frames: Iterable[tuple[int, Image.Image]], size: int) -> Iterator[list[tuple[int, Image.Image]]]:
    batch: list[tuple[int, Image.Image]] = []
    for item in frames:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@torch.inference_mode()
def segment_frames(
    segmenter: Segmenter,
    frames: Iterable[tuple[int, Image.Image]],
    names: Sequence[str],
    alpha: float = DEFAULT_SMOOTHING,
    threshold: float | None = None,
    batch_size: int = 4,
    resets: Collection[int] = (),
) -> Iterator[tuple[int, Image.Image, np.ndarray]]:
    """Segment a clip's frames with one vocabulary, smoothing the logits over time.

    Args:
        segmenter: the pipeline's segmenter.
        frames: ``(frame index, image)`` in order (streamed, ``batch_size`` at a time).
        names: the clip's vocabulary.
        alpha: weight of the past in the moving average (0: none).
        threshold: the unlabelled threshold (None: the segmenter's own).
        resets: frame indices where the average starts again (scene cuts).

    Yields:
        ``(frame index, image, label map)``; label map ``H x W`` int32, 0 = unlabelled, ``i`` = ``names[i - 1]``.
    """
    average = LogitAverage(alpha)
    smooth = isinstance(segmenter, PerNameSegmenter) and len(names) > 0
    threshold = getattr(segmenter, "threshold", 0.0) if threshold is None else threshold
    for batch in _batches(frames, batch_size):
        images = [im for _, im in batch]
        if not smooth:
            maps = segmenter.segment(images, [list(names)] * len(images), threshold=threshold)
            yield from ((i, im, m) for (i, im), m in zip(batch, maps, strict=True))
            continue
        logits = segmenter.logits(segmenter.preprocess(images), list(names))  # B x C x h x w
        for (index, image), frame_logits in zip(batch, logits, strict=True):
            if index in resets:
                average.reset()
            smoothed = average(frame_logits)
            size = (image.height, image.width)
            yield index, image, labels_from_logits(smoothed, size, threshold or 0.0, segmenter.class_chunk)

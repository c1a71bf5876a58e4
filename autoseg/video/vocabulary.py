"""One vocabulary per clip: the pipeline's vocabulary stage (BBoost + captions + nouns) on key frames, merged.

Key frames: the first frame, every ``every``-th kept frame after the last key frame, and every scene cut (a frame whose
8-bit grey 32 x 32 thumbnail differs from the previous frame's by more than ``scene_cut`` on average, as a fraction of
255). Only the key frames of one batch are held in memory.

Merging (:func:`merge_names`): each key frame gives names with an area (the share of the frame covered by the BBoost
clusters whose captions produced the name). A name is kept when it is found on at least ``min_key_frames`` key frames
(on every key frame when the clip has fewer), or covers at least ``min_area`` of some key frame; a name seen once on
a small area is a captioning accident, not a thing of the clip. Kept names are ordered by their summed area, largest
first, and cut to ``max_names``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from autoseg.outputs import Prediction

THUMB = 32


@dataclass(frozen=True)
class VocabularyOptions:
    """How a clip's vocabulary is found (see the module docstring)."""

    every: int = 10
    scene_cut: float = 0.3
    min_key_frames: int = 2
    min_area: float = 0.1
    max_names: int | None = None

    def __post_init__(self) -> None:
        if self.every < 1 or self.min_key_frames < 1 or not 0 <= self.min_area <= 1 or self.scene_cut <= 0:
            raise ValueError(
                f"clip vocabulary options: need every >= 1 ({self.every}), min_key_frames >= 1 "
                f"({self.min_key_frames}), 0 <= min_area <= 1 ({self.min_area}) and scene_cut > 0 ({self.scene_cut})"
            )


@dataclass
class ClipVocabulary:
    """The merged names and how they were found.

    Attributes:
        names: the clip's vocabulary.
        key_frames: frame indices of the key frames.
        scene_cuts: frame indices where a scene cut was detected (also key frames).
        found: per key frame, its names with their areas.
    """

    names: list[str]
    key_frames: list[int] = field(default_factory=list)
    scene_cuts: list[int] = field(default_factory=list)
    found: list[dict[str, float]] = field(default_factory=list)


def thumbnail(image: Image.Image) -> np.ndarray:
    """``32 x 32`` grey float thumbnail in [0, 1], for scene-cut detection."""
    return np.asarray(image.convert("L").resize((THUMB, THUMB), Image.BILINEAR), np.float32) / 255.0


def name_areas(pred: Prediction) -> dict[str, float]:
    """Each vocabulary name's area on its frame: the share of the caption grid covered by the clusters naming it."""
    if pred.cluster_map is None or pred.cluster_map.size == 0:
        return dict.fromkeys(pred.vocabulary, 0.0)
    share = np.bincount(pred.cluster_map.ravel().astype(np.int64)) / pred.cluster_map.size
    per_cluster = pred.extra.get("cluster_nouns", {})
    areas = dict.fromkeys(pred.vocabulary, 0.0)
    for k, nouns in per_cluster.items():
        for n in set(nouns) & set(areas):
            areas[n] += float(share[int(k)]) if int(k) < len(share) else 0.0
    return areas


def merge_names(found: Sequence[dict[str, float]], options: VocabularyOptions) -> list[str]:
    """The clip vocabulary from the names (with areas) of each key frame (rule in the module docstring)."""
    need = min(options.min_key_frames, len(found))
    count: dict[str, int] = {}
    total: dict[str, float] = {}
    biggest: dict[str, float] = {}
    for names in found:
        for n, a in names.items():
            count[n] = count.get(n, 0) + 1
            total[n] = total.get(n, 0.0) + a
            biggest[n] = max(biggest.get(n, 0.0), a)
    kept = [n for n in count if count[n] >= need or biggest[n] >= options.min_area]
    kept.sort(key=lambda n: (-total[n], n))
    return kept[: options.max_names]


def clip_vocabulary(
    pipeline, frames: Iterable[tuple[int, Image.Image]], options: VocabularyOptions, seed: int | None = None
) -> ClipVocabulary:
    """Find a clip's vocabulary on its key frames with ``pipeline.vocabulary`` (batches of ``pipeline.batch_size``).

    Args:
        pipeline: an :class:`autoseg.pipeline.AutoSegPipeline`.
        frames: ``(frame index, image)`` pairs in order (streamed; only key frames are kept, a batch at a time).
        seed: the vocabulary stage's seed (None: the pipeline's).
    """
    result = ClipVocabulary(names=[])
    batch: list[Image.Image] = []
    previous, since_key = None, 0

    def flush() -> None:
        for pred in pipeline.vocabulary(batch, seed=seed):
            result.found.append(name_areas(pred))
        batch.clear()

    for index, image in frames:
        thumb = thumbnail(image)
        cut = previous is not None and float(np.abs(thumb - previous).mean()) > options.scene_cut
        if previous is None or cut or since_key >= options.every:
            result.key_frames.append(index)
            if cut:
                result.scene_cuts.append(index)
            batch.append(image)
            since_key = 0
            if len(batch) >= pipeline.batch_size:
                flush()
        previous, since_key = thumb, since_key + 1
    if batch:
        flush()
    result.names = merge_names(result.found, options)
    return result

"""The one auto-vocabulary inference path shared by ``infer.py``, ``eval.py``, the page and the LightningModules.

image -> BLIP patch tokens at several scales -> (optional enhancer) -> BBoost cluster map -> captions per cluster
-> nouns = vocabulary -> open-vocabulary segmenter on that vocabulary -> label map.

Every stage takes the whole batch and batches inside (one encoder call per scale, batched k-means, one padded encoder
call for all local re-runs, one ``generate`` for all clusters and passes, one spaCy pass); an image's output does not
depend on the other images of its batch. Build a pipeline with :func:`autoseg.load` (the one builder, in
:mod:`autoseg.api`); per-call settings (seed, clustering, captioning, threshold) are arguments, never edits of its
attributes.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Collection, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from autoseg.models.blip import BlipCaptioner, CaptionConfig
from autoseg.models.segmenters import Segmenter
from autoseg.outputs import Prediction
from autoseg.utils.images import ImageInput, as_images
from autoseg.video import DEFAULT_MOTION, DEFAULT_SMOOTHING
from autoseg.video.smoothing import segment_frames
from autoseg.vocab.bboost import BBoost, BBoostConfig, resize_labels
from autoseg.vocab.nouns import NounExtractor

if TYPE_CHECKING:
    from autoseg.config import PipelineConfig

STAGES = ("encode", "bboost", "cluster_states", "caption", "nouns", "segment")


class AutoSegPipeline:
    """Auto-vocabulary semantic segmentation: ``pipeline(images)`` names the things in each image and segments them.

    Build one with :func:`autoseg.load` (a preset, a YAML, a saved folder or a Hub repo); the constructor takes ready
    parts.

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
        batch_size: images processed together by :meth:`__call__`.
        config: the settings it was built from (what :meth:`save_pretrained` writes; None: assembled by hand).

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
        batch_size: int = 4,
        config: PipelineConfig | None = None,
    ):
        if not scales:
            raise ValueError("need at least one scale")
        caption_scale = scales[0] if caption_scale is None else caption_scale
        if caption_scale not in scales:
            raise ValueError(f"caption_scale {caption_scale} must be one of the scales {list(scales)}")
        if max_names is not None and max_names < 1:
            raise ValueError(f"max_names must be >= 1 or None, got {max_names}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
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
        self.batch_size = batch_size
        self.config = config
        self.last_stage_seconds: dict[str, float] = {}
        self.stage_seconds: dict[str, float] = dict.fromkeys(STAGES, 0.0)

    # ------------------------------------------------------------------ the public API
    def __call__(
        self,
        images: ImageInput | Sequence[ImageInput],
        *,
        vocabulary: Sequence[str] | Sequence[Sequence[str]] | None = None,
        seed: int | None = None,
        threshold: float | None = None,
        progress: bool | None = None,
    ) -> Prediction | list[Prediction]:
        """Vocabulary and label map of each image, at the image's own size.

        Args:
            images: one image or a list: PIL images, file paths, or ``H x W x 3`` / ``H x W`` uint8 arrays.
            vocabulary: skip the vocabulary stage and segment with these names (one list for every image, or one
                list per image): open-vocabulary segmentation.
            seed: this call's seed instead of the pipeline's.
            threshold: this call's segmenter threshold (semantic modes) instead of the configured one.
            progress: show a progress bar (None: when there is more than one batch).

        Returns:
            a :class:`Prediction` for one image, else a list in input order.
        """
        batch, single = as_images(images)
        vocabularies = _per_image(vocabulary, len(batch))
        steps = range(0, len(batch), self.batch_size)
        show = len(steps) > 1 if progress is None else progress
        preds: list[Prediction] = []
        for start in tqdm(steps, desc="segmenting", unit="batch", disable=not show):
            part = batch[start : start + self.batch_size]
            if vocabularies is None:
                preds += self.predict(part, seed=seed, threshold=threshold)
            else:
                preds += self.segment(part, vocabularies[start : start + self.batch_size], threshold=threshold)
        return preds[0] if single else preds

    def predict(
        self,
        images: Sequence[Image.Image],
        seed: int | None = None,
        bboost: BBoostConfig | None = None,
        caption: CaptionConfig | None = None,
        threshold: float | None = None,
    ) -> list[Prediction]:
        """One batch of RGB images through every stage (what the run loop calls).

        Args:
            seed, bboost, caption, threshold: this call's settings instead of the pipeline's (None: its own).
        """
        preds = self.vocabulary(images, seed=seed, bboost=bboost, caption=caption)
        with self.timed("segment"):
            label_maps = self.segmenter.segment(images, [p.vocabulary for p in preds], threshold=threshold)
        for p, lm in zip(preds, label_maps, strict=True):
            p.label_map = lm
        return preds

    def segment(
        self,
        images: Sequence[Image.Image],
        vocabularies: Sequence[Sequence[str]],
        threshold: float | None = None,
    ) -> list[Prediction]:
        """The segmenter alone on given names (no clustering, no captions): one :class:`Prediction` per image."""
        with self.timed("segment"):
            return segment_with(self.segmenter, images, vocabularies, threshold)

    def segment_frames(
        self,
        frames: Iterable[tuple[int, Image.Image]],
        vocabulary: Sequence[str],
        smoothing: float = DEFAULT_SMOOTHING,
        threshold: float | None = None,
        resets: Collection[int] = (),
        motion: float = DEFAULT_MOTION,
    ) -> Iterator[tuple[int, Image.Image, np.ndarray]]:
        """The clip-level step: a clip's frames segmented with one vocabulary, the segmenter's logits averaged over
        time (see :mod:`autoseg.video.smoothing`); streams ``(frame index, image, label map)``.

        Args:
            frames: ``(frame index, image)`` pairs in order.
            smoothing: weight of the past in the moving average (0: every frame on its own).
            resets: frame indices where the average starts again (scene cuts).
            motion: colour change (0-255) above which a pixel is not averaged (inf: every pixel is).
        """
        return segment_frames(self.segmenter, frames, vocabulary, smoothing, threshold, self.batch_size, resets, motion)

    def clip_tracker(self, chunk: int = 16):
        """SAM 3's video model for clips (a :class:`autoseg.models.segmenters.sam3_video.Sam3ClipTracker`) when the
        segmenter is SAM 3 and its source holds the video model (``model_type: sam3_video``, as ``facebook/sam3``);
        None otherwise (clips are then segmented frame by frame). Loaded here, once per run: it shares this
        pipeline's SAM 3 detector, so only the tracker's weights are added.

        Args:
            chunk: frames preprocessed and tracked together.
        """
        if self.config is None or self.config.segmenter.name != "sam3":
            return None
        from autoseg.models.segmenters import segmenter_source
        from autoseg.models.segmenters.sam3_video import Sam3ClipTracker, holds_video_model, load_video_model

        source = segmenter_source(self.config.segmenter)
        if not holds_video_model(source):
            return None
        model, processor = load_video_model(source, detector=getattr(self.segmenter, "model", None))
        return Sam3ClipTracker(model, processor, chunk)

    @property
    def takes_threshold(self) -> bool:
        """Whether the segmenter's mode has an unlabelled threshold (the ``threshold`` argument)."""
        from autoseg.models.segmenters import BACKENDS, segmenter_mode

        if self.config is None:
            return getattr(self.segmenter, "threshold", None) is not None
        backend = BACKENDS[self.config.segmenter.name]
        return segmenter_mode(self.config.segmenter) in backend.threshold_modes

    def save_pretrained(self, folder: str | Path, overwrite: bool = False) -> Path:
        """Write one self-contained folder (``pipeline.yaml`` + every model) that :func:`autoseg.load` reads back
        (see :func:`autoseg.api.save_pipeline`)."""
        from autoseg.api import save_pipeline

        return save_pipeline(self, folder, overwrite)

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> str:
        """Upload the saved folder to a Hugging Face model repo (see :func:`autoseg.api.push_pipeline`)."""
        from autoseg.api import push_pipeline

        return push_pipeline(self, repo_id, **kwargs)

    # ------------------------------------------------------------------ the stages
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
    def vocabulary(
        self,
        images: Sequence[Image.Image],
        seed: int | None = None,
        bboost: BBoostConfig | None = None,
        caption: CaptionConfig | None = None,
    ) -> list[Prediction]:
        """Cluster, caption and extract nouns; predictions without label maps (``label_map`` is empty).

        Args:
            images: RGB images.
            seed, bboost, caption: this call's settings instead of the pipeline's (None: its own).
        """
        seed = self.seed if seed is None else seed
        grouping = self.bboost if bboost is None else BBoost(bboost)
        caption = self.caption_config if caption is None else caption
        self.last_stage_seconds = {}
        with self.timed("encode"):
            tokens = self.captioner.encode(images, self.scales)
            patches = [t.patches for t in tokens]  # per scale B x N x D
            if self.enhancer is not None:
                patches = [self.enhancer(p, t.grid) for p, t in zip(patches, tokens, strict=True)]
        cap_tokens = tokens[self.caption_index]
        with self.timed("bboost"):
            cluster_maps = grouping.batch(patches, [t.grid for t in tokens], seed=seed)  # per image H x W
            cap_maps = [caption_clusters(m, cap_tokens.grid) for m in cluster_maps]
        with self.timed("cluster_states"):
            # captions read BLIP's own tokens: the enhancer only regroups patches, the captioner never saw its output
            states = self.captioner.batch_cluster_states(cap_tokens, cap_maps, caption.mode)
        with self.timed("caption"):
            flat = self.captioner.caption(
                [s for per_image in states for s in per_image],
                caption,
                seed=seed,
                keys=[k for per_image in states for k in range(len(per_image))],  # a cluster's key: its index
            )
            captions = regroup(flat, [len(per_image) for per_image in states])  # per image, per cluster
        with self.timed("nouns"):
            orders = [cluster_order(m, len(c)) for m, c in zip(cap_maps, captions, strict=True)]  # big clusters first
            flat = self.nouns.nouns_per_group(
                [caps[k] for order, caps in zip(orders, captions, strict=True) for k in order]
            )
            nouns = regroup(flat, [len(order) for order in orders])  # per image, per cluster in that order
        parts = zip(images, cap_maps, captions, orders, nouns, strict=True)
        return [self.prediction(image, cap_map, caps, order, found) for image, cap_map, caps, order, found in parts]

    def prediction(
        self,
        image: Image.Image,
        cap_map: torch.Tensor,
        captions: list[list[str]],
        order: list[int],
        nouns: list[list[list[str]]],
    ) -> Prediction:
        """One image's prediction without its label map.

        Args:
            image: the image.
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
            image=image,
        )


def segment_with(
    segmenter: Segmenter,
    images: Sequence[Image.Image],
    vocabularies: Sequence[Sequence[str]],
    threshold: float | None = None,
) -> list[Prediction]:
    """The segment stage on given names: one :class:`Prediction` per image (shared by the pipeline and
    :class:`autoseg.lit.SegmenterModule`'s ``predict_step``)."""
    label_maps = segmenter.segment(images, vocabularies, threshold=threshold)
    return [
        Prediction(vocabulary=list(v), label_map=lm, image=im)
        for im, v, lm in zip(images, vocabularies, label_maps, strict=True)
    ]


def _per_image(vocabulary: Sequence[str] | Sequence[Sequence[str]] | None, n: int) -> list[list[str]] | None:
    """``vocabulary`` as one list of names per image (a flat list of names is every image's)."""
    if vocabulary is None:
        return None
    if isinstance(vocabulary, str):
        raise ValueError(f"vocabulary must be a list of names, got the string {vocabulary!r}")
    if all(isinstance(v, str) for v in vocabulary):
        return [list(vocabulary) for _ in range(n)]
    if len(vocabulary) != n or not all(isinstance(v, Sequence) and not isinstance(v, str) for v in vocabulary):
        raise ValueError(
            f"vocabulary: expected a list of names, or one list of names per image ({n}), got {vocabulary}"
        )
    return [list(v) for v in vocabulary]


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

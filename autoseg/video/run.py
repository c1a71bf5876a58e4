"""The clip run loop: a video or a folder of frames -> one clip vocabulary -> smoothed label maps on every frame
-> the clip's outputs (:mod:`autoseg.video.outputs`).

Three streaming passes over the frames, none holding more than a batch: key frames for the vocabulary
(:func:`autoseg.video.vocabulary.clip_vocabulary`), every frame segmented with the clip's names and written at once
(:func:`autoseg.video.smoothing.segment_frames`), then the overlay video and the per-frame pixel shares read back from
the written label maps.

Resuming (``skip_existing``): a clip whose ``NAME.json`` exists is skipped; a killed clip keeps its vocabulary (from
``NAME.partial.json``, when the settings match) and its written label maps, and is segmented again from its first
missing frame. The moving average restarts there, warmed up on the ``warmup_frames(alpha)`` frames before it (their
label maps are not rewritten), so a resumed clip continues with an average that differs from an uninterrupted run's
by less than 1 % of a frame's weight.

SAM 3 with its video model (a ``segmenter.source`` of ``model_type: sam3_video``, as ``facebook/sam3``; see
:meth:`autoseg.pipeline.AutoSegPipeline.clip_tracker`): the second pass tracks the clip's names instead
(:mod:`autoseg.video.tracking`: objects keep ids, tracks go into ``NAME.json``); the moving average does not apply
(``smoothing`` is recorded as null) and a killed clip restarts tracking at its first unfinished chunk. ``track=False``
segments such clips frame by frame as any other backend.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from autoseg.models.segmenters.sam3_video import DEFAULT_CHUNK, Sam3ClipTracker
from autoseg.utils.video import ClipSource, VideoReadError
from autoseg.video import DEFAULT_MOTION, DEFAULT_SMOOTHING
from autoseg.video.outputs import ClipOutputs, pixel_fraction
from autoseg.video.smoothing import warmup_frames
from autoseg.video.tracking import track_clip
from autoseg.video.vocabulary import VocabularyOptions, clip_vocabulary

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClipOptions:
    """Settings of a clip run.

    Attributes:
        stride: segment every ``stride``-th frame.
        max_frames: segment at most this many frames (None: all).
        smoothing: weight of the past in the moving average of the logits (0: none).
        motion: colour change (0-255) above which a pixel is not averaged (inf: every pixel is).
        vocabulary: how the clip's names are found on key frames.
        overlay: write ``NAME_overlay.mp4``.
        seed: the vocabulary stage's seed (None: the pipeline's).
        threshold: the segmenter's unlabelled threshold (None: its own).
        track: use SAM 3's video model when the pipeline has one (False: frame by frame, smoothed).
        chunk: SAM 3 video: frames preprocessed and tracked per chunk (memory per chunk; resume granularity).
    """

    stride: int = 1
    max_frames: int | None = None
    smoothing: float = DEFAULT_SMOOTHING
    motion: float = DEFAULT_MOTION
    vocabulary: VocabularyOptions = field(default_factory=VocabularyOptions)
    overlay: bool = True
    seed: int | None = None
    threshold: float | None = None
    track: bool = True
    chunk: int = DEFAULT_CHUNK

    def __post_init__(self) -> None:
        if self.stride < 1 or (self.max_frames is not None and self.max_frames < 1):
            raise ValueError(f"--stride ({self.stride}) and --max-frames ({self.max_frames}) must be positive")
        if self.chunk < 1:
            raise ValueError(f"--chunk must be at least 1, got {self.chunk}")
        if not 0 <= self.smoothing < 1:
            raise ValueError(f"--smoothing must be in [0, 1), got {self.smoothing}")
        if not self.motion > 0:
            raise ValueError(f"--motion-threshold must be positive (inf: none), got {self.motion}")


def _resumed(
    frames: Iterable[tuple[int, Image.Image]], outputs: ClipOutputs, warm: int, seen: list[int]
) -> Iterator[tuple[int, Image.Image]]:
    """The frames to segment: those without a label map, each run of them preceded by up to ``warm`` written frames
    (to warm the moving average up); every frame index is appended to ``seen``."""
    buffer: deque[tuple[int, Image.Image]] = deque(maxlen=warm)
    for index, image in frames:
        seen.append(index)
        if outputs.label_map_path(index).is_file():
            buffer.append((index, image))
            continue
        yield from buffer
        buffer.clear()
        yield index, image


def segment_clip(
    pipeline,
    source: ClipSource,
    out_dir: str | Path,
    options: ClipOptions,
    skip_existing: bool = False,
    tracker: Sam3ClipTracker | None = None,
) -> dict[str, Any]:
    """Segment one clip into ``out_dir`` (module docstring).

    Args:
        tracker: SAM 3's video model (:meth:`autoseg.pipeline.AutoSegPipeline.clip_tracker`); None: frame by frame.

    Returns:
        a status entry as for images: ``{"input", "output", "status": "ok" | "error", "frames" | "skipped" |
        "reason"}``.
    """
    outputs = ClipOutputs(out_dir, source.name)
    entry: dict[str, Any] = {"input": str(source.path), "output": str(source.name), "status": "ok"}
    if skip_existing and outputs.done():
        return {**entry, "skipped": True}
    settings = {
        "stride": options.stride,
        "max_frames": options.max_frames,
        "smoothing": None if tracker is not None else options.smoothing,
        "motion": None if tracker is not None else options.motion,
        "seed": options.seed,
        "threshold": options.threshold,
        "vocabulary": asdict(options.vocabulary),
    }
    if tracker is not None:
        settings["tracker"] = {"model": "sam3_video", "chunk": tracker.chunk}
    try:
        state = outputs.read_partial() if skip_existing else None
        if state is None or state.get("settings") != settings:
            found = clip_vocabulary(
                pipeline, source.frames(options.stride, options.max_frames), options.vocabulary, options.seed
            )
            state = {
                "vocabulary": found.names,
                "key_frames": found.key_frames,
                "scene_cuts": found.scene_cuts,
                "key_frame_names": found.found,
                "settings": settings,
            }
            outputs.start(state)  # a new vocabulary: older label maps of this clip are removed
        names = state["vocabulary"]
        seen: list[int] = []
        tracks = None
        if tracker is not None:
            tracks = track_clip(tracker, source.frames(options.stride, options.max_frames), outputs, state, seen)
        else:
            frames = _resumed(
                source.frames(options.stride, options.max_frames), outputs, warmup_frames(options.smoothing), seen
            )
            for index, _, label_map in pipeline.segment_frames(
                frames,
                names,
                smoothing=options.smoothing,
                threshold=options.threshold,
                resets=state["scene_cuts"],
                motion=options.motion,
            ):
                if not outputs.label_map_path(index).is_file():
                    outputs.write_frame(index, label_map, len(names))
        fps = (source.fps or 10.0) / options.stride
        fractions = {}
        for index in seen:
            label_map = outputs.read_frame(index)
            if label_map is None:
                raise FileNotFoundError(f"{outputs.label_map_path(index)}: label map missing after segmenting")
            fractions[str(index)] = pixel_fraction(label_map, names)
        if options.overlay:
            outputs.write_overlay(source.frames(options.stride, options.max_frames), names, fps)
    except VideoReadError as e:
        return {**entry, "status": "error", "reason": str(e)}
    record = {
        "input": str(source.path),
        "vocabulary": names,
        "fps": fps,
        "frames": seen,
        "pixel_fraction": fractions,
        "key_frames": state["key_frames"],
        "scene_cuts": state["scene_cuts"],
        "key_frame_names": state["key_frame_names"],
        "settings": settings,
        "files": {
            "label_maps": f"{outputs.folder.name}/",
            "overlay": outputs.overlay.name if options.overlay else None,
        },
    }
    if tracks is not None:
        record["tracks"] = tracks
    outputs.finish(record)
    return {**entry, "frames": len(seen)}


def clip_tracker(pipeline, options: ClipOptions, sources: list) -> Sam3ClipTracker | None:
    """SAM 3's video tracker for these clips when the pipeline's source holds the video model and
    ``options.track`` (None: clips are segmented frame by frame)."""
    tracker = pipeline.clip_tracker(options.chunk) if options.track and sources else None
    if tracker is not None:
        log.info("clips: SAM 3 video model, tracked in chunks of %d frames (--smoothing does not apply)", options.chunk)
    return tracker

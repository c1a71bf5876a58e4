"""SAM 3's video model on a clip: the clip's names as text prompts, detection on every frame (objects that appear
mid-clip are picked up), the tracker's memory carrying each object from frame to frame; streamed in chunks with
bounded memory.

transformers' ``Sam3VideoModel`` keeps every frame's pixels and every object's outputs for every frame in its inference
session, and copies the per-frame bookkeeping on every frame, so memory (and time per frame) grows with frames x
objects. :class:`Sam3ClipTracker` preprocesses ``chunk`` frames at a time and feeds them one by one into a
:class:`BoundedSession` that, after each frame, keeps only

- the pixels of the frame being tracked (a vision-features cache of one frame; state on ``state_device``, CPU),
- per object, the tracker outputs of the last ``max(num_maskmem, max_object_pointers_in_encoder)`` frames (what
  memory attention and the object pointers read) and its ``max_cond_frame_num`` latest conditioning frames,
- the per-frame bookkeeping of the frames the hot-start heuristics still look at (``hotstart_delay``).

Outputs are held back ``hotstart_delay`` frames, as ``propagate_in_video_iterator`` does, so that objects the
hot-start heuristics remove (unmatched or duplicated just after they appear) are never shown; then each frame is
post-processed, yielded and dropped. The result equals transformers' pre-loaded-video run as long as no object
gathers more than ``max_cond_frame_num`` conditioning frames (here older ones are dropped with their object pointers)
and the clip has at least ``max_object_pointers_in_encoder`` frames (the object pointers' temporal code is normalised
by ``min(clip length, that)`` there, by ``horizon`` here).

The label map is semantic, as for images: each object's pixels get its name's index (overlaps: the higher detection
score wins); each object keeps its track id (``obj_id``) from the frame it is detected on.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from transformers import AutoConfig, Sam3Model, Sam3VideoModel, Sam3VideoProcessor
from transformers.models.sam3_video.modeling_sam3_video import Sam3VideoInferenceSession

from autoseg.models.loading import is_scratch, load_pretrained
from autoseg.utils.video import frame_chunks

log = logging.getLogger(__name__)

VIDEO_MODEL_TYPE = "sam3_video"
DEFAULT_CHUNK = 16


class BoundedSession(Sam3VideoInferenceSession):
    """An inference session that forgets what the tracker no longer reads (module docstring).

    Args:
        horizon: the clip length the model is told (``num_frames``): it normalises the object pointers' temporal code
            by ``min(horizon, max_object_pointers_in_encoder)``; a streamed clip's length is not known in advance.
        kwargs: ``Sam3VideoInferenceSession``'s.
    """

    def __init__(self, horizon: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.horizon = horizon

    @property
    def num_frames(self) -> int:
        return self.horizon

    def prune(self, frame: int, window: int, max_cond: int, hotstart: int) -> None:
        """Drop the state of frames before ``frame`` that the next frames do not read.

        Args:
            frame: the frame just tracked (tracker index).
            window: non-conditioning outputs of the last ``window`` frames are kept (memories, object pointers).
            max_cond: per object, the latest ``max_cond`` conditioning frames are kept.
            hotstart: hot-start lists keep the frames after ``frame - hotstart``.
        """
        for old in [t for t in self.processed_frames if t <= frame]:
            del self.processed_frames[old]
        for obj_idx, outputs in self.output_dict_per_obj.items():
            _drop(outputs["non_cond_frame_outputs"], lambda t: t <= frame - window)
            cond = outputs["cond_frame_outputs"]
            _drop(cond, lambda t, oldest=sorted(cond)[:-max_cond]: t in oldest)  # noqa: B008 (bound once per object)
            for per_frame in (self.frames_tracked_per_obj, self.mask_inputs_per_obj, self.point_inputs_per_obj):
                _drop(per_frame.get(obj_idx, {}), lambda t: t < frame)
        for per_frame in (self.obj_id_to_tracker_score_frame_wise, self.suppressed_obj_ids):
            _drop(per_frame, lambda t: t < frame)
        for lists in (self.unmatched_frame_inds, self.overlap_pair_to_frame_inds):
            for key in list(lists):
                lists[key] = [t for t in lists[key] if t > frame - hotstart]
                if not lists[key]:
                    del lists[key]

    def frames_held(self) -> int:
        """Frames whose pixels or tracker outputs the session holds."""
        held = set(self.processed_frames or {})
        for outputs in self.output_dict_per_obj.values():
            held.update(outputs["non_cond_frame_outputs"], outputs["cond_frame_outputs"])
        return len(held)

    def state_bytes(self) -> int:
        """Bytes of the tensors the session holds (frames, outputs, inputs, cached features)."""
        seen: set[int] = set()

        def size(obj) -> int:
            if isinstance(obj, torch.Tensor):
                key = obj.untyped_storage().data_ptr()
                if key in seen:
                    return 0
                seen.add(key)
                return obj.untyped_storage().nbytes()
            if isinstance(obj, dict):
                return sum(size(v) for v in obj.values())
            if isinstance(obj, list | tuple):
                return sum(size(v) for v in obj)
            return 0

        parts = (self.processed_frames or {}, self.output_dict_per_obj, self.mask_inputs_per_obj)
        return sum(size(p) for p in parts) + size(self.cache._vision_features)


def _drop(mapping: dict, old) -> None:
    for key in [k for k in mapping if old(k)]:
        del mapping[key]


@dataclass
class TrackedFrame:
    """One frame's result.

    Attributes:
        index: the frame's index in the clip.
        image: the frame.
        label_map: ``H x W`` int32; 0 = unlabelled, ``i`` = ``names[i - 1]``.
        objects: track id -> (name index from 1, detection score) of the objects shown on this frame.
    """

    index: int
    image: Image.Image
    label_map: np.ndarray
    objects: dict[int, tuple[int, float]] = field(default_factory=dict)


class Sam3ClipTracker:
    """Clips through SAM 3's video model in chunks (module docstring).

    Args:
        model: a ``Sam3VideoModel`` (detector + tracker).
        processor: its ``Sam3VideoProcessor``.
        chunk: frames preprocessed together (the unit a resumed clip restarts from).
        state_device: where the session keeps frames and tracker outputs (CPU keeps accelerator memory flat).
        horizon: the clip length the model is told (see :class:`BoundedSession`).
    """

    def __init__(
        self,
        model: Sam3VideoModel,
        processor: Sam3VideoProcessor,
        chunk: int = DEFAULT_CHUNK,
        state_device: str | torch.device = "cpu",
        horizon: int = 1_000_000,
    ) -> None:
        if chunk < 1:
            raise ValueError(f"--chunk must be at least 1, got {chunk}")
        self.model = model.eval()
        self.processor = processor
        self.chunk = chunk
        self.state_device = state_device
        self.horizon = horizon
        tracker = model.config.tracker_config
        self.window = max(tracker.num_maskmem, tracker.max_object_pointers_in_encoder)
        self.max_cond = max(tracker.max_cond_frame_num, 1)
        self.peak_state_bytes = 0  # of the last clip: bytes of the session's tensors, at most
        self.peak_frames_held = 0  # of the last clip: frames whose pixels or outputs the session held, at most

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def session(self) -> BoundedSession:
        return BoundedSession(
            self.horizon,
            inference_device=self.device,
            inference_state_device=self.state_device,
            video_storage_device=self.state_device,
            dtype=next(self.model.parameters()).dtype,
            max_vision_features_cache_size=1,
        )

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        """``T x 3 x S x S`` pixels by the video processor, as ``init_video_session`` prepares a whole video (frames of
        differing sizes one at a time)."""
        videos = [images] if len({im.size for im in images}) == 1 else [[im] for im in images]
        pixels = self.processor.video_processor(videos=videos, return_tensors="pt")["pixel_values_videos"]
        return torch.cat(list(pixels))

    @torch.inference_mode()
    def track(self, frames: Iterable[tuple[int, Image.Image]], names: Sequence[str]) -> Iterator[TrackedFrame]:
        """Track the clip's ``names`` through ``frames`` (``(frame index, image)`` in order, streamed).

        Yields:
            a :class:`TrackedFrame` per frame, in order, ``hotstart_delay`` frames after it was tracked.
        """
        if len(set(names)) != len(names):
            raise ValueError(f"SAM 3 video: the clip's names must be distinct, got {list(names)}")
        session = self.session()
        self.peak_state_bytes = self.peak_frames_held = 0
        if names:
            self.processor.add_text_prompt(session, list(names))
        delay = self.model.hotstart_delay
        held: list[tuple[TrackedFrame, object]] = []
        step = 0
        for chunk in frame_chunks(frames, self.chunk):
            pixels = self.preprocess([im for _, im in chunk])
            for (index, image), frame_pixels in zip(chunk, pixels, strict=True):
                if not names:
                    yield TrackedFrame(index, image, np.zeros((image.height, image.width), np.int32))
                    continue
                session.add_new_frame(frame_pixels, step)
                out = self.model(inference_session=session, frame_idx=step)
                session.hotstart_removed_obj_ids.update(out.removed_obj_ids)
                self.peak_state_bytes = max(self.peak_state_bytes, session.state_bytes())
                self.peak_frames_held = max(self.peak_frames_held, session.frames_held())
                session.prune(step, self.window, self.max_cond, delay)
                held.append((TrackedFrame(index, image, np.zeros(0, np.int32)), out))
                step += 1
                if len(held) > max(delay - 1, 0):
                    yield self._finish(session, *held.pop(0))
        while held:
            yield self._finish(session, *held.pop(0))

    def _finish(self, session: BoundedSession, frame: TrackedFrame, out) -> TrackedFrame:
        """The frame's label map and objects from the model's output (post-processed as transformers does)."""
        size = [[frame.image.height, frame.image.width]]
        result = self.processor.postprocess_outputs(session, out, original_sizes=size)
        frame.label_map, frame.objects = paint_objects(result, session.obj_id_to_prompt_id)
        return frame


def paint_objects(result: dict, prompt_of: dict[int, int]) -> tuple[np.ndarray, dict[int, tuple[int, float]]]:
    """A semantic label map from ``Sam3VideoProcessor.postprocess_outputs``: each object's pixels get its prompt's
    index + 1 (overlaps: the higher score is painted last and wins).

    Args:
        result: ``object_ids`` (N), ``scores`` (N), ``masks`` (``N x H x W`` bool).
        prompt_of: object id -> prompt id (the name's index in the clip's vocabulary).

    Returns:
        the ``H x W`` int32 label map and, per object id, (name index from 1, score).
    """
    masks = result["masks"].cpu().numpy()  # N x H x W bool
    scores = result["scores"].float().tolist()
    ids = result["object_ids"].tolist()
    label_map = np.zeros(masks.shape[1:], np.int32)
    objects = {}
    for k in sorted(range(len(ids)), key=lambda k: scores[k]):
        name = prompt_of[ids[k]] + 1
        label_map[masks[k]] = name
        objects[ids[k]] = (name, scores[k])
    return label_map, objects


def holds_video_model(source: str, flag: str = "--segmenter") -> bool:
    """Whether the SAM 3 source (hub id or folder) is a video model (``model_type: sam3_video``, as
    ``facebook/sam3``); a ``scratch:`` source never is."""
    if is_scratch(source):
        return False
    config = load_pretrained(source, "SAM 3 config", AutoConfig.from_pretrained, flag)
    return config.model_type == VIDEO_MODEL_TYPE


def load_video_model(
    source: str, detector: torch.nn.Module | None = None, flag: str = "--segmenter"
) -> tuple[Sam3VideoModel, Sam3VideoProcessor]:
    """``Sam3VideoModel`` and ``Sam3VideoProcessor`` of ``source`` (what transformers' docs load for
    ``facebook/sam3``).

    Args:
        detector: the image segmenter's model loaded from the same source: a ``Sam3Model`` replaces the video
            model's copy (one detector in memory); the video model follows its device and dtype.
    """
    model = load_pretrained(source, "SAM 3 video model", Sam3VideoModel.from_pretrained, flag)
    processor = load_pretrained(source, "SAM 3 video processor", Sam3VideoProcessor.from_pretrained, flag)
    if detector is not None:
        if isinstance(detector, Sam3Model):
            model.detector_model = detector
        param = next(detector.parameters())
        model.to(device=param.device, dtype=param.dtype)
    return model.eval(), processor

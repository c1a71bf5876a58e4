"""A clip through SAM 3's video model (:mod:`autoseg.models.segmenters.sam3_video`): label maps written as the
tracker releases each frame, and each object's track (name, first and last frame) for ``NAME.json``.

Resuming: the tracker runs in chunks of ``chunk`` frames. Each time every label map of a chunk is written, the tracks
so far and the number of finished chunks are saved in ``NAME.partial.json``. A killed clip restarts tracking at the
first unfinished chunk (the chunk of its first missing label map) with a fresh tracker: written label maps are kept
(also those of that chunk, which is tracked again without rewriting them), and the tracks found after the restart get
new ids (numbered on from the saved ones), so an object seen on both sides of the restart has two tracks. A kill in
the first chunk restarts at frame 0, and the resumed clip equals an uninterrupted run.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from PIL import Image

from autoseg.models.segmenters.sam3_video import Sam3ClipTracker, TrackedFrame
from autoseg.video.outputs import ClipOutputs


class TrackLog:
    """Per track id: its name, first and last frame, frames shown and best score (compact, for ``NAME.json``).

    Args:
        tracks: tracks saved before a restart (``to_json`` output).
        names: the clip's vocabulary.
    """

    def __init__(self, names: list[str], tracks: dict[str, dict[str, Any]] | None = None) -> None:
        self.names = names
        self.tracks = {int(k): dict(v) for k, v in (tracks or {}).items()}
        self.offset = max(self.tracks, default=-1) + 1  # ids of a restarted tracker come after the saved ones

    def add(self, frame: TrackedFrame) -> None:
        for obj_id, (name, score) in frame.objects.items():
            track = self.tracks.setdefault(
                self.offset + obj_id, {"name": self.names[name - 1], "frames": [frame.index, frame.index], "n": 0}
            )
            track["frames"][1] = frame.index
            track["n"] += 1
            track["score"] = round(max(track.get("score", 0.0), score), 4)

    def to_json(self) -> dict[str, dict[str, Any]]:
        return {str(k): self.tracks[k] for k in sorted(self.tracks)}


def _from_chunk(
    frames: Iterable[tuple[int, Image.Image]], chunk: int, first: int, seen: list[int]
) -> Iterator[tuple[int, Image.Image]]:
    """The frames from chunk ``first`` on (earlier ones are only listed in ``seen``, as every frame is)."""
    for position, (index, image) in enumerate(frames):
        seen.append(index)
        if position >= first * chunk:
            yield index, image


def track_clip(
    tracker: Sam3ClipTracker,
    frames: Iterable[tuple[int, Image.Image]],
    outputs: ClipOutputs,
    state: dict[str, Any],
    seen: list[int],
) -> dict[str, dict[str, Any]]:
    """Track ``state["vocabulary"]`` through ``frames``, writing missing label maps and saving progress in ``state``
    (module docstring).

    Args:
        tracker: SAM 3's video model in chunks.
        frames: the clip's ``(frame index, image)`` in order.
        outputs: the clip's files.
        state: the partial state (vocabulary, settings; ``tracks`` and ``tracked_chunks`` of an earlier run).
        seen: every frame index is appended to it.

    Returns:
        the tracks, by id.
    """
    names = state["vocabulary"]
    first = int(state.get("tracked_chunks", 0))
    log = TrackLog(names, state.get("tracks"))
    chunk = tracker.chunk
    position = first * chunk
    for frame in tracker.track(_from_chunk(frames, chunk, first, seen), names):
        if not outputs.label_map_path(frame.index).is_file():
            outputs.write_frame(frame.index, frame.label_map, len(names))
        log.add(frame)
        position += 1
        if position % chunk == 0:  # a chunk is written: a restart begins after it
            state.update(tracked_chunks=position // chunk, tracks=log.to_json())
            outputs.save_partial(state)
    return log.to_json()

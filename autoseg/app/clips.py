"""What the demo page does with a short clip, without the page: keep the upload, segment its first frames with the
library's clip path (:func:`autoseg.video.run.segment_clip`: one vocabulary per clip, found on key frames; every
frame segmented with it, the logits smoothed over time) and describe the result. Gradio-free, so tests call it.

The files are those ``infer.py`` writes for a clip (:mod:`autoseg.video.outputs`): ``NAME_overlay.mp4`` (H.264,
yuv420p: browsers play it), ``NAME.json`` and the label maps ``NAME/000000.png ...``, in a request folder of the
:class:`~autoseg.app.backend.DemoBackend`. A session holds names and paths, never frames: the upload is copied into
its own request folder (the server's upload is removed by the page), frames are decoded one at a time, and request
folders go with the session (:meth:`~autoseg.app.backend.DemoBackend.release`), when the next clip replaces them,
after ``keep_files_s`` or on ``close``.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from autoseg.app.backend import UNLABELLED_ROW, Settings, colours, percent, safe_stem
from autoseg.utils.video import VIDEO_EXTENSIONS, ClipSource, VideoReadError, iter_video, video_fps
from autoseg.video.outputs import ClipOutputs
from autoseg.video.run import ClipOptions, segment_clip

DEFAULT_CLIP_FRAMES = 48  # ~5 s at 10 fps: a page request, not a batch job (infer.py takes whole videos)


@dataclass(frozen=True)
class ClipUpload:
    """An uploaded clip kept on the server until it is segmented.

    Attributes:
        name: the uploaded file's name (as the person knows it).
        path: the kept copy, alone in its request folder.
        size: ``(width, height)`` of its frames.
        fps: its frame rate (0: the container does not say; the overlay then uses 10).
    """

    name: str
    path: Path
    size: tuple[int, int]
    fps: float

    @property
    def files(self) -> list[Path]:
        """What :meth:`DemoBackend.release` removes (with its folder)."""
        return [self.path]


@dataclass(frozen=True)
class ClipResult:
    """A segmented clip: what the page shows.

    Attributes:
        name: the uploaded file's name.
        vocabulary: the clip's names; label ``i`` in every frame is ``vocabulary[i - 1]``, in the overlay's colours.
        frames: frames segmented (one overlay frame each).
        shares: each name's share of the pixels over all segmented frames, and ``"<unlabelled>"``'s.
        frames_with: per name, the frames in which it labels pixels.
        settings: the page settings it was made with (seed and threshold apply to clips).
        seconds: time taken.
        files: ``[overlay MP4, JSON]`` (the label maps are in the JSON's folder).
    """

    name: str
    vocabulary: list[str]
    frames: int
    shares: dict[str, float]
    frames_with: dict[str, int]
    settings: Settings
    seconds: float
    files: list[Path]

    @property
    def overlay(self) -> Path:
        return self.files[0]


def _named(error: Exception, path: Path, name: str) -> str:
    """An error message with the server's path of a file replaced by the file's name as the person knows it."""
    return str(error).replace(str(path), name)


def keep_clip(backend, path: str | Path, name: str | None = None) -> tuple[ClipUpload, Image.Image]:
    """Check an uploaded clip and keep a copy of it: ``(the kept clip, its first frame)``.

    Args:
        backend: the page's :class:`~autoseg.app.backend.DemoBackend` (its request folders and pixel limit).
        name: the file's name as the person knows it (default: ``path``'s).

    Raises:
        VideoReadError: not a video file (by its extension), not decodable, or frames larger than the backend's
            ``max_pixels``; the message names ``name``, never the server's path, and nothing is kept.
    """
    path = Path(path)
    name = name or path.name
    suffix = Path(name).suffix.lower()
    if suffix not in VIDEO_EXTENSIONS:
        raise VideoReadError(f"{name}: not a clip; upload a video file ({' '.join(VIDEO_EXTENSIONS)})")
    folder = backend.request_folder()
    kept = folder / f"{safe_stem(name)}{suffix}"
    try:
        shutil.copyfile(path, kept)
        frames = iter_video(kept, max_frames=1)
        try:
            first = next(frames)[1]
        finally:
            frames.close()
        pixels = first.width * first.height
        if backend.max_pixels is not None and pixels > backend.max_pixels:
            raise VideoReadError(
                f"{name}: frames are {first.width} x {first.height} = {pixels:,} pixels, more than the limit of "
                f"{backend.max_pixels:,} (raise it with --max-pixels, or downscale the clip)"
            )
        fps = video_fps(kept)
    except (VideoReadError, OSError) as e:
        shutil.rmtree(folder, ignore_errors=True)
        raise VideoReadError(_named(_named(e, kept, name), path, name)) from None
    return ClipUpload(name, kept, first.size, fps), first


def segment_upload(
    backend, upload: ClipUpload, settings: Settings, max_frames: int = DEFAULT_CLIP_FRAMES
) -> ClipResult:
    """Segment the first ``max_frames`` frames of ``upload`` with one vocabulary, the page's seed and threshold (the
    k range and caption passes are the pipeline's), and the default temporal smoothing; the outputs go into a new
    request folder.

    Raises:
        ValueError: ``max_frames`` is not positive, or a setting is out of range (the message names it).
        VideoReadError: the clip breaks while decoding (the message names ``upload.name``); nothing is left behind.
    """
    if max_frames < 1:
        raise ValueError(f"frames per clip must be at least 1, got {max_frames}")
    settings.apply(backend.config)
    threshold = settings.threshold if backend.has_threshold else None
    options = ClipOptions(max_frames=max_frames, seed=settings.seed, threshold=threshold)
    folder = backend.request_folder()
    stem = safe_stem(upload.name)
    try:
        t0 = time.perf_counter()
        with backend.lock:
            entry = segment_clip(backend.pipeline, ClipSource(upload.path, stem), folder, options)
        seconds = time.perf_counter() - t0
        if entry["status"] != "ok":
            raise VideoReadError(_named(VideoReadError(entry["reason"]), upload.path, upload.name))
        outputs = ClipOutputs(folder, stem)
        record = json.loads(outputs.record.read_text(encoding="utf-8"))
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    vocabulary, per_frame = record["vocabulary"], record["pixel_fraction"].values()
    n = max(len(per_frame), 1)
    keys = [*vocabulary, "<unlabelled>"]
    shares = {k: sum(f[k] for f in per_frame) / n for k in keys}
    frames_with = {k: sum(f[k] > 0 for f in per_frame) for k in vocabulary}
    files = [outputs.overlay, outputs.record]
    return ClipResult(upload.name, vocabulary, len(per_frame), shares, frames_with, settings, seconds, files)


# ---------------------------------------------------------------------------------------------------- what is shown
def clip_legend(result: ClipResult) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """``(highlighted text, colour map)``: every name of the clip in its overlay colour, in vocabulary order (the
    overlay video's legend lists the same names)."""
    return [(n, n) for n in result.vocabulary], colours(result.vocabulary)


def clip_rows(result: ClipResult) -> list[list]:
    """Table rows ``[name, pixel share over the clip in %, frames with pixels]``, then the unlabelled share if any."""
    rows = [[n, percent(result.shares[n]), f"{result.frames_with[n]} of {result.frames}"] for n in result.vocabulary]
    if result.shares["<unlabelled>"] > 0:
        rows.append([UNLABELLED_ROW, percent(result.shares["<unlabelled>"]), ""])
    return rows


def describe_clip(result: ClipResult) -> str:
    """One status line: the names, the frames and the time."""
    names = f"{len(result.vocabulary)} names: {', '.join(result.vocabulary)}" if result.vocabulary else "no names"
    return f"{result.name}: {names}; {result.frames} frames segmented with them ({result.seconds:.1f} s)"

"""Video files through PyAV: streaming decode (stride, frame limit) and an atomic H.264 encoder.

Frames are never collected in memory: :func:`iter_video` yields one decoded frame at a time and
:class:`VideoWriter` encodes each frame as it arrives.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mov", ".mkv", ".avi")


class VideoReadError(ValueError):
    """A video file could not be decoded; the message names the file and the reason."""


def _av():
    try:
        import av
    except ImportError as e:  # pragma: no cover - av is a dependency
        raise ImportError("video files need PyAV: pip install av") from e
    return av


def video_fps(path: str | os.PathLike) -> float:
    """Average frame rate of the first video stream of ``path`` (0.0 when the container does not say)."""
    av = _av()
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            return float(rate) if rate else 0.0
    except (av.FFmpegError, IndexError, OSError) as e:
        raise VideoReadError(f"cannot read video {path}: {e}") from e


def iter_video(
    path: str | os.PathLike, stride: int = 1, max_frames: int | None = None
) -> Iterator[tuple[int, Image.Image]]:
    """Decode ``path`` frame by frame.

    Args:
        path: a video file PyAV can open.
        stride: keep every ``stride``-th decoded frame (1 = all).
        max_frames: stop after this many kept frames (None = all).

    Yields:
        ``(index, image)``: the index of the kept frame among the decoded ones (0, stride, 2 * stride, ...) and
        the frame as an RGB PIL image.

    Raises:
        VideoReadError: the file cannot be opened, has no video stream or breaks while decoding.
    """
    if stride < 1:
        raise ValueError(f"stride={stride} must be at least 1")
    av = _av()
    kept = 0
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoReadError(f"cannot read video {path}: it has no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for i, frame in enumerate(container.decode(stream)):
                if max_frames is not None and kept >= max_frames:
                    return
                if i % stride:
                    continue
                kept += 1
                yield i, frame.to_image().convert("RGB")
    except av.FFmpegError as e:
        raise VideoReadError(f"cannot read video {path}: {e}") from e
    if kept == 0:
        raise VideoReadError(f"cannot read video {path}: no frames decoded")


class VideoWriter:
    """Encode RGB frames to an H.264 (yuv420p) video, atomically: the file appears under ``path`` only on
    :meth:`close` without error; an exception inside a ``with`` block leaves no file.

    Frames are padded to even width and height (yuv420p needs them); all frames must have the first one's size.
    """

    def __init__(self, path: str | os.PathLike, fps: float = 10.0, crf: int = 18) -> None:
        self.path = Path(path)
        self.fps = Fraction(fps).limit_denominator(1001)
        self.crf = crf
        self.frames = 0
        self._container = None
        self._stream = None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp" + self.path.suffix, dir=self.path.parent)
        os.close(fd)
        self._tmp = Path(tmp)

    def write(self, image: Image.Image | np.ndarray) -> None:
        """Append one frame (RGB PIL image or ``H x W x 3`` uint8 array)."""
        av = _av()
        rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.uint8)
        h, w = rgb.shape[:2]
        if h % 2 or w % 2:
            rgb = np.pad(rgb, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
        if self._container is None:
            self._container = av.open(str(self._tmp), mode="w", format="mp4")
            self._stream = self._container.add_stream("libx264", rate=self.fps)
            self._stream.width, self._stream.height = rgb.shape[1], rgb.shape[0]
            self._stream.pix_fmt = "yuv420p"
            self._stream.options = {"crf": str(self.crf)}
        elif (rgb.shape[1], rgb.shape[0]) != (self._stream.width, self._stream.height):
            raise ValueError(
                f"frame {self.frames} of {self.path} is {w}x{h}; the video is "
                f"{self._stream.width}x{self._stream.height}"
            )
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
        for packet in self._stream.encode(frame):
            self._container.mux(packet)
        self.frames += 1

    def close(self) -> Path:
        """Flush the encoder and move the finished file to ``path``."""
        if self._container is None:
            self._tmp.unlink(missing_ok=True)
            raise ValueError(f"no frames were written to {self.path}")
        for packet in self._stream.encode():
            self._container.mux(packet)
        self._container.close()
        self._container = None
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Drop the unfinished file."""
        if self._container is not None:
            self._container.close()
            self._container = None
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

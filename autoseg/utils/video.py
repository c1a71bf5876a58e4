"""Video files through PyAV: streaming decode (stride, frame limit) and an atomic H.264 encoder.

Frames are never collected in memory: :func:`iter_video` yields one decoded frame at a time and
:class:`VideoWriter` encodes each frame as it arrives.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
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
    """Encode RGB frames to an H.264 (yuv420p, "faststart") MP4 video, which browsers play, atomically: the file
    appears under ``path`` only on :meth:`close` without error; an exception inside a ``with`` block leaves no file.

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
            # faststart: the index (moov) goes before the frames, so a browser plays the file while it downloads
            self._container = av.open(str(self._tmp), mode="w", format="mp4", options={"movflags": "faststart"})
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


def list_frame_files(folder: str | os.PathLike) -> list[Path]:
    """The image files directly in ``folder`` (hidden ones skipped), sorted by name: a clip's frames in order."""
    from autoseg.utils.io import IMAGE_EXTENSIONS

    return sorted(
        p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
    )


class ClipSource:
    """A clip to segment: a video file or a folder of frames (sorted by file name; frame ``i`` = ``i``-th file).

    Args:
        path: the video file or the frames folder.
        name: output name (relative stem) of the clip.
        fps: frame rate of a frames folder (a video file has its own).
    """

    def __init__(self, path: str | os.PathLike, name: str | os.PathLike, fps: float = 10.0) -> None:
        self.path = Path(path)
        self.name = Path(name)
        self.is_video = self.path.is_file()
        self._fps = fps

    @property
    def fps(self) -> float:
        """Frames per second of the source (a video's own rate; 0 when its container does not say)."""
        return video_fps(self.path) if self.is_video else self._fps

    def frames(self, stride: int = 1, max_frames: int | None = None) -> Iterator[tuple[int, Image.Image]]:
        """``(frame index, RGB image)`` of every ``stride``-th frame, at most ``max_frames``, one at a time.

        Raises:
            VideoReadError: a video that cannot be decoded, or a frame image that cannot be read.
        """
        if self.is_video:
            yield from iter_video(self.path, stride, max_frames)
            return
        from autoseg.utils.io import ImageReadError, load_image

        files = list_frame_files(self.path)[::stride][:max_frames]
        if not files:
            raise VideoReadError(f"cannot read clip {self.path}: no image files in the folder")
        for k, f in enumerate(files):
            try:
                yield k * stride, load_image(f)
            except ImageReadError as e:
                raise VideoReadError(f"cannot read clip {self.path}: {e}") from e


def split_inputs(
    paths: Sequence[str | os.PathLike], clips: bool = False, fps: float = 10.0
) -> tuple[list[tuple[Path, Path]], list[ClipSource]]:
    """Sort the command line's inputs into images and clips.

    Video files (``VIDEO_EXTENSIONS``), given or found in folders, are clips named by their relative stem. With
    ``clips``, a folder argument is a clip of its image files (named by the folder) and each sub-folder holding
    images is a clip too (named by its path under the argument); without it, image files are images.

    Returns:
        ``(images, clips)``: ``(file, relative stem)`` pairs as :func:`autoseg.utils.io.find_images` gives them, and
        the clip sources.

    Raises:
        FileNotFoundError: a path does not exist.
    """
    from autoseg.utils.io import find_images

    images: list[tuple[Path, Path]] = []
    sources: list[ClipSource] = []
    for path in map(Path, paths):
        found = find_images([path])
        videos = [(f, s) for f, s in found if f.suffix.lower() in VIDEO_EXTENSIONS]
        sources += [ClipSource(f, s, fps) for f, s in videos]
        others = [(f, s) for f, s in found if f.suffix.lower() not in VIDEO_EXTENSIONS]
        if not (clips and path.is_dir()):
            images += others
            continue
        folders = sorted({f.parent for f, _ in others})
        for folder in folders:
            if list_frame_files(folder):
                name = folder.relative_to(path) if folder != path else Path(path.resolve().name)
                sources.append(ClipSource(folder, name, fps))
    return images, sources


def frame_chunks(frames: Iterable[tuple[int, Image.Image]], size: int) -> Iterator[list[tuple[int, Image.Image]]]:
    """``(frame index, image)`` pairs in lists of ``size`` (the last may be shorter), streamed."""
    chunk: list[tuple[int, Image.Image]] = []
    for item in frames:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk

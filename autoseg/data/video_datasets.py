"""Reader for video segmentation ground truth: clips of per-frame masks (the ``video-folder`` layout).

Layout (what ``python -m autoseg.data.shapes --video`` writes)::

    ROOT/classes.txt                  one class name per line; mask value = 0-based line number, 255 = ignore
    ROOT/masks/NAME/000000.png ...    single-channel masks, the stem is the frame index
    ROOT/frames/NAME/000000.png ...   (optional) the frames as images
    ROOT/videos/NAME.mp4              (optional) the clip as a video (any of ``VIDEO_EXTENSIONS``)

A clip is a sub-folder of ``masks/``; its scored frames are the masks it holds (a clip may be annotated sparsely).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from autoseg.data.datasets import IGNORE_INDEX, read_class_list
from autoseg.utils.io import IMAGE_EXTENSIONS, ImageReadError
from autoseg.utils.video import VIDEO_EXTENSIONS

VIDEO_FOLDER_LAYOUT = (
    "ROOT/{classes.txt, masks/NAME/000000.png ... (values = line numbers, 255 = ignore), "
    "frames/NAME/000000.png ... and/or videos/NAME.mp4}"
)


@dataclass(frozen=True)
class VideoClip:
    """One annotated clip: its name, annotated frame indices with their mask files, and its frames on disk.

    Attributes:
        name: clip name (folder under ``masks/``, output name of its predictions).
        frames: annotated frame indices, ascending.
        masks: mask file of each annotated frame.
        frame_dir: ``ROOT/frames/NAME`` when it exists.
        video: ``ROOT/videos/NAME.*`` when it exists.
    """

    name: str
    frames: tuple[int, ...]
    masks: tuple[Path, ...]
    frame_dir: Path | None = None
    video: Path | None = None

    def frame_image(self, t: int) -> Path | None:
        """The image file of frame ``t`` in ``frame_dir`` (any image extension), or None."""
        if self.frame_dir is None:
            return None
        for ext in IMAGE_EXTENSIONS:
            p = self.frame_dir / f"{t:06d}{ext}"
            if p.is_file():
                return p
        return None


@dataclass
class VideoDataset:
    """Annotated clips with one class list (attributes as in :class:`autoseg.data.datasets.SegmentationDataset`)."""

    clips: list[VideoClip]
    classes: list[str]
    name: str
    ignore_index: int
    background_index: int | None
    root: Path

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def n_frames(self) -> int:
        return sum(len(c.frames) for c in self.clips)

    def read_mask(self, clip: VideoClip, k: int) -> np.ndarray:
        """The ``H x W`` int64 mask of the ``k``-th annotated frame of ``clip``.

        Raises:
            ValueError: not a single-channel image, or values that are neither class ids nor ``ignore_index``.
        """
        path = clip.masks[k]
        try:
            with Image.open(path) as im:
                mask = np.asarray(im).astype(np.int64)
        except (OSError, SyntaxError, ValueError) as e:
            raise ImageReadError(f"{path}: not a readable mask image ({type(e).__name__}: {e})") from e
        if mask.ndim != 2:
            raise ValueError(f"{path}: expected a single-channel mask of class ids, got shape {mask.shape}")
        bad = (mask >= self.num_classes) & (mask != self.ignore_index)
        if bad.any():
            raise ValueError(
                f"{path}: unexpected mask values {sorted(set(np.unique(mask[bad]).tolist()))[:10]} "
                f"({self.num_classes} classes, ignore {self.ignore_index})"
            )
        return mask


def _frame_index(path: Path) -> int:
    if not path.stem.isdigit():
        raise ValueError(f"{path}: mask names must be frame indices (000000.png, 000001.png, ...)")
    return int(path.stem)


def video_folder(root: str | os.PathLike, split: str | None = None, limit: int | None = None) -> VideoDataset:
    """Read the ``video-folder`` layout (module docstring); ``split`` is ignored, ``limit`` keeps the first clips.

    Raises:
        FileNotFoundError: the root, ``classes.txt`` or ``masks/`` is missing.
        ValueError: a clip without masks, or a mask not named by its frame index.
    """
    base = Path(root)
    if not base.is_dir():
        raise FileNotFoundError(f"{base}: video dataset root not found; expected layout {VIDEO_FOLDER_LAYOUT}")
    classes = read_class_list(base / "classes.txt")
    mask_root = base / "masks"
    if not mask_root.is_dir():
        raise FileNotFoundError(f"{mask_root}: masks folder not found; expected layout {VIDEO_FOLDER_LAYOUT}")
    clips = []
    for folder in sorted(p for p in mask_root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted((_frame_index(p), p) for p in folder.glob("*.png") if not p.name.startswith("."))
        if not files:
            raise ValueError(f"{folder}: clip without masks; expected {folder}/000000.png ...")
        frame_dir = base / "frames" / folder.name
        videos = [base / "videos" / f"{folder.name}{ext}" for ext in VIDEO_EXTENSIONS]
        clips.append(
            VideoClip(
                name=folder.name,
                frames=tuple(t for t, _ in files),
                masks=tuple(p for _, p in files),
                frame_dir=frame_dir if frame_dir.is_dir() else None,
                video=next((v for v in videos if v.is_file()), None),
            )
        )
    if not clips:
        raise ValueError(f"{mask_root}: no clip folders; expected layout {VIDEO_FOLDER_LAYOUT}")
    if limit is not None:
        clips = clips[:limit]
    lowered = [c.lower() for c in classes]
    background_index = lowered.index("background") if "background" in lowered else None
    return VideoDataset(clips, classes, "video-folder", IGNORE_INDEX, background_index, base)


VIDEO_DATASETS = {"video-folder": video_folder}

"""The on-disk outputs of one clip ``NAME`` (what ``infer.py`` writes for a video or a ``--clips`` folder):

- ``NAME/000000.png ...``: a label map per segmented frame (frame index, 6 digits; 0 = unlabelled, ``i`` = the
  ``i``-th name of the clip's vocabulary), each written atomically as soon as the frame is segmented;
- ``NAME.partial.json``: the clip's vocabulary while it is being segmented (a resumed run reads it back; with SAM 3's
  video model also the tracks of the chunks written so far);
- ``NAME_overlay.mp4``: the frames with label colours, one video frame per segmented frame;
- ``NAME.json``: written last (the clip counts as done once it exists): ``vocabulary``, ``fps``, ``frames`` (the
  segmented frame indices), ``pixel_fraction`` (per frame, each name's share), key frames and settings; with SAM 3's
  video model also ``tracks`` (per track id: name, first and last frame, frames shown, best score).

A top-level clip named like the run's bookkeeping (``manifest``) gets one more ``~``, as an image does
(:func:`autoseg.outputs.files.output_base`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from autoseg.outputs.files import UNLABELLED, output_base, palette, render_overlay
from autoseg.utils.io import atomic_write_json, remove_stale_temporaries, save_image_atomic
from autoseg.utils.video import VideoWriter


def pixel_fraction(label_map: np.ndarray, vocabulary: Sequence[str]) -> dict[str, float]:
    """Each name's share of the frame's pixels, and the unlabelled share under ``"<unlabelled>"``."""
    counts = np.bincount(label_map.ravel().astype(np.int64), minlength=len(vocabulary) + 1)
    total = max(int(counts.sum()), 1)
    out = {name: float(counts[i + 1]) / total for i, name in enumerate(vocabulary)}
    out["<unlabelled>"] = float(counts[UNLABELLED]) / total
    return out


def legend_strip(vocabulary: Sequence[str], width: int, row: int = 14) -> Image.Image | None:
    """A white strip naming every name of the clip beside its colour (one row each); None without names."""
    if not vocabulary:
        return None
    cols = palette(len(vocabulary) + 1)
    font = ImageFont.load_default()
    legend = Image.new("RGB", (width, row * len(vocabulary) + 4), (255, 255, 255))
    draw = ImageDraw.Draw(legend)
    for i, name in enumerate(vocabulary, start=1):
        y = 2 + (i - 1) * row
        draw.rectangle([4, y + 1, 14, y + 11], fill=tuple(int(c) for c in cols[i]))
        draw.text((20, y), name, fill=(0, 0, 0), font=font)
    return legend


def overlay_frame(image: Image.Image, label_map: np.ndarray, vocabulary: list[str], legend: Image.Image | None):
    """The frame with label colours (as image overlays) above the clip's fixed legend: every frame has one size."""
    blended = render_overlay(image, label_map, vocabulary).crop((0, 0, image.width, image.height))
    if legend is None:
        return blended
    canvas = Image.new("RGB", (image.width, image.height + legend.height), (255, 255, 255))
    canvas.paste(blended, (0, 0))
    canvas.paste(legend, (0, image.height))
    return canvas


class ClipOutputs:
    """The files of clip ``name`` under ``out_dir`` (module docstring)."""

    def __init__(self, out_dir: str | Path, name: str | Path) -> None:
        self.base = output_base(out_dir, name, "clip name")  # a clip named "manifest" keeps the run's manifest.json
        self.folder = self.base
        self.record = self.base.with_name(self.base.name + ".json")
        self.partial = self.base.with_name(self.base.name + ".partial.json")
        self.overlay = self.base.with_name(self.base.name + "_overlay.mp4")

    def label_map_path(self, index: int) -> Path:
        return self.folder / f"{index:06d}.png"

    def done(self) -> bool:
        """Whether the clip's record (written last) exists and parses."""
        try:
            return isinstance(json.loads(self.record.read_text(encoding="utf-8")).get("vocabulary"), list)
        except (OSError, ValueError, AttributeError):
            return False

    def read_partial(self) -> dict[str, Any] | None:
        """The state a killed run left (vocabulary and settings), or None."""
        try:
            state = json.loads(self.partial.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return state if isinstance(state, dict) and isinstance(state.get("vocabulary"), list) else None

    def start(self, state: dict[str, Any]) -> None:
        """Record the clip's vocabulary and settings before its frames are written; forget older outputs (record and
        label maps, which belong to another vocabulary)."""
        self.record.unlink(missing_ok=True)
        if self.folder.is_dir():
            for old in self.folder.glob("[0-9][0-9][0-9][0-9][0-9][0-9].png"):
                old.unlink()
        atomic_write_json(self.partial, state)

    def save_partial(self, state: dict[str, Any]) -> None:
        """Update the partial state (e.g. the tracks of the chunks written so far) without touching label maps."""
        atomic_write_json(self.partial, state)

    def write_frame(self, index: int, label_map: np.ndarray, n_names: int) -> None:
        """Write frame ``index``'s label map atomically (8-bit, 16-bit past 255 names)."""
        mode, dtype = ("L", np.uint8) if n_names <= 255 else ("I;16", np.uint16)
        save_image_atomic(self.label_map_path(index), Image.fromarray(label_map.astype(dtype), mode=mode))

    def read_frame(self, index: int) -> np.ndarray | None:
        """Frame ``index``'s label map, or None when it was not written (or is unreadable)."""
        try:
            with Image.open(self.label_map_path(index)) as im:
                return np.asarray(im).astype(np.int64)
        except (OSError, ValueError):
            return None

    def write_overlay(self, frames: Iterable[tuple[int, Image.Image]], vocabulary: list[str], fps: float) -> int:
        """Encode ``NAME_overlay.mp4`` from the frames and the label maps on disk; returns its number of frames."""
        legend = None
        with VideoWriter(self.overlay, fps=fps if fps > 0 else 10.0) as video:
            for index, image in frames:
                legend = legend or legend_strip(vocabulary, image.width)
                label_map = self.read_frame(index)
                if label_map is None:
                    raise FileNotFoundError(f"{self.label_map_path(index)}: label map missing for the overlay video")
                video.write(overlay_frame(image, label_map, vocabulary, legend))
        return video.frames

    def finish(self, record: dict[str, Any]) -> None:
        """Write ``NAME.json`` (the clip is done) and drop the partial state."""
        atomic_write_json(self.record, record)
        self.partial.unlink(missing_ok=True)
        remove_stale_temporaries(self.partial)

"""CVAT "Segmentation Mask 1.1" (``--to cvat``): colour-coded class masks and their colour map, zipped.

Writes ``segmentation_mask_1.1.zip`` holding ``labelmap.txt`` (``name:r,g,b::`` per label, ``background`` =
unlabelled = black first), ``ImageSets/Segmentation/default.txt`` (one image name per line) and
``SegmentationClass/STEM.png`` (RGB, each pixel its label's colour); upload it in CVAT with *Upload annotations >
Segmentation mask 1.1* on a task holding the images. A category named ``background`` is CVAT's background label
(black), like unlabelled pixels.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

from PIL import Image

from autoseg.export.base import Categories, ExportImage

BACKGROUND = "background"


def labelmap_text(categories: Categories) -> str:
    """``labelmap.txt``: background first, then each category with its colour."""
    colours = categories.colours()
    lines = ["# label:color_rgb:parts:actions", f"{BACKGROUND}:0,0,0::"]
    for cid, name in enumerate(categories.names, start=1):
        if name == BACKGROUND:
            continue
        if ":" in name or "\n" in name:
            raise ValueError(f"label {name!r} cannot be written to CVAT's labelmap.txt (':' separates its fields)")
        lines.append(f"{name}:{','.join(str(int(c)) for c in colours[cid])}::")
    return "\n".join(lines) + "\n"


class CvatWriter:
    """``segmentation_mask_1.1.zip`` in CVAT's Segmentation Mask 1.1 layout (streamed into the archive)."""

    FILE = "segmentation_mask_1.1.zip"

    def __init__(self, out: Path, categories: Categories, options: dict):
        self.out, self.categories = out, categories
        self.zip = zipfile.ZipFile(out / self.FILE, "w", compression=zipfile.ZIP_STORED)
        self.names_path = out / ".default.txt.part"
        self.names = self.names_path.open("w", encoding="utf-8")
        self._colours = None

    def colours(self):
        """Each category's colour (black for ``background``), recomputed only when categories were added."""
        if self._colours is None or len(self._colours) != len(self.categories) + 1:
            self._colours = self.categories.colours()
            if BACKGROUND in self.categories.names:  # CVAT's background label is black, as unlabelled pixels are
                self._colours[self.categories.names.index(BACKGROUND) + 1] = 0
        return self._colours

    def add(self, item: ExportImage) -> None:
        colours = self.colours()
        buffer = io.BytesIO()
        Image.fromarray(colours[item.label_map], mode="RGB").save(buffer, format="PNG")
        self.zip.writestr(f"SegmentationClass/{item.stem}.png", buffer.getvalue())
        self.names.write(item.stem + "\n")

    def finish(self) -> None:
        self.names.close()
        self.zip.writestr("labelmap.txt", labelmap_text(self.categories))
        self.zip.write(self.names_path, "ImageSets/Segmentation/default.txt")
        self.zip.close()
        self.names_path.unlink()

"""AutoSeg's ``folder`` dataset layout (``--to folder``): what ``eval.py --dataset folder``, ``train.py`` and the adapt
recipe read.

Writes ``images/STEM.EXT`` (a copy of the image ``infer.py`` read), ``masks/STEM.png`` (single-channel uint8: value =
class line in ``classes.txt``, 255 = unlabelled, which the readers ignore) and ``classes.txt`` (one class per line:
the ``--classes`` list, then kept unmapped names; or every name found). An image whose file cannot be found is
skipped; ``--images DIR`` says where the images are when the recorded paths no longer lead to them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from autoseg.export.base import Categories, ExportImage, SkipImage

IGNORE = 255
MAX_CLASSES = 254  # class ids 0..253 beside 255 = ignore in a uint8 mask, as the folder reader requires


class FolderWriter:
    """``images/``, ``masks/`` and ``classes.txt`` of a folder dataset."""

    def __init__(self, out: Path, categories: Categories, options: dict):
        self.out, self.categories = out, categories
        self.image_root = options.get("image_root")

    def source_image(self, item: ExportImage) -> Path:
        """The image file to copy.

        Raises:
            SkipImage: it cannot be found.
        """
        path = Path(self.image_root) / item.file_name() if self.image_root is not None else None
        if path is None and item.image is not None:
            path = Path(item.image)
        if path is None or not path.is_file():
            where = path if path is not None else "(no image path in the record)"
            raise SkipImage(f"{item.stem}: image {where} not found; give the image folder with --images DIR")
        return path

    def add(self, item: ExportImage) -> None:
        if len(self.categories) > MAX_CLASSES:
            raise ValueError(
                f"a folder dataset holds at most {MAX_CLASSES} classes and this export has {len(self.categories)}: "
                "map the names onto a class list with --classes"
            )
        image = self.source_image(item)
        mask = np.where(item.label_map == 0, IGNORE, item.label_map - 1).astype(np.uint8)
        target = self.out / "images" / (item.stem + image.suffix)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(image, target)
        mask_path = self.out / "masks" / f"{item.stem}.png"
        mask_path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask, mode="L").save(mask_path)

    def finish(self) -> None:
        (self.out / "masks").mkdir(exist_ok=True)
        (self.out / "images").mkdir(exist_ok=True)
        (self.out / "classes.txt").write_text("".join(f"{name}\n" for name in self.categories.names), encoding="utf-8")

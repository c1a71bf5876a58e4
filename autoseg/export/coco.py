"""COCO instances (``--to coco``): one annotation per connected region of a category, masks as compressed RLE.

Writes ``annotations.json`` (``images``, ``annotations``, ``categories``) whose masks ``pycocotools`` reads
(``COCO(...).annToMask``); ``file_name`` is the image's path relative to the folder ``infer.py`` read. Images and
annotations are streamed to temporary files and spliced in at the end.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from autoseg.export.base import Categories, ExportImage, JsonArrayStream, write_json_with_arrays
from autoseg.export.regions import regions


def _mask_api():
    try:
        from pycocotools import mask as mask_api
    except ImportError as e:  # a dependency of autoseg; only a broken install lacks it
        raise ImportError("the coco export needs pycocotools: pip install pycocotools") from e
    return mask_api


def coco_categories(categories: Categories, isthing: int | None = None) -> list[dict]:
    """``[{"id", "name", "supercategory"}]`` (and ``isthing`` for panoptic) in id order."""
    out = []
    for cid, name in enumerate(categories.names, start=1):
        cat = {"id": cid, "name": name, "supercategory": "autoseg"}
        if isthing is not None:
            cat["isthing"] = isthing
        out.append(cat)
    return out


def image_entry(image_id: int, item: ExportImage) -> dict:
    """A COCO ``images`` entry."""
    return {"id": image_id, "file_name": item.file_name(), "width": item.width, "height": item.height}


class CocoWriter:
    """``annotations.json`` in COCO instance-segmentation form."""

    FILE = "annotations.json"

    def __init__(self, out: Path, categories: Categories, options: dict):
        self.out, self.categories = out, categories
        self.images = JsonArrayStream(out / ".images.part")
        self.annotations = JsonArrayStream(out / ".annotations.part")
        _mask_api()

    def add(self, item: ExportImage) -> None:
        mask_api = _mask_api()
        image_id = self.images.count + 1
        self.images.append(image_entry(image_id, item))
        for cid, mask in regions(item.label_map):
            rle = mask_api.encode(np.asfortranarray(mask.astype(np.uint8)))
            x, y, w, h = (int(round(v)) for v in mask_api.toBbox(rle))
            self.annotations.append(
                {
                    "id": self.annotations.count + 1,
                    "image_id": image_id,
                    "category_id": cid,
                    "segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")},
                    "area": int(mask_api.area(rle)),
                    "bbox": [x, y, w, h],
                    "iscrowd": 0,
                }
            )

    def finish(self) -> None:
        head = {
            "info": {"description": "auto-labelled by AutoSeg", "version": "1.0"},
            "licenses": [],
            "categories": coco_categories(self.categories),
        }
        write_json_with_arrays(self.out / self.FILE, head, {"images": self.images, "annotations": self.annotations})

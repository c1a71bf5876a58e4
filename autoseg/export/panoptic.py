"""COCO panoptic (``--to coco-panoptic``): a PNG per image whose colour gives a segment id, and one JSON.

Writes ``panoptic/STEM.png`` (RGB; segment id = R + 256 G + 256^2 B, 0 = unlabelled) and ``panoptic.json``
(``images``, ``annotations`` with ``segments_info`` per image and the PNG's ``file_name`` relative to ``panoptic/``,
``categories``). A segment is a connected region of a
category, as in the ``coco`` export; AutoSeg does not know which names are things, so every category is written with
``isthing: 1`` (each region its own segment).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from autoseg.export.base import Categories, ExportImage, JsonArrayStream, write_json_with_arrays
from autoseg.export.coco import coco_categories, image_entry
from autoseg.export.regions import bbox, regions

MAX_SEGMENTS = 256**3 - 1


def id_to_rgb(ids: np.ndarray) -> np.ndarray:
    """``H x W`` segment ids -> ``H x W x 3`` uint8 colours (R + 256 G + 256^2 B = id)."""
    return np.stack([ids % 256, ids // 256 % 256, ids // 256**2 % 256], axis=-1).astype(np.uint8)


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
    """The inverse of :func:`id_to_rgb` (panopticapi's ``rgb2id``)."""
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256**2 * rgb[..., 2]


class PanopticWriter:
    """``panoptic/`` PNGs and ``panoptic.json`` in COCO panoptic form."""

    FOLDER, FILE = "panoptic", "panoptic.json"

    def __init__(self, out: Path, categories: Categories, options: dict):
        self.out, self.categories = out, categories
        self.images = JsonArrayStream(out / ".images.part")
        self.annotations = JsonArrayStream(out / ".annotations.part")

    def add(self, item: ExportImage) -> None:
        image_id = self.images.count + 1
        self.images.append(image_entry(image_id, item))
        ids = np.zeros(item.label_map.shape, dtype=np.int64)
        segments = []
        for cid, mask in regions(item.label_map):
            segment_id = len(segments) + 1
            if segment_id > MAX_SEGMENTS:
                raise ValueError(f"{item.stem}: more than {MAX_SEGMENTS} segments do not fit a panoptic PNG")
            ids[mask] = segment_id
            area = int(mask.sum())
            segments.append({"id": segment_id, "category_id": cid, "area": area, "bbox": bbox(mask), "iscrowd": 0})
        png = Path(self.FOLDER) / f"{item.stem}.png"
        (self.out / png).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(id_to_rgb(ids), mode="RGB").save(self.out / png)
        self.annotations.append({"image_id": image_id, "file_name": f"{item.stem}.png", "segments_info": segments})

    def finish(self) -> None:
        cats = coco_categories(self.categories, isthing=1)
        for cat, colour in zip(cats, self.categories.colours()[1:], strict=True):
            cat["color"] = [int(c) for c in colour]
        head = {
            "info": {"description": "auto-labelled by AutoSeg", "version": "1.0"},
            "licenses": [],
            "categories": cats,
        }
        write_json_with_arrays(self.out / self.FILE, head, {"images": self.images, "annotations": self.annotations})

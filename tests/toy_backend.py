"""A whole segmenter backend in one file, as the README's "add a backend" note describes: it labels horizontal (or
vertical) bands, one per name. Registered in ``autoseg.models.segmenters.BACKENDS`` by the test that uses it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from autoseg.models.segmenters.base import Segmenter
from autoseg.models.segmenters.spec import Backend
from autoseg.utils.settings import one_of


@dataclass
class BandOptions:
    """Its own setting: ``direction`` of the bands."""

    direction: str = "horizontal"


class BandSegmenter(Segmenter):
    """Name ``i`` of ``n`` labels the ``i``-th of ``n`` equal bands of the image."""

    def __init__(self, direction: str = "horizontal"):
        super().__init__()
        self.direction = direction
        self.register_buffer("dummy", torch.zeros(1))  # something to cast to a device and dtype

    def segment(self, images, vocabularies, threshold=None):
        maps = []
        for image, names in zip(images, vocabularies, strict=True):
            h, w = image.height, image.width
            along = np.arange(h if self.direction == "horizontal" else w)
            band = (along * len(names) // len(along) + 1) if names else np.zeros_like(along)
            grid = band[:, None].repeat(w, 1) if self.direction == "horizontal" else band[None, :].repeat(h, 0)
            maps.append(grid.astype(np.int32))
        return maps

    def save_pretrained(self, folder):
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "bands.json").write_text(json.dumps({"direction": self.direction}))
        return folder


BACKEND = Backend(
    name="bands",
    summary="bands: a toy, one band per name",
    default_source="scratch:tiny",
    modes=("semantic",),
    model_types=("bands",),
    load=lambda source, config, flag="--segmenter": (json.loads((Path(source) / "bands.json").read_text()),),
    make=lambda words=(): ({},),
    assemble=lambda parts, config: BandSegmenter(parts[0].get("direction", config.options.direction)),
    scratch_sizes={"tiny": {}},
    options=BandOptions,
    rules={"direction": one_of(["horizontal", "vertical"])},
)

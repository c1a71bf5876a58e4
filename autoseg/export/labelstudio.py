"""Label Studio (``--to labelstudio``): import tasks with brush pre-annotations, and the project's label config.

Writes ``tasks.json`` (a JSON list of tasks ``{"data": {"image": URL, "name": STEM}, "predictions": [{"model_version":
"autoseg", "result": [brushlabels per category]}]}``; import it in the project's *Import* dialog) and
``label_config.xml`` (paste it under *Settings > Labeling Interface > Code*). A task's image URL is ``--image-url``
followed by the image's relative file name (e.g. ``/data/local-files/?d=photos/`` for Label Studio's local-file
storage), or the image path ``infer.py`` recorded when no prefix is given.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote
from xml.sax.saxutils import quoteattr

import numpy as np

from autoseg.export.base import Categories, ExportImage, JsonArrayStream
from autoseg.export.brush import mask_to_rle

FROM_NAME, TO_NAME = "tag", "image"


def label_config(categories: Categories) -> str:
    """The labeling interface: the image and one brush label per category, in the overlays' colours."""
    colours = categories.colours()
    hex_colour = lambda rgb: "#" + "".join(f"{int(c):02x}" for c in rgb)  # noqa: E731
    labels = "\n".join(
        f"    <Label value={quoteattr(name)} background={quoteattr(hex_colour(colours[cid]))}/>"
        for cid, name in enumerate(categories.names, start=1)
    )
    return (
        "<View>\n"
        f'  <Image name="{TO_NAME}" value="$image" zoom="true"/>\n'
        f'  <BrushLabels name="{FROM_NAME}" toName="{TO_NAME}">\n'
        f"{labels}\n"
        "  </BrushLabels>\n"
        "</View>\n"
    )


class LabelStudioWriter:
    """``tasks.json`` and ``label_config.xml`` for a Label Studio image-segmentation project."""

    TASKS, CONFIG = "tasks.json", "label_config.xml"

    def __init__(self, out: Path, categories: Categories, options: dict):
        self.out, self.categories = out, categories
        self.image_url = options.get("image_url")
        self.tasks = JsonArrayStream(out / self.TASKS)

    def url(self, item: ExportImage) -> str:
        if self.image_url is not None:
            return self.image_url + quote(item.file_name())
        return item.image if item.image is not None else item.file_name()

    def add(self, item: ExportImage) -> None:
        result = []
        for cid in (int(c) for c in np.unique(item.label_map) if c != 0):
            result.append(
                {
                    "id": f"{self.tasks.count + 1}-{cid}",
                    "type": "brushlabels",
                    "from_name": FROM_NAME,
                    "to_name": TO_NAME,
                    "original_width": item.width,
                    "original_height": item.height,
                    "image_rotation": 0,
                    "value": {
                        "format": "rle",
                        "rle": mask_to_rle(item.label_map == cid),
                        "brushlabels": [self.categories.names[cid - 1]],
                    },
                }
            )
        self.tasks.append(
            {
                "data": {"image": self.url(item), "name": item.stem},
                "predictions": [{"model_version": "autoseg", "result": result}],
            }
        )

    def finish(self) -> None:
        self.tasks.close()
        (self.out / self.CONFIG).write_text(label_config(self.categories), encoding="utf-8")

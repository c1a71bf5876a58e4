"""What every export format receives: one labelled image at a time, and the run's growing category list.

A format writer (see :mod:`autoseg.export.formats`) is built on an empty folder, gets :meth:`FormatWriter.add` once
per image and :meth:`FormatWriter.finish` once at the end; it keeps nothing per image beyond what its files need at
the end (file names, counts), so an export's memory does not grow with the images' pixels.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol

import numpy as np

from autoseg.outputs.files import palette
from autoseg.utils.io import json_text


class SkipImage(Exception):
    """Raised by :meth:`FormatWriter.add` before writing anything: the image is skipped, with this message as reason."""


@dataclass
class ExportImage:
    """One image's labels, ready to write.

    Attributes:
        stem: the image's relative output name in the prediction folder (sub-folders kept, ``/``-separated).
        image: the image path ``infer.py`` recorded (None when unknown).
        label_map: ``H x W`` int32 category ids: 0 = unlabelled, ``k`` = ``categories.names[k - 1]``.
    """

    stem: str
    image: str | None
    label_map: np.ndarray

    @property
    def height(self) -> int:
        return int(self.label_map.shape[0])

    @property
    def width(self) -> int:
        return int(self.label_map.shape[1])

    def file_name(self) -> str:
        """The image's name relative to the folder ``infer.py`` read: the stem with the image's extension."""
        suffix = Path(self.image).suffix if self.image else ".png"
        return self.stem + suffix


class Categories:
    """The export's category list: ids 1, 2, ... in order of appearance, or a fixed class list first.

    Args:
        fixed: a project's classes (``classes.txt`` order; ids 1..C); None: every name becomes a category.
        open_ended: whether names outside ``fixed`` may still be added (``--keep-unmapped``).
    """

    def __init__(self, fixed: Sequence[str] | None = None, open_ended: bool = True):
        self.names: list[str] = list(fixed or [])
        self._ids = {name: i for i, name in enumerate(self.names, start=1)}
        self.open_ended = open_ended if fixed is not None else True

    def __len__(self) -> int:
        return len(self.names)

    def id_of(self, name: str) -> int:
        """The id of ``name``, added as a new category when allowed; 0 when the list is closed to it."""
        cid = self._ids.get(name)
        if cid is None and self.open_ended:
            self.names.append(name)
            cid = self._ids[name] = len(self.names)
        return cid or 0

    def colours(self) -> np.ndarray:
        """``(C + 1) x 3`` uint8 colours, black for 0 (unlabelled) and a distinct colour per category.

        :func:`autoseg.outputs.palette`'s colours (those of the overlays), nudged where two would coincide, so that
        a colour-coded mask decodes back to exactly one category.
        """
        cols = palette(len(self.names) + 1)
        seen = {(0, 0, 0)}
        for k in range(1, len(cols)):
            rgb = tuple(int(c) for c in cols[k])
            while rgb in seen:
                rgb = (rgb[0], rgb[1], (rgb[2] + 1) % 256) if rgb[2] < 255 else ((rgb[0] + 1) % 256, rgb[1], 0)
            seen.add(rgb)
            cols[k] = rgb
        return cols


class FormatWriter(Protocol):
    """One export format: files under ``out`` (an empty folder the export renames into place when done)."""

    def __init__(self, out: Path, categories: Categories, options: dict) -> None: ...

    def add(self, item: ExportImage) -> None:
        """Write (or stream) one image's labels.

        Raises:
            SkipImage: this image cannot be exported (nothing of it was written).
        """

    def finish(self) -> None:
        """Write what needs every image (category lists, indices)."""


class JsonArrayStream:
    """A JSON array written one element at a time to a file (then spliced into a larger JSON by :func:`splice`)."""

    def __init__(self, path: Path):
        self.path = path
        self._file: IO[str] = path.open("w", encoding="utf-8")
        self._file.write("[")
        self.count = 0

    def append(self, obj: object) -> None:
        self._file.write(("\n" if self.count == 0 else ",\n") + json_text(obj))
        self.count += 1

    def close(self) -> None:
        if not self._file.closed:
            self._file.write("\n]")
            self._file.close()


def write_json_with_arrays(path: Path, head: dict, arrays: dict[str, JsonArrayStream]) -> None:
    """Write ``path`` as a JSON object: ``head``'s keys, then each streamed array under its key (copied in chunks).

    The array files are deleted afterwards. The result parses as one JSON object with ``head`` and the arrays.
    """
    with path.open("w", encoding="utf-8") as out:
        out.write(json_text(head)[:-1])  # "{... }" without its closing brace
        for i, (key, stream) in enumerate(arrays.items()):
            stream.close()
            out.write(("" if i == 0 and not head else ", ") + json.dumps(key) + ": ")
            with stream.path.open("r", encoding="utf-8") as part:
                shutil.copyfileobj(part, out)
            stream.path.unlink()
        out.write("}\n")

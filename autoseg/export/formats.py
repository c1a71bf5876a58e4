"""The export formats: a registry of writer classes (see :class:`autoseg.export.base.FormatWriter`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from autoseg.export.base import Categories, FormatWriter
from autoseg.export.coco import CocoWriter
from autoseg.export.cvat import CvatWriter
from autoseg.export.folder import FolderWriter
from autoseg.export.labelstudio import LabelStudioWriter
from autoseg.export.panoptic import PanopticWriter

FORMATS: dict[str, Callable[[Path, Categories, dict], FormatWriter]] = {
    "coco": CocoWriter,
    "coco-panoptic": PanopticWriter,
    "labelstudio": LabelStudioWriter,
    "cvat": CvatWriter,
    "folder": FolderWriter,
}


def build_writer(name: str, out: Path, categories: Categories, options: dict) -> FormatWriter:
    """The writer of format ``name`` on the empty folder ``out``.

    Raises:
        ValueError: unknown format (the message lists them).
    """
    if name not in FORMATS:
        raise ValueError(f"unknown export format {name!r}; available: {', '.join(FORMATS)}")
    return FORMATS[name](out, categories, options)

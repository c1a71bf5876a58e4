"""The export loop: a prediction folder in, one format's files out, written apart and renamed into place at the end.

Each prediction set is read, its names turned into categories (:mod:`autoseg.export.mapping`), its regions under
``min_area`` pixels removed (:mod:`autoseg.export.regions`) and handed to the format's writer; only one image's label
map is in memory at a time. Everything is written into a temporary folder beside the destination, which replaces the
destination only when complete: a failed or killed export leaves no partial destination.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from autoseg.export.base import ExportImage, SkipImage
from autoseg.export.formats import FORMATS, build_writer
from autoseg.export.mapping import NameCategories, map_to_classes
from autoseg.export.regions import drop_small_regions
from autoseg.export.source import PredictionSource, Skipped
from autoseg.export.summary import ExportSummary
from autoseg.utils.io import atomic_write_json, check_apart

SUMMARY = "summary.json"


def check_destination(pred_dir: str | Path, dest: str | Path, force: bool, inputs: Sequence[str | Path] = ()) -> None:
    """Refuse a destination that exists (unless ``force``) or that is, holds or lies in the prediction folder.

    Raises:
        FileExistsError: ``dest`` exists and ``force`` is False (one line naming it).
        ValueError: ``dest`` and ``pred_dir`` (or another input folder) are not apart.
    """
    for folder in (pred_dir, *inputs):
        check_apart(dest, [folder], "prediction" if folder == pred_dir else "image", "export folder")
    if os.path.lexists(dest) and not force:
        raise FileExistsError(f"{dest}: already exists; choose another --out or add --force to replace it")


def export_predictions(
    pred_dir: str | Path,
    fmt: str,
    dest: str | Path,
    classes: Sequence[str] | None = None,
    mapper=None,
    mapper_name: str | None = None,
    keep_unmapped: bool = False,
    min_area: int = 0,
    force: bool = False,
    options: dict | None = None,
    progress: bool = True,
) -> dict:
    """Export the prediction sets of ``pred_dir`` as ``fmt`` into the folder ``dest``; returns the summary.

    Args:
        pred_dir: an ``infer.py`` (or ``eval.py`` predictions) output folder.
        fmt: one of :data:`autoseg.export.formats.FORMATS`.
        dest: the folder to create (it holds the format's files and ``summary.json``).
        classes: map every name onto these classes with ``mapper`` (as ``eval.py`` does); None: names are categories.
        mapper: a LAVE mapper (:func:`autoseg.lave.build_mapper`), needed with ``classes``.
        mapper_name: how the summary names the mapper.
        keep_unmapped: keep names that map to no class as categories of their own.
        min_area: remove connected regions of fewer pixels (they become unlabelled).
        force: replace an existing ``dest``.
        options: format options: ``image_url`` (labelstudio), ``image_root`` (folder).

    Raises:
        FileNotFoundError: ``pred_dir`` is missing.
        FileExistsError: ``dest`` exists and ``force`` is False.
        ValueError: a bad argument, ``dest`` not apart from ``pred_dir``, or a format limit (the message says which).
        autoseg.lave.MappingError: the mapper's backend failed.
    """
    pred_dir, dest, options = Path(pred_dir), Path(dest), dict(options or {})
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; available: {', '.join(FORMATS)}")
    if min_area < 0:
        raise ValueError(f"--min-area must be a number of pixels >= 0, got {min_area}")
    image_root = [options["image_root"]] if options.get("image_root") else []
    check_destination(pred_dir, dest, force, image_root)
    source = PredictionSource(pred_dir)
    names = NameCategories(keep_unmapped=keep_unmapped)
    if classes is not None:
        if mapper is None:
            raise ValueError("mapping names onto classes needs a LAVE mapper (--mapper exact|embedding|llm)")
        names = NameCategories(classes, map_to_classes(source.vocabularies(), classes, mapper), keep_unmapped)
    summary = ExportSummary(str(pred_dir), str(dest), fmt, classes, mapper_name)

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".export-tmp", dir=dest.parent))
    try:
        writer = build_writer(fmt, tmp, names.categories, options)
        for pred in tqdm(source, desc=f"exporting {fmt}", unit="img", disable=None if progress else True):
            if isinstance(pred, Skipped):
                summary.skip(pred.stem, pred.reason)
                continue
            categories = names.relabel(pred.label_map, pred.vocabulary)
            categories, dropped = drop_small_regions(categories, min_area)
            try:
                writer.add(ExportImage(pred.stem, pred.image, categories))
            except SkipImage as e:
                summary.skip(pred.stem, str(e))
                continue
            summary.add_image(pred.label_map, pred.vocabulary, categories, names.categories.names, dropped)
        writer.finish()
        summary.name_to_category = {name: names.class_of(name) for name in summary.name_pixels}
        report = summary.to_dict()
        atomic_write_json(tmp / SUMMARY, report)
        _replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report["text"] = summary.text()
    return report


def _replace(tmp: Path, dest: Path) -> None:
    """Rename the finished ``tmp`` folder to ``dest``, moving an existing ``dest`` aside first and deleting it after."""
    if not os.path.lexists(dest):
        os.rename(tmp, dest)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
    aside = old / "previous"
    os.rename(dest, aside)
    try:
        os.rename(tmp, dest)
    except BaseException:
        os.rename(aside, dest)
        raise
    if aside.is_dir() and not aside.is_symlink():
        shutil.rmtree(old)
    else:
        aside.unlink()
        old.rmdir()

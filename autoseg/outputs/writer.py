"""The one writer of per-image outputs, used by ``infer.py`` and ``eval.py`` in one process and on many devices."""

from __future__ import annotations

import contextlib
import errno
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image

from autoseg.outputs.files import Prediction, prediction_complete, write_prediction
from autoseg.outputs.manifest import RunManifest

log = logging.getLogger("autoseg.outputs")

FATAL_WRITE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


class OutputWriteError(OSError):
    """Outputs cannot be written at all (disk full, read-only file system): the run stops, finished sets are kept."""


def plan_outputs(
    files: Sequence[tuple[Path, Path]], out_dir: Path, skip_existing: bool
) -> tuple[list[dict], list[tuple[Path, Path, dict]]]:
    """One manifest entry per ``(file, output stem)`` and the ``(file, stem, entry)`` still to do.

    With ``skip_existing``, an input whose output set is complete (:func:`prediction_complete`) is marked done with
    its vocabulary; an incomplete set is redone.
    """
    entries: list[dict] = []
    todo: list[tuple[Path, Path, dict]] = []
    for file, stem in files:
        entry = {"input": str(file), "output": Path(stem).as_posix(), "status": "pending"}
        entries.append(entry)
        vocabulary = prediction_complete(out_dir, stem) if skip_existing else None
        if vocabulary is not None:
            entry.update(status="ok", skipped=True, vocabulary=vocabulary)
        else:
            todo.append((file, stem, entry))
    return entries, todo


class SegmentationWriter:
    """Segments batches and commits each image's output set, recording every input's final status in ``run``.

    Args:
        out_dir: the output folder.
        run: the entered, started :class:`RunManifest` of this process.
    """

    def __init__(self, out_dir: Path, run: RunManifest):
        self.out_dir = Path(out_dir)
        self.run = run

    def fail(self, entry: dict, reason: str) -> None:
        """Record an input that could not be processed (e.g. an unreadable file) and go on."""
        entry.update(status="error", reason=reason)
        self.run.record(entry)
        log.warning("skipped %s", reason)

    def __call__(
        self,
        pipeline: Callable[[list[Image.Image]], list[Prediction]],
        batch: list[tuple[Image.Image, Path, Path, dict]],
    ) -> None:
        """Segment ``(image, file, stem, entry)`` items with ``pipeline``; if the batch fails, retry image by image.

        Raises:
            OutputWriteError: the disk is full or read-only (the image being written is removed, the entry recorded).
        """
        if not batch:
            return
        t0 = time.perf_counter()
        try:
            preds = pipeline([b[0] for b in batch])
        except Exception:  # noqa: BLE001 - isolate the failing image below
            if len(batch) > 1:
                for item in batch:
                    self(pipeline, [item])
                return
            _, file, _, entry = batch[0]
            log.exception("failed on %s", file)
            self.fail(entry, f"{file}: pipeline failed ({sys.exc_info()[1]!r})")
            return
        seconds = (time.perf_counter() - t0) / len(batch)
        for (image, file, stem, entry), pred in zip(batch, preds, strict=True):
            pred.extra["seconds"] = round(seconds, 3)
            self.commit(image, file, stem, entry, pred)

    def commit(self, image: Image.Image, file: Path | str, stem: Path | str, entry: dict, pred: Prediction) -> None:
        """Write one image's output set and record its final status.

        Raises:
            OutputWriteError: the disk is full or read-only (the set is removed, the entry recorded).
        """
        try:
            write_prediction(self.out_dir, stem, image, str(file), pred)
            entry.update(status="ok", vocabulary=pred.vocabulary)
        except OSError as e:
            entry.update(status="error", reason=f"{file}: could not write outputs ({e})")
            if e.errno in FATAL_WRITE_ERRORS:
                with contextlib.suppress(OSError):
                    self.run.record(entry)
                raise OutputWriteError(
                    e.errno,
                    f"cannot write to {self.out_dir} ({e.strerror}); the images finished before are complete: "
                    "make room and rerun with --skip-existing",
                ) from e
        self.run.record(entry)

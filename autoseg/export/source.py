"""Read a prediction folder (``infer.py`` / ``eval.py`` outputs) one set at a time, reporting what cannot be read.

The sets are those the run's ``manifest.jsonl`` lists as ``ok`` (inputs it lists as ``error`` are reported as skipped,
with infer.py's reason, and so are clips: their outputs are not exported); a folder without a manifest is scanned for
``NAME.json`` records instead. Only one set's label map is in memory at a time.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import UnidentifiedImageError

from autoseg.outputs import prediction_files, read_prediction, read_status_lines
from autoseg.outputs.files import RESERVED_STEMS


@dataclass
class PredictionSet:
    """One image's prediction as ``infer.py`` wrote it (label 0 = unlabelled, ``i`` = ``vocabulary[i - 1]``)."""

    stem: str
    image: str | None
    vocabulary: list[str]
    label_map: np.ndarray


@dataclass
class Skipped:
    """A prediction set that is not exported, and why (one line naming the file)."""

    stem: str
    reason: str


class PredictionSource:
    """The prediction sets of ``pred_dir``, streamed in a stable order.

    Raises:
        FileNotFoundError: ``pred_dir`` is not a folder.
    """

    def __init__(self, pred_dir: str | Path):
        self.pred_dir = Path(pred_dir)
        if not self.pred_dir.is_dir():
            raise FileNotFoundError(
                f"{self.pred_dir}: prediction folder not found (expected infer.py outputs NAME.png + NAME.json)"
            )

    def entries(self) -> Iterator[tuple[str, str | None]]:
        """``(stem, why it is skipped or None)`` per input: from the run's status lines, else the JSON records found."""
        lines = read_status_lines(self.pred_dir)
        if lines:
            for stem in sorted(lines):
                entry = lines[stem]
                if entry.get("kind") == "clip":
                    yield stem, f"{entry.get('input', stem)}: a clip (label maps in {stem}/), not exported yet"
                elif entry.get("status") == "ok":
                    yield stem, None
                else:
                    reason = entry.get("reason") or f"{entry.get('input', stem)}: not segmented"
                    yield stem, f"not segmented by infer.py ({reason})"
            return
        for record in sorted(self.pred_dir.rglob("*.json")):
            rel = record.relative_to(self.pred_dir).with_suffix("")
            if any(part.startswith(".") for part in rel.parts):
                continue
            if len(rel.parts) == 1 and rel.name.lower() in RESERVED_STEMS:
                continue  # the run's manifest.json
            if len(rel.parts) == 1 and rel.name.rstrip("~").lower() in RESERVED_STEMS:
                rel = rel.with_name(rel.name[:-1])  # image "manifest" is written as manifest~.json
            yield rel.as_posix(), None

    def vocabularies(self) -> Iterator[list[str]]:
        """The vocabulary of every readable set (JSON records only; no label map is read)."""
        for stem, error in self.entries():
            if error is None:
                try:
                    yield self._record(stem)["vocabulary"]
                except (OSError, ValueError):
                    continue  # reported when the set itself is read

    def __iter__(self) -> Iterator[PredictionSet | Skipped]:
        """Each set in turn, or a :class:`Skipped` saying why it cannot be exported."""
        for stem, error in self.entries():
            if error is not None:
                yield Skipped(stem, error)
                continue
            try:
                record = self._record(stem)
                label_map, vocabulary = read_prediction(self.pred_dir, stem, record["vocabulary"])
            except (OSError, ValueError, UnidentifiedImageError) as e:
                yield Skipped(stem, str(e))
                continue
            size = record.get("size")
            if isinstance(size, list) and list(size) != [label_map.shape[1], label_map.shape[0]]:
                png = prediction_files(self.pred_dir, stem)["label_map"]
                yield Skipped(
                    stem, f"{png}: label map is {label_map.shape[1]}x{label_map.shape[0]}, record says {size}"
                )
                continue
            image = record.get("image")
            yield PredictionSet(stem, image if isinstance(image, str) else None, vocabulary, label_map)

    def _record(self, stem: str) -> dict:
        """The JSON record of ``stem`` with a checked vocabulary.

        Raises:
            ValueError / OSError: missing, malformed, or its vocabulary is not a list of names (naming the file).
        """
        path = prediction_files(self.pred_dir, stem)["record"]
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: prediction record missing (an interrupted infer.py run?)") from None
        vocabulary = record.get("vocabulary") if isinstance(record, dict) else None
        if not isinstance(vocabulary, list) or not all(isinstance(v, str) for v in vocabulary):
            raise ValueError(f"{path}: expected a JSON object with a 'vocabulary' list of names")
        return record

"""Persistent, versioned cache of name -> class mappings, keyed by (dataset, backend, model, name).

The file is JSON, rewritten atomically, so a crash leaves the previous complete file. Every entry keeps the
backend's raw answer so that a mapping can be audited later::

    {"format": "autoseg-lave-cache", "version": 1,
     "entries": [{"dataset": "voc20", "backend": "llm", "model": "...", "name": "puppy", "class": "dog",
                  "raw": "'dog'"}, ...]}
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from autoseg.utils.io import atomic_write_json

CACHE_FORMAT = "autoseg-lave-cache"
CACHE_VERSION = 1

Key = tuple[str, str, str, str]


class MappingCache:
    """Name mappings of earlier runs; ``path=None`` keeps them in memory only.

    Args:
        path: the JSON file; read if it exists, created by :meth:`save`.

    Raises:
        ValueError: the file exists but is not a cache of this format and version (the message says what to do).
    """

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path is not None else None
        self._entries: dict[Key, dict[str, Any]] = {}
        self.dirty = False
        if self.path is not None and self.path.exists():
            self._load(self.path)

    def _load(self, path: Path) -> None:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a readable LAVE cache ({e}); delete it or pass another cache path") from e
        if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
            raise ValueError(f"{path}: not a LAVE cache (expected format {CACHE_FORMAT!r}); pass another cache path")
        if data.get("version") != CACHE_VERSION:
            raise ValueError(
                f"{path}: LAVE cache version {data.get('version')!r}, this code reads version {CACHE_VERSION}; "
                "move the file away to rebuild the cache"
            )
        for e in data.get("entries", []):
            self._entries[(e["dataset"], e["backend"], e["model"], e["name"])] = e

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, dataset: str, backend: str, model: str, name: str) -> dict[str, Any] | None:
        """The stored entry (``class`` is a class name or None, ``raw`` the backend answer), or None."""
        return self._entries.get((dataset, backend, model, name))

    def put(self, dataset: str, backend: str, model: str, name: str, cls: str | None, raw: Any) -> None:
        self._entries[(dataset, backend, model, name)] = {
            "dataset": dataset,
            "backend": backend,
            "model": model,
            "name": name,
            "class": cls,
            "raw": raw,
        }
        self.dirty = True

    def save(self) -> None:
        """Write the file atomically (nothing to do in memory-only mode or when nothing changed)."""
        if self.path is None or not self.dirty:
            return
        entries = [self._entries[k] for k in sorted(self._entries)]
        atomic_write_json(self.path, {"format": CACHE_FORMAT, "version": CACHE_VERSION, "entries": entries})
        self.dirty = False

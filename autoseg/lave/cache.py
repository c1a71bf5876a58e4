"""Persistent, versioned cache of name -> class mappings, keyed by (dataset, backend, model, name).

The file is JSON, rewritten atomically, so a crash leaves the previous complete file. Every entry keeps the
backend's raw answer (the first :data:`MAX_RAW_CHARS` characters) so that a mapping can be audited later::

    {"format": "autoseg-lave-cache", "version": 1,
     "entries": [{"dataset": "voc20", "backend": "llm", "model": "...", "name": "puppy", "class": "dog",
                  "raw": "'dog'"}, ...]}

Several processes may share one file: :meth:`MappingCache.save` merges with what is on disk under an exclusive lock
on the sibling file ``<name>.lock``, so no process loses another's entries.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from autoseg.utils.io import atomic_write_json

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: saves are atomic but not merged under a lock
    fcntl = None

log = logging.getLogger(__name__)

CACHE_FORMAT = "autoseg-lave-cache"
CACHE_VERSION = 1
MAX_RAW_CHARS = 2000  # raw answers are stored up to this many characters (cache file and mapping records)

Key = tuple[str, str, str, str]
_KEY_FIELDS = ("dataset", "backend", "model", "name")


def clip_raw(raw: Any, limit: int = MAX_RAW_CHARS) -> Any:
    """A raw backend answer as stored: text beyond ``limit`` characters is cut, with a note of the full length."""
    if isinstance(raw, str) and len(raw) > limit:
        return raw[:limit] + f" [... truncated: {len(raw)} characters in all]"
    return raw


def _entry_problem(e: Any) -> str | None:
    """Why ``e`` is not a cache entry, or None when it is one."""
    if not isinstance(e, dict):
        return f"a {type(e).__name__}, not an object"
    bad = [k for k in _KEY_FIELDS if not isinstance(e.get(k), str)]
    if bad:
        return f"missing or non-string {bad}"
    if "class" not in e or not (e["class"] is None or isinstance(e["class"], str)):
        return "'class' missing or neither a string nor null"
    return None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive inter-process lock on ``<path>.lock`` (blocking)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as f:
        if fcntl is not None:
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(f, fcntl.LOCK_UN)


class MappingCache:
    """Name mappings of earlier runs; ``path=None`` keeps them in memory only.

    Malformed entries (valid JSON of the wrong shape) are skipped with a warning that names the file and the entry,
    so their names are asked again; the rest of the file is used and kept.

    Args:
        path: the JSON file; read if it exists, created by :meth:`save`.

    Raises:
        ValueError: the file exists but is not a cache of this format and version (the message says what to do).
    """

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path is not None else None
        self._entries: dict[Key, dict[str, Any]] = {}
        self._new: set[Key] = set()  # put since the last save: these win over the file when merging
        if self.path is not None and self.path.exists():
            self._entries = self._read(self.path)

    @property
    def dirty(self) -> bool:
        """Whether entries were put since the last save."""
        return bool(self._new)

    @staticmethod
    def _read(path: Path) -> dict[Key, dict[str, Any]]:
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
        entries = data.get("entries", [])
        if not isinstance(entries, list):
            raise ValueError(f"{path}: 'entries' is a {type(entries).__name__}, expected a list; fix or delete it")
        out: dict[Key, dict[str, Any]] = {}
        for i, e in enumerate(entries):
            problem = _entry_problem(e)
            if problem is not None:
                log.warning(
                    "%s: LAVE cache entry %d skipped (%s; expected an object with string %s and 'class' a string or "
                    "null): %.200s; its name will be asked again and the entry replaced",
                    path, i, problem, list(_KEY_FIELDS), json.dumps(e, ensure_ascii=False),
                )  # fmt: skip
                continue
            out[tuple(e[k] for k in _KEY_FIELDS)] = {**e, "raw": e.get("raw", "")}
        return out

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, dataset: str, backend: str, model: str, name: str) -> dict[str, Any] | None:
        """The stored entry (``class`` is a class name or None, ``raw`` the backend answer), or None."""
        return self._entries.get((dataset, backend, model, name))

    def put(self, dataset: str, backend: str, model: str, name: str, cls: str | None, raw: Any) -> None:
        """Store a final mapping (``raw`` is clipped to :data:`MAX_RAW_CHARS` characters)."""
        key = (dataset, backend, model, name)
        self._entries[key] = {
            "dataset": dataset,
            "backend": backend,
            "model": model,
            "name": name,
            "class": cls,
            "raw": clip_raw(raw),
        }
        self._new.add(key)

    def save(self) -> None:
        """Merge with the file as it is now and write it atomically, under the lock (no-op if nothing is new).

        Entries put since the last save win over the file, the file's entries (saved meanwhile by other processes,
        which are loaded too) over older ones in memory.

        Raises:
            ValueError: the file on disk became unreadable; it is left as it is.
        """
        if self.path is None or not self._new:
            return
        with _locked(self.path):
            merged = {**self._entries, **(self._read(self.path) if self.path.exists() else {})}
            merged.update({k: self._entries[k] for k in self._new})
            entries = [merged[k] for k in sorted(merged)]
            atomic_write_json(self.path, {"format": CACHE_FORMAT, "version": CACHE_VERSION, "entries": entries})
        self._entries = merged
        self._new.clear()

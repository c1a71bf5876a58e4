"""The bookkeeping of a run into an output folder: a lock, per-input status lines, ``manifest.json``."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import stat
from pathlib import Path
from typing import Any

from autoseg.utils.io import atomic_write_json, atomic_write_text, json_text, remove_stale_temporaries


class OutputBusyError(ValueError):
    """Another run holds the output folder."""


class RunManifest:
    """Bookkeeping of one run into an output folder, linear in the number of inputs and safe against kills.

    - ``.autoseg.lock``: an exclusive lock held by the run's first process (rank 0) for the whole run; a second run
      into the same folder is refused (:class:`OutputBusyError`) instead of interleaving its files and manifest with
      the first. The kernel drops the lock when the process dies, so a killed run never blocks its resume; a run that
      ends removes the file (while still holding the lock).
    - ``manifest.jsonl`` (``manifest.rankR.jsonl`` for the other processes of a multi-device run): one line per input
      as soon as its status is final, appended (O(N) bytes in all); it survives a kill. Rank 0 folds the other ranks'
      files into ``manifest.jsonl`` when the next run starts.
    - ``manifest.json`` (rank 0): ``{**extra, "complete": bool, "inputs": [...]}`` written at the start of a run
      (inputs ``pending`` or already done) and again at the end, merged with earlier runs' entries for other outputs.

    Use as a context manager; :meth:`start` with this run's entries (and :meth:`add` for more kinds of input, e.g.
    clips beside images), :meth:`record` per finished input, :meth:`finish`.

    Args:
        out_dir: the output folder.
        extra: fields written at the top of ``manifest.json`` (e.g. the resolved config).
        rank: this process's global rank in a multi-device run (0 for a single process).
    """

    LOCK, LINES, MANIFEST = ".autoseg.lock", "manifest.jsonl", "manifest.json"

    def __init__(self, out_dir: str | Path, extra: dict[str, Any] | None = None, rank: int = 0):
        self.out_dir = Path(out_dir)
        self.extra = dict(extra or {})
        self.rank = rank
        self.entries: list[dict] = []
        self.added: list[dict] = []  # entries of :meth:`add`, listed after :meth:`start`'s
        self.earlier: dict[str, dict] = {}
        self.recorded: dict[str, dict] = {}  # this process's status lines of this run
        self._lock = None
        self._lines = None
        self._entered = False

    @property
    def lines_path(self) -> Path:
        return self.out_dir / (self.LINES if self.rank == 0 else f"manifest.rank{self.rank}.jsonl")

    def __enter__(self) -> RunManifest:
        """Take the folder (rank 0: its lock) and read the earlier runs' statuses.

        Raises:
            OutputBusyError: another run holds the folder.
            ValueError: the lock or a status file is a symbolic link or another file's hard link (never followed).
        """
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._entered = True
        if self.rank != 0:
            _refuse_links([self.lines_path])
            return self
        self._lock = _take_lock(self.out_dir / self.LOCK, self.out_dir)
        try:
            _refuse_links([self.out_dir / self.LINES, *_rank_files(self.out_dir)])
            remove_stale_temporaries(self.out_dir / self.MANIFEST)
            remove_stale_temporaries(self.out_dir / self.LINES)
            self.earlier = read_status_lines(self.out_dir)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        """Close the status file; rank 0 removes the lock file while still holding the lock, then releases it."""
        if self._lines is not None:
            self._lines.close()
        if self._lock is not None:
            _drop_lock(self.out_dir / self.LOCK, self._lock)
        self._lines = self._lock = None

    def start(self, entries: list[dict]) -> None:
        """Register this run's entries (the same dicts are updated in place) and write the first manifest.

        Rank 0 also folds the status files of an earlier multi-device run into ``manifest.jsonl``; call it before the
        other ranks start.
        """
        assert self._entered, "use RunManifest as a context manager"
        self.entries = entries
        if self.rank == 0:
            self._write_manifest(complete=False)
            rank_files = _rank_files(self.out_dir)
            if rank_files:
                text = "".join(json_text(e) + "\n" for e in self.earlier.values())
                atomic_write_text(self.out_dir / self.LINES, text)
                for f in rank_files:
                    f.unlink()
        self._lines = _open_for_append(self.lines_path)

    def record(self, entry: dict) -> None:
        """Append the final status of one input (one ``write`` of one line: a kill leaves whole lines)."""
        self._lines.write(json_text(entry) + "\n")
        self._lines.flush()
        self.recorded[entry["output"]] = dict(entry)

    def finish(self, complete: bool = True) -> None:
        """Rank 0: take the other ranks' statuses and write the final manifest (``complete`` False: stopped early).

        Call it after every rank has finished (a barrier); the other ranks' calls do nothing.
        """
        if self.rank != 0:
            return
        done = dict(self.recorded)  # entries may have been copied on their way through a data loader
        for f in _rank_files(self.out_dir):
            done.update(_read_lines(f))
        for entry in self.entries + self.added:
            if entry["status"] == "pending" and entry["output"] in done:
                entry.update(done[entry["output"]])
        self._write_manifest(complete and all(e["status"] != "pending" for e in self.entries + self.added))

    def add(self, entries: list[dict]) -> None:
        """Register more inputs of this run (e.g. its clips beside its images; the same dicts are updated in place).

        They are listed ``pending`` in ``manifest.json`` until :meth:`record` gives their status, and the run is not
        ``complete`` before they have one. Added before :meth:`start`, they are listed from its first manifest on;
        after it, the manifest is rewritten at once.
        """
        self.added.extend(entries)
        if self._lines is not None and self.rank == 0:
            self._write_manifest(complete=False)

    def _write_manifest(self, complete: bool) -> None:
        mine = {e["output"] for e in self.entries + self.added}
        others = [e for key, e in self.earlier.items() if key not in mine]
        inputs = self.entries + self.added + others
        atomic_write_json(self.out_dir / self.MANIFEST, {**self.extra, "complete": complete, "inputs": inputs})


def read_status_lines(out_dir: str | Path) -> dict[str, dict]:
    """The last status line per output in ``out_dir``'s ``manifest.jsonl`` and ``manifest.rankR.jsonl`` files."""
    out = _read_lines(Path(out_dir) / RunManifest.LINES)
    for f in _rank_files(out_dir):  # left by a killed multi-device run, newer than manifest.jsonl
        out.update(_read_lines(f))
    return out


def _rank_files(out_dir: str | Path) -> list[Path]:
    return sorted(Path(out_dir).glob("manifest.rank*.jsonl"))


def _read_lines(path: Path) -> dict[str, dict]:
    """The last line per output of one status file (a torn last line from a kill is ignored)."""
    out: dict[str, dict] = {}
    if not path.is_file():
        return out
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("output"), str):
            out[entry["output"]] = entry
    return out


def _open_own(path: Path, flags: int) -> int:
    """``os.open`` of a file of the run's own that is never a symbolic link (O_NOFOLLOW, also when it creates it).

    Raises:
        ValueError: ``path`` is a symbolic link, not a regular file, or a hard link of another file.
    """
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ValueError(_link_message(path, "is a symbolic link")) from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        what = "is not a regular file" if not stat.S_ISREG(st.st_mode) else "is a hard link shared with another file"
        raise ValueError(_link_message(path, what))
    return fd


def _link_message(path: Path, what: str) -> str:
    return (
        f"{path}: {what}; an AutoSeg run writes its own file there and follows no links (it could overwrite the file "
        "linked to): remove it and rerun"
    )


def _refuse_links(paths: list[Path]) -> None:
    """Refuse status files that are symbolic links before anything is read or written (see :func:`_open_own`)."""
    for path in paths:
        if path.is_symlink():
            raise ValueError(_link_message(path, "is a symbolic link"))


def _take_lock(path: Path, out_dir: Path) -> int:
    """The descriptor of ``path`` locked exclusively, with this process's PID written in it.

    A finishing run removes its lock file while holding the lock, so a file opened just before that removal may be an
    orphan by the time it is locked: the lock counts only if ``path`` still names the locked file, else it is retried.

    Raises:
        OutputBusyError: another run holds the lock (the message gives its PID).
        ValueError: ``path`` is a link (see :func:`_open_own`).
    """
    while True:
        fd = _open_own(path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise OutputBusyError(
                f"output folder {out_dir} is in use by another AutoSeg run (pid {holder}); wait for it to finish "
                "or choose another folder"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        if _names(path, fd):
            break
        os.close(fd)  # an orphan: its run removed it after this open; lock whatever the path names now
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def _names(path: Path, fd: int) -> bool:
    """Whether ``path`` (not followed) is the file open as ``fd``."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _drop_lock(path: Path, fd: int) -> None:
    """Remove the lock file while still holding its lock (no other run can hold it meanwhile), then release it."""
    try:
        if _names(path, fd):
            path.unlink()
    except OSError:
        pass  # a lock file left behind is harmless: the lock itself is what counts
    finally:
        os.close(fd)


def _open_for_append(path: Path):
    """Open a status file for appending; a line torn by a kill is ended first so the next one starts on its own.

    Raises:
        ValueError: ``path`` is a link (see :func:`_open_own`).
    """
    fd = _open_own(path, os.O_RDWR | os.O_APPEND)
    try:
        size = os.fstat(fd).st_size
        torn = size > 0 and os.pread(fd, 1, size - 1) != b"\n"
        handle = os.fdopen(fd, "a", encoding="utf-8")  # closed by RunManifest.__exit__
    except BaseException:
        os.close(fd)
        raise
    if torn:
        handle.write("\n")
        handle.flush()
    return handle

"""Small file helpers shared by the entry points: atomic writes and robust image reading."""

from __future__ import annotations

import glob
import json
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
# Largest image (width x height) read by default: a 50 MP camera frame fits; decoding one pixel costs ~70 bytes
# through the pipeline (a 9400 x 9400 image took 5.9 GB), and a tiny PNG can declare 30000 x 30000.
DEFAULT_MAX_PIXELS = 64_000_000


class ImageReadError(ValueError):
    """An input file could not be read as an image; the message names the file and the reason."""


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Write a file atomically: ``write(tmp_path)`` fills a temporary file that then replaces ``path``.

    A crash or an exception leaves either the old file or none, never a half-written one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; a finished file gets the mode open() would give
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def remove_stale_temporaries(path: str | os.PathLike) -> None:
    """Delete what a killed :func:`atomic_write` of ``path`` left behind (call only while nobody writes ``path``)."""
    path = Path(path)
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp{glob.escape(path.suffix)}"):
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 text atomically; a lone surrogate (an undecodable file-name byte) is written as ``\\udcXX``."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8", errors="backslashreplace"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON (:func:`json_text`) atomically."""
    return atomic_write_text(path, json_text(obj, indent=2) + "\n")


_SURROGATE = re.compile("[\ud800-\udfff]")


def json_text(obj: Any, indent: int | None = None) -> str:
    """``obj`` as JSON text that always encodes as UTF-8 and reads back equal, non-ASCII names kept readable.

    A file name that is not valid UTF-8 reaches Python with each undecodable byte as a lone surrogate
    (``os.fsdecode``: ``b"\\xff"`` -> ``"\\udcff"``), which UTF-8 cannot encode; it is written as the JSON escape
    ``\\udcff``, which ``json.loads`` turns back into the same string (and ``os.fsencode`` into the same bytes).
    """
    text = json.dumps(obj, indent=indent, ensure_ascii=False)
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def save_image_atomic(path: str | os.PathLike, image: Image.Image, **save_kwargs: Any) -> Path:
    """Save a PIL image atomically; the format follows ``path``'s extension."""
    fmt = Image.registered_extensions().get(Path(path).suffix.lower())
    return atomic_write(path, lambda tmp: image.save(tmp, format=fmt, **save_kwargs))


def _to_8bit(image: Image.Image) -> Image.Image:
    """Scale 16-bit / 32-bit integer and float images to 8-bit grayscale by their value range.

    A float image is scaled by the range of its finite pixels (and at least 0 .. 1); NaN and infinite pixels are black.

    Raises:
        ValueError: a float image has no finite pixel.
    """
    arr = np.asarray(image).astype(np.float64)
    if image.mode.startswith("I;16") or (image.mode == "I" and arr.max(initial=0) > 255):
        arr = arr / 65535.0 if arr.max(initial=0) <= 65535 else arr / arr.max()
    elif image.mode == "F":
        finite = np.isfinite(arr)
        if arr.size and not finite.any():
            raise ValueError("float image without a finite pixel (all NaN or infinite): nothing to segment")
        lo, hi = float(arr[finite].min(initial=0)), float(arr[finite].max(initial=1))
        arr = (np.where(finite, arr, lo) - lo) / (hi - lo)  # NaN and infinite pixels: black
    else:
        arr = arr / 255.0
    return Image.fromarray(np.clip(np.round(arr * 255.0), 0, 255).astype(np.uint8), mode="L")


def load_image(path: str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Read an image file as 8-bit RGB, honouring EXIF orientation.

    Grayscale, palette, RGBA (composited on white), CMYK and 16-bit/float images are converted.

    Args:
        path: the image file.
        max_pixels: refuse images with more pixels (width x height) than this, before decoding them (None: no limit
            of our own; Pillow's decompression-bomb limit still applies).

    Raises:
        ImageReadError: the file is missing, not an image, truncated or too large; the message names the file.
    """
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise ImageReadError(f"{path}: broken symbolic link (its target {os.readlink(path)} does not exist)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit below says it better
            with Image.open(path) as im:
                if max_pixels is not None and im.width * im.height > max_pixels:
                    raise ImageReadError(
                        f"{path}: image is {im.width} x {im.height} = {im.width * im.height:,} pixels, more than the "
                        f"limit of {max_pixels:,} (raise it with --max-pixels, or downscale the image)"
                    )
                im.load()
                im = ImageOps.exif_transpose(im)
    except FileNotFoundError as e:
        raise ImageReadError(f"{path}: file not found") from e
    except Image.DecompressionBombError as e:
        raise ImageReadError(f"{path}: image too large to decode safely ({e})") from e
    except ImageReadError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageReadError(f"{path}: not a readable image ({type(e).__name__}: {e})") from e
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        try:
            im = _to_8bit(im)
        except ValueError as e:
            raise ImageReadError(f"{path}: {e}") from e
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, rgba)
    if im.mode != "RGB":
        im = im.convert("RGB")
    return im


def find_images(paths: Iterable[str | os.PathLike]) -> list[tuple[Path, Path]]:
    """Expand files and folders (recursively) into ``(file, relative_stem)`` pairs, in a stable order.

    For a folder argument, ``relative_stem`` keeps the sub-folders under it; for a file it is the bare stem.
    Every non-hidden file is returned, whatever its extension, so that a non-image in an input folder is
    reported by the caller rather than silently dropped; so is a broken symbolic link.

    Raises:
        FileNotFoundError: a path does not exist.
    """
    found: list[tuple[Path, Path]] = []
    for p in map(Path, paths):
        if p.is_dir():
            files = sorted(
                f
                for f in p.rglob("*")
                if (f.is_file() or (f.is_symlink() and not f.exists()))
                and not any(part.startswith(".") for part in f.relative_to(p).parts)
            )
            found += [(f, f.relative_to(p).with_suffix("")) for f in files]
        elif p.is_file():
            found.append((p, Path(p.stem)))
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    return found


def safe_relative(stem: str | os.PathLike, what: str = "name") -> Path:
    """``stem`` as a relative path that stays inside whatever folder it is joined to.

    Raises:
        ValueError: ``stem`` is empty, absolute, or has a ``..`` part (it would escape the output folder).
    """
    p = Path(stem)
    if not str(stem) or p.is_absolute() or p.anchor or ".." in p.parts or p == Path("."):
        raise ValueError(
            f"{what} {str(stem)!r}: expected a relative name without '..' (it must stay inside its folder)"
        )
    return p


def check_apart(
    output: str | os.PathLike,
    inputs: Sequence[str | os.PathLike],
    what_inputs: str,
    what_output: str,
    may_contain: bool = False,
) -> None:
    """Refuse an output folder that would mix with the inputs, so that outputs never touch (or are read as) inputs.

    An input folder (searched recursively) and the output folder must be disjoint: the output folder may not be it,
    be inside it (a resumed run would read its own outputs) or contain it. An input file may not lie anywhere in the
    output folder (an output could overwrite it); a file's own folder may hold the output folder. Paths are compared
    with symbolic links resolved (``os.path.realpath``; the output folder need not exist yet); a linked input file
    counts both where its link is and where it points. Folders sharing a name prefix (``img`` and ``img2``) are apart.

    Args:
        output: the output folder.
        inputs: input files and folders as given (a path that does not exist counts as a file).
        what_inputs: how messages call the inputs, e.g. "input" or "dataset".
        what_output: how messages call the output folder, e.g. "output folder".
        may_contain: the output folder may hold an input folder (its writes stay at its top level, never inside the
            input folder: a report, or predictions named by a dataset's image ids).

    Raises:
        ValueError: one line naming both paths.
    """
    out = os.path.realpath(output)
    shown_out = _shown(output, out)
    for given in inputs:
        real = os.path.realpath(given)
        if os.path.isdir(given):
            how = "is inside" if _within(out, real) else "contains" if _within(real, out) and not may_contain else ""
            if how:
                how = "is" if out == real else how
                raise ValueError(
                    f"{what_output} {shown_out} {how} {what_inputs} folder {_shown(given, real)}: outputs would be "
                    "read back as inputs or overwrite them; choose a folder apart from the inputs"
                )
            continue
        linked_at = os.path.join(os.path.realpath(os.path.dirname(os.path.abspath(given))), os.path.basename(given))
        if _within(real, out) or _within(linked_at, out):
            raise ValueError(
                f"{what_output} {shown_out} holds {what_inputs} file {_shown(given, real)}: an output could overwrite "
                "it; choose a folder apart from the inputs"
            )


def _within(path: str, folder: str) -> bool:
    """Whether absolute, normalised ``path`` is ``folder`` or inside it (by whole path components)."""
    return os.path.commonpath([path, folder]) == folder


def _shown(given: str | os.PathLike, real: str) -> str:
    return str(given) if os.path.abspath(given) == real else f"{given} (= {real})"


def prepare_output_dir(path: str | os.PathLike, what: str = "output folder") -> Path:
    """Create ``path`` (with parents) and check that files can be written in it, before any work is done.

    Raises:
        ValueError: ``path`` is an existing file, or cannot be created or written (the message says why).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {path}: exists and is not a folder; give a folder path")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".autoseg-write-check.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"{what} {path}: cannot write there ({e.strerror or e}); choose a writable folder") from e
    return path

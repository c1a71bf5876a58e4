"""WebDataset tar shards of segmentation samples: a converter from the generic folder format, and a reader.

A sample in a shard is a group of tar members sharing a key (the image's relative stem):

- ``KEY.image.png`` or ``KEY.image.jpg``: the image bytes (PNG/JPEG files are copied unchanged; other formats and
  modes that need conversion are re-encoded as RGB PNG exactly as ``autoseg.utils.io.load_image`` reads them);
- ``KEY.mask.png``: the single-channel mask, copied unchanged (value = class id, 255 = ignore);
- ``KEY.caption.json``: the captions dict, when ``captions/NAME.json`` exists;
- ``KEY.name.txt``: the original name, only when it differs from the key (webdataset splits a member name at the
  first dot of its basename, so dots in a name are replaced by ``_`` in the key).

Shards are named ``shard-%06d.tar``; ``classes.txt`` is copied next to them. Note that ``webdataset.ShardWriter``
formats its file names with ``pattern % shard_number``, so the pattern must be a ``str`` (not a ``Path``) holding
one ``%d``-style field; here each shard is written under a temporary name and renamed when complete.

Reading (``shard_dataset``) skips a bad sample (unreadable image, mask of another size, missing member, broken tar)
with a logged warning naming the shard and the key, and raises :class:`TooManyBadSamples` once more than
``max_bad_fraction`` of the samples read were bad (see :class:`SkipBadSamples`).

CLI: ``python -m autoseg.data.shards --folder DIR [--out DIR/shards] [--maxcount N]``.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image, ImageOps
from tqdm import tqdm

from autoseg.utils.io import IMAGE_EXTENSIONS, atomic_write, find_images, load_image

logger = logging.getLogger(__name__)

SHARD_PATTERN = "shard-%06d.tar"
MIN_SAMPLES = 100  # samples read before the bad fraction is checked: one early bad sample does not abort a run
MASK_MODES = ("L", "P", "I", "I;16", "I;16B", "I;16L")
_RAW_IMAGE_FORMATS = {"PNG": "png", "JPEG": "jpg"}


def folder_samples(folder: str | os.PathLike) -> list[tuple[str, Path, Path, Path | None]]:
    """Samples of a generic-format folder: ``(name, image, mask, captions or None)`` in a stable order.

    The folder holds ``images/NAME.<ext>``, ``masks/NAME.png`` and optionally ``captions/NAME.json`` (NAME may
    contain sub-folders).

    Raises:
        FileNotFoundError: ``images/`` is missing or empty, or an image has no mask.
    """
    folder = Path(folder)
    images_dir = folder / "images"
    if not images_dir.is_dir():
        raise FileNotFoundError(f"{images_dir}: no images folder; expected DIR/images/NAME.png and DIR/masks/NAME.png")
    samples = []
    for path, stem in find_images([images_dir]):
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        name = stem.as_posix()
        mask = folder / "masks" / f"{name}.png"
        if not mask.is_file():
            raise FileNotFoundError(f"{mask}: no mask for image {path}; every images/NAME.* needs masks/NAME.png")
        captions = folder / "captions" / f"{name}.json"
        samples.append((name, path, mask, captions if captions.is_file() else None))
    if not samples:
        raise FileNotFoundError(f"{images_dir}: no images (extensions {', '.join(IMAGE_EXTENSIONS)})")
    return samples


def _image_entry(path: Path) -> tuple[str, bytes]:
    """``("image.png" | "image.jpg", bytes)``: the file itself if the reader gets the same pixels from it."""
    with Image.open(path) as im:
        fmt, mode = im.format, im.mode
    if fmt in _RAW_IMAGE_FORMATS and mode in ("RGB", "L"):
        return f"image.{_RAW_IMAGE_FORMATS[fmt]}", path.read_bytes()
    buf = io.BytesIO()
    load_image(path).save(buf, format="PNG")
    return "image.png", buf.getvalue()


def _check_mask(path: Path, image: Path) -> None:
    with Image.open(path) as m, Image.open(image) as im:
        if m.format != "PNG" or m.mode not in MASK_MODES:
            raise ValueError(
                f"{path}: mask is {m.format} mode {m.mode}; expected a single-channel PNG (mode {'/'.join(MASK_MODES)})"
            )
        size = im.size[::-1] if im.getexif().get(0x0112, 1) in (5, 6, 7, 8) else im.size  # EXIF rotation by 90
        if m.size != size:
            raise ValueError(f"{path}: mask is {m.size[0]}x{m.size[1]} but image {image} is {size[0]}x{size[1]}")


def _sample_key(name: str) -> str:
    head, _, base = name.rpartition("/")
    base = base.replace(".", "_")
    return f"{head}/{base}" if head else base


def shard_files(out: str | os.PathLike) -> tuple[str, Path]:
    """``(pattern, folder)`` for an output spec: a folder (gets ``shard-%06d.tar``) or a ``%``-pattern."""
    out = str(out)
    if "%" in out:
        return out, Path(out).parent
    return str(Path(out) / SHARD_PATTERN), Path(out)


def write_shards(
    folder: str | os.PathLike,
    out: str | os.PathLike | None = None,
    maxcount: int = 1000,
    maxsize: float = 3e9,
    progress: bool = True,
) -> list[Path]:
    """Convert a generic-format folder to WebDataset shards.

    Args:
        folder: dataset folder (``images/``, ``masks/``, optional ``captions/`` and ``classes.txt``).
        out: a folder for ``shard-%06d.tar`` files (default ``folder/shards``) or a pattern such as
            ``/data/train-%04d.tar``.
        maxcount: most samples per shard.
        maxsize: most bytes per shard.
        progress: show a tqdm bar.

    Returns:
        The shard paths written, in order.

    Raises:
        FileNotFoundError: missing images folder or mask.
        ValueError: a mask is not a single-channel PNG of the image's size, or ``maxcount`` < 1.
    """
    if maxcount < 1:
        raise ValueError(f"maxcount={maxcount}: expected at least 1 sample per shard")
    folder = Path(folder)
    pattern, out_dir = shard_files(out if out is not None else folder / "shards")
    samples = folder_samples(folder)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def finish(tmp_name: str) -> None:
        final = Path(tmp_name).with_name(Path(tmp_name).name.removeprefix(".tmp-"))
        os.replace(tmp_name, final)
        written.append(final)

    tmp_pattern = str(Path(pattern).with_name(".tmp-" + Path(pattern).name))
    # mtime fixed so that the same folder always gives byte-identical shards.
    writer = wds.ShardWriter(tmp_pattern, maxcount=maxcount, maxsize=maxsize, post=finish, verbose=0, mtime=0.0)
    complete = False
    try:
        for name, image, mask, captions in tqdm(samples, desc=f"shards -> {out_dir}", disable=not progress):
            _check_mask(mask, image)
            key = _sample_key(name)
            ext, data = _image_entry(image)
            sample: dict[str, Any] = {"__key__": key, ext: data, "mask.png": mask.read_bytes()}
            if captions is not None:
                sample["caption.json"] = captions.read_bytes()
            if key != name:
                sample["name.txt"] = name.encode("utf-8")
            writer.write(sample)
        complete = True
    finally:
        if not complete:  # keep the shards already finished, drop the partial one
            writer.post = None
            partial = writer.fname
        writer.close()
        if not complete and partial:
            Path(partial).unlink(missing_ok=True)
    classes = folder / "classes.txt"
    if classes.is_file():
        atomic_write(out_dir / "classes.txt", lambda tmp: shutil.copyfile(classes, tmp))
    return written


class BadSampleError(ValueError):
    """A shard sample that cannot be decoded; the message names its key and shard."""


class TooManyBadSamples(RuntimeError):
    """More than the allowed fraction of the shard samples read were bad; the message is one line."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:  # webdataset's tar stages append (stream, url) to the args of exceptions passing by
        return self.message


@contextmanager
def _member(where: str, member: str) -> Iterator[None]:
    """Turn any error decoding ``member`` (PIL and json raise many types) into a :class:`BadSampleError`."""
    try:
        yield
    except BadSampleError:
        raise
    except Exception as e:
        raise BadSampleError(f"{where}: {member} unreadable ({type(e).__name__}: {e})") from e


def decode_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """Decode a raw webdataset sample.

    Returns:
        ``dict(image=PIL RGB, mask=H x W int64 array, name=str, captions=dict or None)``.

    Raises:
        BadSampleError: (a ``ValueError``) the sample has no image or mask, a member cannot be decoded, or the mask
            is not single-channel or not the image's size; the message names the key and the shard.
    """
    where = f"sample {sample.get('__key__')!r} of {sample.get('__url__', '?')}"
    ext = "image.png" if "image.png" in sample else "image.jpg"
    if ext not in sample or "mask.png" not in sample:
        found = sorted(k for k in sample if not k.startswith("__"))
        raise BadSampleError(f"{where}: expected members image.png|image.jpg and mask.png, found {found}")
    with _member(where, ext), Image.open(io.BytesIO(sample[ext])) as im:
        image = ImageOps.exif_transpose(im).convert("RGB")
    with _member(where, "mask.png"), Image.open(io.BytesIO(sample["mask.png"])) as m:
        if m.mode not in MASK_MODES:
            raise BadSampleError(f"{where}: mask mode {m.mode}; expected single-channel ({'/'.join(MASK_MODES)})")
        mask = np.asarray(m).astype(np.int64)
    if mask.shape != (image.height, image.width):
        raise BadSampleError(
            f"{where}: mask is {mask.shape[1]}x{mask.shape[0]} but the image is {image.width}x{image.height}"
        )
    with _member(where, "name.txt / caption.json"):
        name = sample["name.txt"].decode("utf-8") if "name.txt" in sample else sample["__key__"]
        captions = json.loads(sample["caption.json"]) if "caption.json" in sample else None
    return {"image": image, "mask": mask, "name": name, "captions": captions}


def _describe(exn: Exception) -> str:
    """One line for an error webdataset reports (its tar stages append the stream object and the shard URL)."""
    if isinstance(exn, BadSampleError):
        text = str(exn)
    else:
        parts = "; ".join(str(a) for a in exn.args if isinstance(a, str | int)) or repr(exn)
        text = f"{type(exn).__name__}: {parts}"
    return " ".join(text.split())


class SkipBadSamples:
    """A webdataset error handler that skips bad samples with a warning and fails past a fraction of them.

    webdataset's ``warn_and_continue`` names neither the shard nor the sample (PIL's message names a ``BytesIO``),
    counts nothing and sleeps 0.5 s per warning, so this handler does the naming and counting itself. Each bad sample
    is logged (``autoseg.data.shards`` logger, level WARNING) with its shard and key; once ``min_samples`` samples
    were read, more than ``max_bad_fraction`` of them bad raises :class:`TooManyBadSamples`, as does a pass over
    the shards that yields no good sample at all. A shard that cannot be opened (missing file, no permission) is a
    configuration error and still raises at once.

    The counts live in the handler object, so each DataLoader worker process (and each DDP rank) counts its own
    share of the shards, over all the passes it makes (epochs, with persistent workers). A broken tar stream counts
    once per error webdataset reports (a truncated member: usually two, plus the partial sample it leaves).

    Args:
        max_bad_fraction: largest tolerated fraction of bad samples (0: the first bad sample is fatal; 1: never fail).
        min_samples: samples (good + bad) to read before the fraction is checked.
    """

    def __init__(self, max_bad_fraction: float = 0.01, min_samples: int = MIN_SAMPLES):
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction={max_bad_fraction}: expected a fraction in [0, 1]")
        self.max_bad_fraction, self.min_samples = max_bad_fraction, min_samples
        self.good = self.bad = 0
        self.last = ""  # where and what the last bad sample was

    def __call__(self, exn: Exception) -> bool:
        """Count and log a bad sample and return True (continue), or raise (too many bad samples, no shard)."""
        if isinstance(exn, TooManyBadSamples | FileNotFoundError | PermissionError | IsADirectoryError):
            raise exn
        self.bad += 1
        self.last = _describe(exn)
        logger.warning("skipped a bad shard sample (%d of %d so far): %s", self.bad, self.good + self.bad, self.last)
        self._check()
        return True

    def passed(self, samples: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """Pipeline stage after decoding: count the good samples (a pass with only bad ones is an error)."""
        good, bad = self.good, self.bad
        for sample in samples:
            self.good += 1
            self._check()
            yield sample
        if self.good == good and self.bad > bad and self.max_bad_fraction < 1:
            raise TooManyBadSamples(f"all {self.bad - bad} shard samples read in this pass were bad; last: {self.last}")

    def _check(self) -> None:
        total = self.good + self.bad
        too_many = self.bad > self.max_bad_fraction * total
        if self.bad and too_many and (self.max_bad_fraction == 0 or total >= self.min_samples):
            raise TooManyBadSamples(
                f"{self.bad} of {total} shard samples were bad ({self.bad / total:.1%} > max_bad_fraction "
                f"{self.max_bad_fraction:g}); last: {self.last}"
            )


def shard_urls(urls: str | os.PathLike | Sequence[str | os.PathLike]) -> str | list[str]:
    """Normalise a shard spec for webdataset: a folder becomes its sorted ``*.tar`` files; paths become strings;
    brace patterns (``shard-{000000..000009}.tar``) pass through.

    Raises:
        FileNotFoundError: a folder holds no ``.tar`` file.
    """
    if isinstance(urls, str | os.PathLike) and Path(urls).is_dir():
        tars = sorted(str(p) for p in Path(urls).glob("*.tar"))
        if not tars:
            raise FileNotFoundError(f"{urls}: no .tar shards; write some with `python -m autoseg.data.shards`")
        return tars
    if isinstance(urls, str | os.PathLike):
        return str(urls)
    return [str(u) for u in urls]


def shard_dataset(
    urls: str | os.PathLike | Sequence[str | os.PathLike],
    shuffle: int = 0,
    seed: int = 0,
    nodesplitter: Callable[[Iterable[Any]], Iterable[Any]] | None = wds.split_by_node,
    resampled: bool = False,
    handler: Callable[[Exception], bool] | None = None,
    empty_check: bool = True,
    max_bad_fraction: float = 0.01,
    min_samples: int = MIN_SAMPLES,
) -> wds.WebDataset:
    """A webdataset pipeline over shards that yields decoded samples (see ``decode_sample``).

    Args:
        urls: a shard folder, a file, a brace pattern, or a list of files.
        shuffle: sample shuffle buffer size (0 = keep the stored order); with a buffer the shard order is also
            shuffled, deterministically per epoch from ``seed``.
        seed: seed of both shuffles.
        nodesplitter: how shards are split between distributed ranks (``None`` = every rank reads all).
        resampled: sample shards with replacement forever (for step-based training).
        handler: webdataset error handler; None: a :class:`SkipBadSamples` of ``max_bad_fraction`` and
            ``min_samples`` (``wds.reraise_exception``: the first bad sample is fatal).
        empty_check: raise when a rank/worker gets no sample (e.g. fewer shards than ranks x workers).
        max_bad_fraction: with the default handler, largest tolerated fraction of bad samples.
        min_samples: with the default handler, samples read before that fraction is checked.
    """
    budget = SkipBadSamples(max_bad_fraction, min_samples) if handler is None else None
    handler = handler or budget
    dataset = wds.WebDataset(
        shard_urls(urls),
        shardshuffle=100 if shuffle > 0 else False,
        detshuffle=True,
        seed=seed,
        nodesplitter=nodesplitter,
        resampled=resampled,
        handler=handler,
        empty_check=empty_check,
    )
    if shuffle > 0:
        dataset = dataset.shuffle(shuffle, seed=seed)
    dataset = dataset.map(decode_sample, handler=handler)
    return dataset.compose(budget.passed) if budget is not None else dataset


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m autoseg.data.shards",
        description="Convert a folder dataset (images/, masks/, captions/, classes.txt) to WebDataset tar shards.",
    )
    p.add_argument("--folder", type=Path, required=True, help="dataset folder")
    p.add_argument("--out", default=None, help="shard folder or %%06d pattern (default: FOLDER/shards)")
    p.add_argument("--maxcount", type=int, default=1000, help="samples per shard (default: 1000)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    paths = write_shards(args.folder, args.out, maxcount=args.maxcount)
    print(f"wrote {len(paths)} shard(s) to {shard_files(args.out or args.folder / 'shards')[1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

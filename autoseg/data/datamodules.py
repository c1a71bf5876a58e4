"""LightningDataModule over the dataset readers, folder datasets, WebDataset shards and generated ShapesWorld data.

Each split is a :class:`DataSource`: a registered reader (``build_dataset``: ``voc20``, ``ade150``, ..., ``folder``),
``shards`` (WebDataset tar shards, see :mod:`autoseg.data.shards`) or ``images`` (a plain image folder without
masks, for ``predict``). With ``shapesworld`` set, train and val folders are generated once into a cache folder
(``prepare_data``, rank 0 only) and need no download. Items are transformed jointly (image + mask) by
:class:`autoseg.data.transforms.SegmentationTransform` and collated to ``{"image": B x 3 x S x S in [0, 1],
"mask": B x S x S int64, "name": [str], "orig_size": B x 2}``, plus ``"captions": [dict or None]`` (the captions dict of
:mod:`autoseg.data.shapes`, uncollated) when the source has captions: ``folder`` datasets with ``captions/NAME.json``
and shards with a ``caption.json`` member (the captioner module trains on them).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset

from autoseg.data.datasets import DATASETS, IGNORE_INDEX, build_dataset
from autoseg.data.transforms import SegmentationTransform, collate
from autoseg.utils.io import atomic_write_json, find_images, load_image

SPECIAL_SOURCES = ("shards", "images")
CAPTIONS = "captions"  # batch key of the per-image captions dicts


@dataclass
class DataSource:
    """One split of data.

    Attributes:
        dataset: a reader name from ``autoseg.data.datasets.DATASETS`` (``folder`` for the generic folder format),
            ``shards`` (WebDataset tar shards) or ``images`` (an image folder without masks; ``predict`` only).
        root: dataset root or folder; for ``shards`` a URL / brace pattern (``data/train-{000000..000009}.tar``)
            or a folder of ``*.tar``.
        split: split name for readers that have splits (``train``, ``val``); ignored by ``folder`` and ``images``.
        limit: keep only the first ``limit`` items (for shards: per data-loading worker and process).
    """

    dataset: str = "folder"
    root: str = ""
    split: str = "val"
    limit: int | None = None

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS and self.dataset not in SPECIAL_SOURCES:
            raise ValueError(
                f"data source {self.dataset!r} unknown; choose a dataset reader ({', '.join(DATASETS)}) or one of "
                f"{SPECIAL_SOURCES}"
            )
        if not self.root:
            raise ValueError(f"data source {self.dataset!r}: 'root' is empty; give the dataset folder or shard URLs")


@dataclass
class ShapesWorldSpec:
    """Generate ShapesWorld train/val folders (no download); see :mod:`autoseg.data.shapes`.

    Attributes:
        root: cache folder; each setting gets its own sub-folder ``shapesworld-<hash>/{train,val}``.
        seed: dataset seed; train uses sample indices ``0..n_train-1``, val the next ``n_val`` (disjoint).
        n_train: training images.
        n_val: validation images (also used for ``test``).
        size: image side in pixels.
        shapes: extra ``ShapesConfig`` fields, e.g. ``{max_things: 3, textured: false}``.
    """

    root: str = "~/.cache/autoseg/shapesworld"
    seed: int = 0
    n_train: int = 256
    n_val: int = 32
    size: int = 128
    shapes: dict[str, Any] = field(default_factory=dict)

    def config(self):
        from autoseg.data.shapes import ShapesConfig

        try:
            return ShapesConfig(size=self.size, **self.shapes)
        except TypeError as e:
            fields = [f.name for f in dataclasses.fields(ShapesConfig)]
            raise ValueError(f"shapesworld.shapes: {e}; allowed keys: {fields}") from e

    def folder(self) -> Path:
        """``root/shapesworld-<hash of the settings and the generator version>``: a changed generator regenerates."""
        from autoseg.data.shapes import GENERATOR_VERSION

        key = json.dumps(dataclasses.asdict(self) | {"root": None, "generator": GENERATOR_VERSION}, sort_keys=True)
        digest = hashlib.sha1(key.encode()).hexdigest()[:10]
        return Path(self.root).expanduser() / f"shapesworld-{digest}"


def prepare_shapesworld(spec: ShapesWorldSpec, workers: int = 0) -> Path:
    """Generate the train/val folders of ``spec`` unless already complete (``workers``: generator processes).

    Returns:
        the dataset folder (``spec.folder()``).
    """
    from autoseg.data.shapes import write_dataset

    folder, config = spec.folder(), spec.config()
    for split, start, n in (("train", 0, spec.n_train), ("val", spec.n_train, spec.n_val)):
        done = folder / split / ".complete"
        if done.is_file():
            continue
        write_dataset(folder / split, n, spec.seed, config, start=start, workers=workers, progress=True)
        atomic_write_json(done, dataclasses.asdict(spec) | {"split": split, "start": start, "n": n})
    return folder


class ImageFolder(Dataset):
    """Images without masks (for ``predict``): items ``{"image", "name", "path"}``; names are relative stems."""

    def __init__(self, root: str | os.PathLike, limit: int | None = None):
        found = find_images([root])
        if not found:
            raise FileNotFoundError(f"{root}: no images found (searched recursively)")
        self.files = found[:limit] if limit else found

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        file, stem = self.files[index]
        return {"image": load_image(file), "name": stem.as_posix(), "path": str(file)}


class _Mapped(Dataset):
    """Apply ``fn`` to the items of a map-style dataset."""

    def __init__(self, base: Dataset, fn: Callable[[dict], dict]):
        self.base, self.fn = base, fn

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict:
        return self.fn(self.base[index])


class _FolderCaptions(Dataset):
    """Items of a ``folder`` dataset plus ``captions``: the parsed ``captions/NAME.json``, None where it is missing."""

    def __init__(self, base: Any):
        self.base = base
        self.folder = Path(base.root) / "captions"

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict:
        item = self.base[index]
        path = self.folder / f"{item['name']}.json"
        try:
            captions = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e}); expected the captions dict of data/README.md") from e
        return {**item, CAPTIONS: captions}


class _Decoded(Dataset):
    """Items of a map-style dataset decoded once and then served from memory (``cache_decoded``): the image as
    decoded, the mask in the smallest integer type that holds it (returned as uint8 when its labels fit, which the
    joint transform resizes as they are, else as int64, as read)."""

    def __init__(self, base: Any):
        self.base = base
        self.items: dict[int, dict] = {}

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict:
        item = self.items.get(index)
        if item is None:
            item = dict(self.base[index])
            mask = item.get("mask")
            if isinstance(mask, np.ndarray) and mask.size and mask.min() >= 0:
                item["mask"] = mask.astype(np.min_scalar_type(int(mask.max())))
            self.items[index] = item
        out = dict(item)
        if isinstance(out.get("mask"), np.ndarray) and out["mask"].dtype != np.uint8:
            out["mask"] = out["mask"].astype(np.int64)
        return out


class _KeepCaptions:
    """Run the joint transform and carry the item's captions (which the transform does not know) through."""

    def __init__(self, transform: Callable[[dict], dict]):
        self.transform = transform

    def __call__(self, item: dict) -> dict:
        out = self.transform(item)
        if CAPTIONS in item:
            out[CAPTIONS] = item[CAPTIONS]
        return out


def collate_with_captions(items: list[dict[str, Any]]) -> dict[str, Any]:
    """``collate`` the tensors; captions dicts (ragged, possibly None) stay a plain list under ``"captions"``."""
    batch = collate([{k: v for k, v in item.items() if k != CAPTIONS} for item in items])
    if any(CAPTIONS in item for item in items):
        batch[CAPTIONS] = [item.get(CAPTIONS) for item in items]
    return batch


class _MappedIterable(IterableDataset):
    """Apply ``fn`` to the items of an iterable dataset (WebDataset shards), optionally only the first ``limit``."""

    def __init__(self, base: IterableDataset, fn: Callable[[dict], dict], limit: int | None = None):
        self.base, self.fn, self.limit = base, fn, limit

    def __iter__(self) -> Iterator[dict]:
        return (self.fn(item) for item in itertools.islice(self.base, self.limit))


def run_seed() -> int:
    """The run's seed: ``seed_everything``'s (``PL_GLOBAL_SEED``, which ``train.py`` sets), else 0 as in Lightning."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


def derive_seed(*parts: int) -> int:
    """A seed in ``[0, 2**63)`` that depends only on ``parts`` (e.g. run seed, epoch, item), well mixed."""
    digest = hashlib.blake2b(json.dumps(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class EpochSampler(DistributedSampler):
    """Training order that depends only on the seed and the epoch, so that a resumed run sees the same batches.

    Each epoch is a permutation drawn from ``(seed, epoch)`` (Lightning calls ``set_epoch`` at each epoch start),
    split across ``num_replicas`` processes as by ``DistributedSampler`` (which it is, so Lightning keeps it under DDP).
    Items come as ``(index, item_seed)`` keys with ``item_seed = derive_seed(seed, epoch, index)`` for
    :class:`SeededItems`: an item's random augmentation does not depend on the worker or process that loads it, nor on
    what was drawn before. ``skip`` leading items of the epoch are left out (set by :class:`ResumableLoader`).
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.skip = 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for index in itertools.islice(super().__iter__(), self.skip, None):
            yield index, derive_seed(self.seed, self.epoch, index)


class SeededItems(Dataset):
    """Load item ``index`` of ``base`` with torch's global generator seeded by ``item_seed`` (and restored after).

    Keys are ``(index, item_seed)`` from :class:`EpochSampler`; a plain index loads as usual.
    """

    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        if not isinstance(key, tuple):
            return self.base[key]
        index, item_seed = key
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only (what the transforms draw from): torch.manual_seed would also queue a seed for
            # every lazily initialised accelerator, capturing a stack trace each time (a third of the loading time)
            torch.default_generator.manual_seed(item_seed)
            return self.base[index]


class ResumableLoader(DataLoader):
    """The training ``DataLoader`` (over an :class:`EpochSampler`) that continues a checkpoint's epoch where it stopped.

    Lightning saves ``state_dict()`` (epoch and batches yielded in it) with the loop state and, when it resumes, calls
    ``load_state_dict``; the next iteration of that epoch then skips the batches already trained on. Iteration starts
    at the first batch (not at ``iter()``, which Lightning calls before the epoch is known), also with worker processes,
    which fetch ahead.

    Args:
        epoch_source: gives the epoch about to be iterated (the trainer's ``current_epoch``); it overrides the value
            of Lightning's ``set_epoch``, which after a resume from an epoch-end checkpoint is one ahead.
        args, kwargs: ``DataLoader`` arguments.
    """

    def __init__(self, *args: Any, epoch_source: Callable[[], int | None] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.epoch_source = epoch_source
        self.position = (0, 0)  # (epoch, batches yielded in it)
        self._resume: tuple[int, int] | None = None

    def __iter__(self) -> Iterator[Any]:
        sampler = self.sampler
        if not isinstance(sampler, EpochSampler):  # Lightning swapped the sampler (overfit_batches): nothing to resume
            yield from super().__iter__()
            return
        if self.epoch_source is not None and (current := self.epoch_source()) is not None:
            sampler.set_epoch(current)
        epoch, start = sampler.epoch, 0
        if self._resume is not None and self._resume[0] == epoch and self._resume[1] < len(self):
            start = self._resume[1]
        self._resume = None
        sampler.skip = start * (self.batch_size or 1)
        self.position = (epoch, start)
        for batch in super().__iter__():
            self.position = (epoch, self.position[1] + 1)
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.position[0], "batches": self.position[1]}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = (int(state["epoch"]), int(state["batches"]))


class SegmentationDataModule(L.LightningDataModule):
    """Images + masks for the AutoSeg LightningModules.

    Args:
        train: training split (None: no ``fit``).
        val: validation split.
        test: test split (None: the validation split).
        predict: split for ``predict`` (``images`` sources need no masks).
        shapesworld: generate ShapesWorld train/val into a cache folder instead of ``train``/``val``.
        class_names: class names; only needed for ``shards`` whose folder has no ``classes.txt`` (the ``classes``
            property gives them for every source).
        image_size: square side the models see (BLIP: a multiple of its patch size). Evaluation splits of a model with
            a fixed input side (its ``input_size``, e.g. SAM 3) are resized to that side instead.
        crop_scale: area range of the training random resized crop.
        hflip: random horizontal flips when training.
        batch_size: training batch size (per process).
        eval_batch_size: batch size of val / test / predict (None: ``batch_size``).
        num_workers: DataLoader worker processes.
        shuffle_buffer: shuffle buffer of training shards.
        seed: seed of the shard shuffles (other sampling follows ``seed_everything``).
        max_bad_fraction: shards only: a corrupt sample is skipped with a warning naming the shard and the key, and
            reading fails once more than this fraction of the samples read were bad (checked after
            ``autoseg.data.shards.MIN_SAMPLES`` samples; 0: the first bad sample is fatal). Each DataLoader worker
            and each DDP rank counts its own share (see :class:`autoseg.data.shards.SkipBadSamples`).
        cache_decoded: keep the training split's decoded images and masks in memory after their first read
            (map-style sources; each DataLoader worker keeps its own copy): for small datasets read for many epochs,
            e.g. ShapesWorld's 4,000 images of 128 px (about 330 MB), where decoding is a third of a step on CPU.

    The training order and augmentations of map-style sources (readers, folders, ShapesWorld) depend only on the run
    seed, the epoch and the item (:class:`EpochSampler`, :class:`SeededItems`), and the training loader resumes
    mid-epoch (:class:`ResumableLoader`): ``fit`` resumed from a checkpoint gives the weights of an uninterrupted run.
    Shards are streamed and resume at an epoch start.
    """

    def __init__(
        self,
        train: DataSource | None = None,
        val: DataSource | None = None,
        test: DataSource | None = None,
        predict: DataSource | None = None,
        shapesworld: ShapesWorldSpec | None = None,
        class_names: list[str] | None = None,
        image_size: int = 384,
        crop_scale: tuple[float, float] = (0.35, 1.0),
        hflip: bool = True,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        shuffle_buffer: int = 256,
        seed: int = 0,
        max_bad_fraction: float = 0.01,
        cache_decoded: bool = False,
    ):
        super().__init__()
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"data.max_bad_fraction={max_bad_fraction}: expected a fraction in [0, 1]")
        self.save_hyperparameters()
        if shapesworld is not None:
            folder = shapesworld.folder()
            train = train or DataSource("folder", str(folder / "train"))
            val = val or DataSource("folder", str(folder / "val"))
        self.sources = {"train": train, "val": val, "test": test or val, "predict": predict or val}
        for split in ("train", "val", "test"):
            if self.sources[split] is not None and self.sources[split].dataset == "images":
                raise ValueError(f"data.{split}: an 'images' source has no masks; use it for data.predict only")
        self.shapesworld = shapesworld
        self._classes = list(class_names) if class_names else None
        self._readers: dict[tuple, Any] = {}  # built readers, by source
        self._datasets: dict[tuple[str, int], Any] = {}  # transformed datasets, by split and side

    # ------------------------------------------------------------------ what the model needs to know
    @property
    def classes(self) -> list[str]:
        """Class names (a mask value indexes this list); linked to the model's ``classes`` by ``train.py``."""
        if self._classes is None:
            if self.shapesworld is not None:
                self._classes = list(self.shapesworld.config().classes)
            else:
                src = self._labelled_source()
                self._classes = shard_classes(src.root) if src.dataset == "shards" else self._reader(src).classes
        return self._classes

    @property
    def ignore_index(self) -> int:
        """Mask value of unscored pixels (255; 65535 for Context-459 / ADE-847); linked to the model."""
        if self.shapesworld is not None:
            return IGNORE_INDEX
        src = self._labelled_source()
        return IGNORE_INDEX if src.dataset == "shards" else self._reader(src).ignore_index

    def _labelled_source(self) -> DataSource:
        for stage in ("train", "val", "test"):
            src = self.sources[stage]
            if src is not None and src.dataset != "images":
                return src
        raise ValueError(
            "the data module has no train / val / test source with masks, so it knows no class names; "
            "set data.train or data.val (or data.class_names)"
        )

    # ------------------------------------------------------------------ building the splits
    def prepare_data(self) -> None:
        """Generate ShapesWorld once (runs on one process per node before ``setup``)."""
        if self.shapesworld is not None:
            prepare_shapesworld(self.shapesworld)

    def _reader(self, src: DataSource):
        key = (src.dataset, src.root, src.split, src.limit)
        if key not in self._readers:
            self._readers[key] = build_dataset(src.dataset, Path(src.root).expanduser(), src.split, src.limit)
        return self._readers[key]

    def _side(self, split: str) -> int:
        """Square side of a split's images: ``image_size``, or for val / test / predict the attached model's
        ``input_size`` when it has one (SAM 3), so that each image is resized once, from the original, to the pixels
        the model's processor gives at inference (``image_size`` and then the model's own resize would blur them)."""
        model = self.trainer.lightning_module if self.trainer is not None else None
        side = getattr(model, "input_size", None)
        return side if side is not None and split != "train" else self.hparams.image_size

    def _dataset(self, split: str) -> Dataset | IterableDataset:
        key = (split, self._side(split))
        if key not in self._datasets:
            self._datasets[key] = self._build(split, key[1])
        return self._datasets[key]

    def _build(self, stage: str, side: int) -> Dataset | IterableDataset:
        src = self.sources[stage]
        if src is None:
            raise ValueError(f"no '{stage}' data configured; set data.{stage} (or data.shapesworld) in the config")
        train = stage == "train"
        transform = _KeepCaptions(
            SegmentationTransform(side, train=train, scale=self.hparams.crop_scale, hflip=self.hparams.hflip)
        )
        if src.dataset == "images":
            return _Mapped(ImageFolder(Path(src.root).expanduser(), src.limit), transform)
        if src.dataset == "shards":
            from autoseg.data.shards import shard_dataset

            urls = src.root if "{" in src.root else str(Path(src.root).expanduser())
            shuffle = self.hparams.shuffle_buffer if train else 0
            base = shard_dataset(
                urls, shuffle=shuffle, seed=self.hparams.seed, max_bad_fraction=self.hparams.max_bad_fraction
            )
            return _MappedIterable(base, transform, src.limit)
        reader = self._reader(src)
        if src.dataset == "folder" and (Path(reader.root) / "captions").is_dir():
            reader = _FolderCaptions(reader)
        if train and self.hparams.cache_decoded:
            reader = _Decoded(reader)
        return _Mapped(reader, transform)

    def setup(self, stage: str | None = None) -> None:
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}
        for split in wanted.get(stage or "fit", ("train", "val")):
            if self.sources[split] is not None:
                self._dataset(split)

    def _loader(self, split: str, train: bool = False) -> DataLoader:
        ds = self._dataset(split)
        bs = self.hparams.batch_size if train else (self.hparams.eval_batch_size or self.hparams.batch_size)
        workers = {"num_workers": self.hparams.num_workers, "persistent_workers": self.hparams.num_workers > 0}
        if not train or isinstance(ds, IterableDataset):
            return DataLoader(ds, batch_size=bs, collate_fn=collate_with_captions, **workers)
        trainer = self.trainer  # one share of each epoch per process under DDP
        replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sampler = EpochSampler(ds, replicas, rank, seed=run_seed())
        return ResumableLoader(
            SeededItems(ds),
            epoch_source=self._current_epoch,
            batch_size=bs,
            sampler=sampler,
            drop_last=len(sampler) > bs,  # no ragged last batch, unless it is the only one
            collate_fn=collate_with_captions,
            **workers,
        )

    def _current_epoch(self) -> int | None:
        return None if self.trainer is None else self.trainer.current_epoch

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict")


def shard_classes(urls: str) -> list[str]:
    """Class names of a shard set: ``classes.txt`` in the shard folder (``write_shards`` copies it there).

    Raises:
        FileNotFoundError: there is no ``classes.txt`` beside the shards; the message says how to give the names.
    """
    first = urls.split("{")[0] if "{" in urls else urls
    folder = Path(first).expanduser()
    folder = folder if folder.is_dir() else folder.parent
    path = folder / "classes.txt"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no class list beside the shards {urls}; write the shards with `python -m autoseg.data.shards` "
            "(it copies classes.txt) or set data.class_names"
        )
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not names:
        raise ValueError(f"{path}: empty class list")
    return names

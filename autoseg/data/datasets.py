"""Readers for the semantic-segmentation benchmarks in their standard on-disk layouts (see ``data/README.md``).

Every reader yields ``{"image": PIL RGB, "mask": int64 H x W, "name": relative stem, "path": image path}`` with mask
values = 0-based class ids of :mod:`autoseg.data.classes` and ``ignore_index`` for unscored pixels. Pairing images with
masks happens when the dataset is built (a listed image without a mask is an error); a mask whose size differs from
its image is an error when the item is read.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from autoseg.data import classes as C
from autoseg.utils.io import IMAGE_EXTENSIONS, ImageReadError, find_images, load_image, safe_relative

IGNORE_INDEX = 255
IGNORE_INDEX_LARGE = 65535  # Context-459 / ADE-847: class ids go past 255 (detectron2's ignore label for them)
_EXIF_ORIENTATION = 274
_MAX_LISTED = 5


@dataclass(frozen=True)
class Sample:
    """One image and its ground-truth mask on disk; ``name`` is the image's relative stem."""

    image: Path
    mask: Path
    name: str


def value_lut(num_values: int, mapping: dict[int, int], default: int = -1) -> np.ndarray:
    """Lookup table from raw mask values to class ids; ``default`` (-1) marks values a mask must not contain."""
    lut = np.full(num_values, default, dtype=np.int64)
    for raw, label in mapping.items():
        lut[raw] = label
    return lut


class SegmentationDataset(Dataset):
    """Images with ground-truth class masks.

    Args:
        samples: image/mask pairs, in evaluation order.
        classes: class names, index = class id.
        name: short dataset name (``"voc20"``, ...).
        lut: raw mask value -> class id (or ``ignore_index``); -1 marks raw values that are an error.
        ignore_index: mask value of pixels that are not scored.
        background_index: class id of background where it is scored as a class (VOC-21, Context-60), else None.
        root: the dataset folder, for messages.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        classes: Sequence[str],
        name: str,
        lut: np.ndarray,
        ignore_index: int = IGNORE_INDEX,
        background_index: int | None = None,
        root: str | os.PathLike | None = None,
    ) -> None:
        if len(set(classes)) != len(classes):
            raise ValueError(f"dataset {name!r}: class names must be unique, got {list(classes)}")
        if ignore_index < len(classes):
            raise ValueError(
                f"dataset {name!r}: ignore_index {ignore_index} collides with class ids 0..{len(classes) - 1}"
            )
        self.samples = list(samples)
        self.classes = list(classes)
        self.name = name
        self.lut = lut
        self.ignore_index = ignore_index
        self.background_index = background_index
        self.root = Path(root) if root is not None else None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, root={str(self.root)!r}, n={len(self)})"

    def __getitem__(self, index: int) -> dict:
        s = self.samples[index]
        image = load_image(s.image)
        mask = self._read_mask(s, (image.height, image.width))
        return {"image": image, "mask": mask, "name": s.name, "path": str(s.image)}

    def read_mask(self, index: int) -> np.ndarray:
        """The ``H x W`` int64 mask of item ``index`` without decoding the image (its size is still checked)."""
        s = self.samples[index]
        return self._read_mask(s, image_size(s.image))

    def _read_mask(self, s: Sample, image_hw: tuple[int, int]) -> np.ndarray:
        try:
            with Image.open(s.mask) as im:
                raw = np.asarray(im)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{s.mask}: mask file not found (for image {s.image})") from e
        except (OSError, SyntaxError, ValueError) as e:
            raise ImageReadError(f"{s.mask}: not a readable mask image ({type(e).__name__}: {e})") from e
        if raw.ndim != 2:
            raise ValueError(f"{s.mask}: expected a single-channel mask of class ids, got shape {raw.shape}")
        if raw.shape != image_hw:
            raise ValueError(
                f"{s.mask}: mask is {raw.shape[1]}x{raw.shape[0]} (WxH) but its image {s.image} is "
                f"{image_hw[1]}x{image_hw[0]}; masks must have their image's size"
            )
        raw = raw.astype(np.int64)
        bad = (raw < 0) | (raw >= len(self.lut))
        mask = self.lut[np.where(bad, 0, raw)]
        bad |= mask < 0
        if bad.any():
            values = sorted(set(np.unique(raw[bad]).tolist()))[:10]
            raise ValueError(
                f"{s.mask}: unexpected mask values {values} for dataset {self.name!r} "
                f"({self.num_classes} classes, ignore {self.ignore_index}); see data/README.md"
            )
        return mask


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(H, W)`` of an image as :func:`autoseg.utils.io.load_image` returns it (EXIF rotation applied)."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            if im.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8):
                w, h = h, w
    except FileNotFoundError as e:
        raise ImageReadError(f"{path}: file not found") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageReadError(f"{path}: not a readable image ({type(e).__name__}: {e})") from e
    return h, w


# ---------------------------------------------------------------------------------------------------------------------
# Helpers shared by the readers


def _require_dir(path: Path, what: str, layout: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: {what} folder not found; expected layout {layout} (see data/README.md)")
    return path


def _find_root(root: Path, candidates: Sequence[str], marker: str, title: str, layout: str) -> Path:
    """The first of ``root / c`` holding ``marker``; lets users point at any level of a nested release."""
    if not root.exists():
        raise FileNotFoundError(f"{root}: {title} root not found; expected layout {layout} (see data/README.md)")
    for c in candidates:
        if (root / c / marker).exists():
            return root / c
    tried = ", ".join(str(root / c / marker) for c in candidates)
    raise FileNotFoundError(
        f"{root}: no {title} found (looked for {tried}); expected layout {layout} (see data/README.md)"
    )


def _read_split(path: Path, layout: str) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: split list not found; expected layout {layout} (see data/README.md)")
    ids = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not ids:
        raise ValueError(f"{path}: split list is empty")
    for i, name in enumerate(ids, 1):  # ids become output file names: none may leave the output folder
        try:
            safe_relative(name, "image id")
        except ValueError as e:
            raise ValueError(f"{path}, line {i}: {e}") from None
    return ids


def _files_by_stem(folder: Path, extensions: Sequence[str] | None = None) -> dict[str, Path]:
    """``relative stem -> file`` for the files under ``folder`` (recursively); two files with one stem are an error."""
    out: dict[str, Path] = {}
    for f, stem in find_images([folder]):
        if extensions is not None and f.suffix.lower() not in extensions:
            continue
        key = stem.as_posix()
        if key in out:
            raise ValueError(f"{folder}: two files for one name {key!r}: {out[key].name} and {f.name}")
        out[key] = f
    return out


def _pair(
    names: Sequence[str],
    image_of: Callable[[str], Path],
    mask_of: Callable[[str], Path],
    where: str,
    layout: str,
) -> list[Sample]:
    """Pair each name with its image and mask; every missing file is reported in one error."""
    samples, no_image, no_mask = [], [], []
    for n in names:
        img, msk = image_of(n), mask_of(n)
        if not img.is_file():
            no_image.append(str(img))
        elif not msk.is_file():
            no_mask.append(str(msk))
        else:
            samples.append(Sample(img, msk, n))
    problems = []
    if no_image:
        problems.append(f"{len(no_image)} image(s) missing (e.g. {', '.join(no_image[:_MAX_LISTED])})")
    if no_mask:
        problems.append(f"{len(no_mask)} image(s) without a mask (e.g. {', '.join(no_mask[:_MAX_LISTED])})")
    if problems:
        raise ValueError(f"{where}: {'; '.join(problems)} of {len(names)} listed; expected layout {layout}")
    if not samples:
        raise ValueError(f"{where}: no images found; expected layout {layout} (see data/README.md)")
    return samples


def _limit(samples: list[Sample], limit: int | None) -> list[Sample]:
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of images, got {limit}")
    return samples[:limit] if limit is not None else samples


def _shift_lut(num_classes: int, num_values: int = 256) -> np.ndarray:
    """0 -> ignore, k -> k - 1 (background not scored), 255 -> ignore: mmseg's ``reduce_zero_label``."""
    return value_lut(num_values, {0: IGNORE_INDEX, 255: IGNORE_INDEX, **{k: k - 1 for k in range(1, num_classes + 1)}})


def _identity_lut(num_classes: int, ignore_index: int, num_values: int) -> np.ndarray:
    return value_lut(num_values, {ignore_index: ignore_index, **{k: k for k in range(num_classes)}})


# ---------------------------------------------------------------------------------------------------------------------
# Readers

_VOC_LAYOUT = "ROOT/VOCdevkit/VOC2012/{JPEGImages/ID.jpg, SegmentationClass/ID.png, ImageSets/Segmentation/SPLIT.txt}"


def pascal_voc(
    root: str | os.PathLike, split: str = "val", background: bool = False, limit: int | None = None
) -> SegmentationDataset:
    """PASCAL VOC 2012: 20 classes (``background=False``, background ignored) or 21 with background as class 0."""
    base = _find_root(Path(root), ["VOCdevkit/VOC2012", "VOC2012", "."], "JPEGImages", "PASCAL VOC 2012", _VOC_LAYOUT)
    mask_dir = base / "SegmentationClass"
    if not mask_dir.is_dir() and (base / "SegmentationClassAug").is_dir():
        mask_dir = base / "SegmentationClassAug"
    _require_dir(mask_dir, "SegmentationClass", _VOC_LAYOUT)
    ids = _read_split(base / "ImageSets" / "Segmentation" / f"{split}.txt", _VOC_LAYOUT)
    samples = _pair(
        ids, lambda n: base / "JPEGImages" / f"{n}.jpg", lambda n: mask_dir / f"{n}.png", str(base), _VOC_LAYOUT
    )
    if background:
        lut = _identity_lut(21, IGNORE_INDEX, 256)
        return SegmentationDataset(_limit(samples, limit), C.VOC21, "voc21", lut, IGNORE_INDEX, 0, base)
    return SegmentationDataset(_limit(samples, limit), C.VOC20, "voc20", _shift_lut(20), IGNORE_INDEX, None, base)


_CONTEXT_LAYOUT = (
    "ROOT/VOCdevkit/VOC2010/{JPEGImages/ID.jpg, SegmentationClassContext/ID.png, "
    "ImageSets/SegmentationContext/SPLIT.txt}"
)


def pascal_context(
    root: str | os.PathLike, split: str = "val", background: bool = False, limit: int | None = None
) -> SegmentationDataset:
    """PASCAL Context in mmseg's layout: 59 classes (background ignored) or 60 with background as class 0."""
    base = _find_root(
        Path(root), ["VOCdevkit/VOC2010", "VOC2010", "."], "JPEGImages", "PASCAL Context", _CONTEXT_LAYOUT
    )
    mask_dir = _require_dir(base / "SegmentationClassContext", "SegmentationClassContext", _CONTEXT_LAYOUT)
    ids = _read_split(base / "ImageSets" / "SegmentationContext" / f"{split}.txt", _CONTEXT_LAYOUT)
    samples = _pair(
        ids, lambda n: base / "JPEGImages" / f"{n}.jpg", lambda n: mask_dir / f"{n}.png", str(base), _CONTEXT_LAYOUT
    )
    if background:
        lut = _identity_lut(60, IGNORE_INDEX, 256)
        return SegmentationDataset(_limit(samples, limit), C.CONTEXT60, "context60", lut, IGNORE_INDEX, 0, base)
    return SegmentationDataset(
        _limit(samples, limit), C.CONTEXT59, "context59", _shift_lut(59), IGNORE_INDEX, None, base
    )


_CONTEXT459_LAYOUT = "ROOT/VOCdevkit/VOC2010/{JPEGImages/ID.jpg, annotations_detectron2/pc459_SPLIT/ID.tif (uint16)}"


def pascal_context_459(root: str | os.PathLike, split: str = "val", limit: int | None = None) -> SegmentationDataset:
    """PASCAL Context 459 in the detectron2 layout: uint16 TIFF masks, 0..458 classes, 65535 ignored."""
    base = _find_root(
        Path(root),
        ["VOCdevkit/VOC2010", "VOC2010", "."],
        "annotations_detectron2",
        "PASCAL Context 459",
        _CONTEXT459_LAYOUT,
    )
    _require_dir(base / "JPEGImages", "JPEGImages", _CONTEXT459_LAYOUT)
    mask_dir = _require_dir(base / "annotations_detectron2" / f"pc459_{split}", f"pc459_{split}", _CONTEXT459_LAYOUT)
    names = sorted(_files_by_stem(mask_dir, (".tif", ".tiff")))
    samples = _pair(
        names,
        lambda n: base / "JPEGImages" / f"{n}.jpg",
        lambda n: mask_dir / f"{n}.tif",
        str(mask_dir),
        _CONTEXT459_LAYOUT,
    )
    lut = _identity_lut(459, IGNORE_INDEX_LARGE, 65536)
    return SegmentationDataset(_limit(samples, limit), C.CONTEXT459, "context459", lut, IGNORE_INDEX_LARGE, None, base)


_ADE_SPLITS = {"val": "validation", "validation": "validation", "train": "training", "training": "training"}
_ADE150_LAYOUT = "ROOT/ADEChallengeData2016/{images,annotations}/validation/ADE_val_NNNNNNNN.{jpg,png}"
_ADE847_LAYOUT = (
    "ROOT/ADE20K_2021_17_01/{images_detectron2,annotations_detectron2}/validation/ADE_val_NNNNNNNN.{jpg,tif}"
)


def _ade_split(split: str) -> str:
    if split not in _ADE_SPLITS:
        raise ValueError(f"ADE20K split {split!r} unknown; expected one of {sorted(_ADE_SPLITS)}")
    return _ADE_SPLITS[split]


def _ade_pairs(image_dir: Path, mask_dir: Path, mask_ext: str, layout: str) -> list[Sample]:
    _require_dir(image_dir, "image", layout)
    _require_dir(mask_dir, "annotation", layout)
    images = _files_by_stem(image_dir, IMAGE_EXTENSIONS)
    return _pair(sorted(images), images.__getitem__, lambda n: mask_dir / f"{n}{mask_ext}", str(image_dir), layout)


def ade20k_150(root: str | os.PathLike, split: str = "val", limit: int | None = None) -> SegmentationDataset:
    """ADE20K SceneParsing (150 classes): mask 0 ("other") is ignored, k -> class k - 1."""
    base = _find_root(
        Path(root), ["ADEChallengeData2016", "."], "annotations", "ADE20K (ADEChallengeData2016)", _ADE150_LAYOUT
    )
    sub = _ade_split(split)
    samples = _ade_pairs(base / "images" / sub, base / "annotations" / sub, ".png", _ADE150_LAYOUT)
    return SegmentationDataset(_limit(samples, limit), C.ADE150, "ade150", _shift_lut(150), IGNORE_INDEX, None, base)


def ade20k_847(root: str | os.PathLike, split: str = "val", limit: int | None = None) -> SegmentationDataset:
    """ADE20K-full (847 classes) in Mask2Former's detectron2 layout: uint16 TIFF masks, 65535 ignored."""
    base = _find_root(
        Path(root),
        ["ADE20K_2021_17_01", "."],
        "annotations_detectron2",
        "ADE20K-847 (ADE20K_2021_17_01)",
        _ADE847_LAYOUT,
    )
    sub = _ade_split(split)
    samples = _ade_pairs(
        base / "images_detectron2" / sub, base / "annotations_detectron2" / sub, ".tif", _ADE847_LAYOUT
    )
    lut = _identity_lut(847, IGNORE_INDEX_LARGE, 65536)
    return SegmentationDataset(_limit(samples, limit), C.ADE847, "ade847", lut, IGNORE_INDEX_LARGE, None, base)


_CITYSCAPES_LAYOUT = "ROOT/{leftImg8bit/SPLIT/CITY/X_leftImg8bit.png, gtFine/SPLIT/CITY/X_gtFine_labelTrainIds.png}"


def cityscapes(root: str | os.PathLike, split: str = "val", limit: int | None = None) -> SegmentationDataset:
    """Cityscapes fine annotations as 19 train ids: ``*_labelTrainIds.png``, else ``*_labelIds.png`` mapped."""
    base = _find_root(Path(root), ["."], "leftImg8bit", "Cityscapes", _CITYSCAPES_LAYOUT)
    image_dir = _require_dir(base / "leftImg8bit" / split, f"leftImg8bit/{split}", _CITYSCAPES_LAYOUT)
    gt_dir = _require_dir(base / "gtFine" / split, f"gtFine/{split}", _CITYSCAPES_LAYOUT)
    images = _files_by_stem(image_dir, IMAGE_EXTENSIONS)
    train_ids = next(iter(gt_dir.rglob("*_gtFine_labelTrainIds.png")), None) is not None
    suffix = "_gtFine_labelTrainIds.png" if train_ids else "_gtFine_labelIds.png"

    def mask_of(n: str) -> Path:
        return gt_dir / (n.removesuffix("_leftImg8bit") + suffix)

    samples = _pair(sorted(images), images.__getitem__, mask_of, str(image_dir), _CITYSCAPES_LAYOUT)
    if train_ids:
        lut = _identity_lut(19, IGNORE_INDEX, 256)
    else:  # every label id without a train id (void, license plate, ...) is ignored
        lut = value_lut(256, C.CITYSCAPES_LABELID_TO_TRAINID, default=IGNORE_INDEX)
    return SegmentationDataset(_limit(samples, limit), C.CITYSCAPES19, "cityscapes", lut, IGNORE_INDEX, None, base)


_FOLDER_LAYOUT = (
    "ROOT/{classes.txt (one name per line), images/NAME.jpg, masks/NAME.png (values = line numbers, 255 = ignore)}"
)


def read_class_list(classes_txt: str | os.PathLike) -> list[str]:
    """The class names of a folder dataset's ``classes.txt``: one per line (blank lines skipped), value = line number.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: no class, more than 254 (they must fit a uint8 mask beside 255 = ignore), or a repeated name.
    """
    classes_txt = Path(classes_txt)
    if not classes_txt.is_file():
        raise FileNotFoundError(f"{classes_txt}: class list not found; expected layout {_FOLDER_LAYOUT}")
    classes = [line.strip() for line in classes_txt.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not classes or len(classes) >= IGNORE_INDEX:
        raise ValueError(f"{classes_txt}: expected 1..254 class names (one per line), found {len(classes)}")
    dupes = sorted({c for c in classes if classes.count(c) > 1})
    if dupes:
        raise ValueError(f"{classes_txt}: class names repeat: {dupes}")
    return classes


def folder(root: str | os.PathLike, split: str | None = None, limit: int | None = None) -> SegmentationDataset:
    """A folder of ``images/NAME.*`` with ``masks/NAME.png`` and ``classes.txt``; ``split`` is ignored (no splits).

    A class named ``background`` (any case) is scored as background (``background_index``).
    """
    base = Path(root)
    if not base.is_dir():
        raise FileNotFoundError(f"{base}: folder dataset root not found; expected layout {_FOLDER_LAYOUT}")
    classes = read_class_list(base / "classes.txt")
    image_dir = _require_dir(base / "images", "images", _FOLDER_LAYOUT)
    mask_dir = _require_dir(base / "masks", "masks", _FOLDER_LAYOUT)
    images = _files_by_stem(image_dir)
    not_images = [str(p) for p in images.values() if p.suffix.lower() not in IMAGE_EXTENSIONS]
    if not_images:
        raise ValueError(
            f"{image_dir}: {len(not_images)} file(s) are not images (e.g. {', '.join(not_images[:_MAX_LISTED])})"
        )
    masks = _files_by_stem(mask_dir)
    orphans = sorted(set(masks) - set(images))
    if orphans:
        raise ValueError(
            f"{mask_dir}: {len(orphans)} mask(s) without an image in {image_dir} (e.g. {orphans[:_MAX_LISTED]})"
        )
    samples = _pair(sorted(images), images.__getitem__, lambda n: mask_dir / f"{n}.png", str(base), _FOLDER_LAYOUT)
    lowered = [c.lower() for c in classes]
    background_index = lowered.index("background") if "background" in lowered else None
    lut = _identity_lut(len(classes), IGNORE_INDEX, 256)
    return SegmentationDataset(_limit(samples, limit), classes, "folder", lut, IGNORE_INDEX, background_index, base)


DATASETS: dict[str, Callable[..., SegmentationDataset]] = {
    "voc20": partial(pascal_voc, background=False),
    "voc21": partial(pascal_voc, background=True),
    "context59": partial(pascal_context, background=False),
    "context60": partial(pascal_context, background=True),
    "context459": pascal_context_459,
    "ade150": ade20k_150,
    "ade847": ade20k_847,
    "cityscapes": cityscapes,
    "folder": folder,
}


def build_dataset(
    name: str, root: str | os.PathLike, split: str = "val", limit: int | None = None
) -> SegmentationDataset:
    """Build a registered dataset reader.

    Args:
        name: one of :data:`DATASETS`.
        root: the dataset folder (see ``data/README.md``).
        split: split name (``"val"``, ``"train"``); ignored by ``folder``.
        limit: keep only the first ``limit`` images (in sorted / split-list order).

    Raises:
        ValueError: unknown ``name`` (the message lists the options), or a malformed dataset.
        FileNotFoundError: the root or a folder of the layout is missing.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(DATASETS)}")
    return DATASETS[name](root, split=split, limit=limit)

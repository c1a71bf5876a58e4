"""The adapt recipe's data stage: a training view of a labelled folder (plus replay), captions from masks, and the
per-class loss weights and repeats that put the classes new to the starting models forward.

``OUT/data/{train,val}`` are folder datasets: images linked, masks linked (replay masks re-indexed into the new class
list), region captions from the folder's ``captions/`` or, where an image has none, built from its mask (each
ground-truth region captioned from its class name with a seeded template); 1 image in ``VAL_EVERY`` held out for the
stages' validation. Training images that show a new class (one the starting captioner was not trained on) are listed
``NEW_REPEAT`` times.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from autoseg.utils.io import atomic_write_json, atomic_write_text

VAL_EVERY = 20  # one image in VAL_EVERY goes to the stages' validation split
CAPTION_TEMPLATES = ("{a} {name}", "the {name}", "{a} {name} in the image", "{a} {name} in the picture")
IGNORE = 255
# Classes new to the starting models start from nothing while the old ones are only refreshed, yet a random batch gives
# both the same share of the loss. Two levers, both computed from the data (never from class names): (1) repeat-factor
# sampling (LVIS, Gupta et al. 2019) restricted to new classes: a training image that shows one is listed NEW_REPEAT
# times, so every stage sees new classes about twice as often; (2) the auxiliary per-patch class heads of the captioner
# and the segmenter (dropped at export) weight new classes NEW_CLASS_WEIGHT times more: their encoders learn to tell the
# new shapes apart, while the exported caption decoder's name prior is left unweighted (a weighted caption loss would
# also raise how often it names a new class where there is none).
NEW_REPEAT = 2
NEW_CLASS_WEIGHT = 2.0


def article(name: str) -> str:
    """ "an" before a vowel letter, else "a"."""
    return "an" if name[:1].lower() in "aeiou" else "a"


def region_captions(
    mask: np.ndarray, classes: Sequence[str], rng: np.random.Generator, templates: Sequence[str] = CAPTION_TEMPLATES
) -> dict[str, Any]:
    """Captions of an image's ground-truth regions from their class names (the captions dict of data/README.md).

    Args:
        mask: ``H x W`` class ids (``IGNORE`` unscored).
        classes: class names.
        rng: draws one template per region.
        templates: caption templates with ``{name}`` and optionally ``{a}`` (its article).
    """
    regions = []
    for cid in np.unique(mask).tolist():
        if cid == IGNORE or cid >= len(classes):
            continue
        name = classes[cid]
        text = templates[int(rng.integers(len(templates)))].format(a=article(name), name=name)
        regions.append({"class": name, "class_id": int(cid), "caption": text})
    return {"caption": "", "regions": regions}


def read_classes(root: Path) -> list[str]:
    """The class names of a folder dataset's ``classes.txt``."""
    path = root / "classes.txt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; a folder dataset has classes.txt, images/ and masks/")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _link(src: Path, dst: Path) -> None:
    dst.unlink(missing_ok=True)
    os.symlink(src.resolve(), dst)


def _captions_for(src: Path, stem: str, mask: np.ndarray, classes: list[str], seed: int, index: int) -> dict:
    """The folder's own captions of an image when they index ``classes``, regions without one captioned from the mask;
    else captions from the mask alone."""
    made = region_captions(mask, classes, np.random.default_rng([seed, index]))
    path = src / "captions" / f"{stem}.json"
    if not path.is_file():
        return made
    entry = json.loads(path.read_text(encoding="utf-8"))
    regions = [r for r in entry.get("regions", []) if r.get("caption")]
    if not all(0 <= int(r["class_id"]) < len(classes) and r.get("class") == classes[r["class_id"]] for r in regions):
        return made  # captions of another class list (e.g. renamed classes): the masks say more
    have = {int(r["class_id"]) for r in regions}
    return {**entry, "regions": regions + [r for r in made["regions"] if r["class_id"] not in have]}


def class_weights(pixels: np.ndarray) -> list[float]:
    """Per-class weights from training pixel counts: ``sqrt(median / frequency)`` clipped to [1, 3] (1 if absent)."""
    freq = pixels / max(1, pixels.sum())
    median = float(np.median(freq[freq > 0])) if (freq > 0).any() else 0.0
    return [round(float(np.clip(np.sqrt(median / f), 1.0, 3.0)), 3) if f > 0 else 1.0 for f in freq]


def prepare_data(
    data: Path, out: Path, seed: int, replay: Path | None = None, known: Sequence[str] = ()
) -> dict[str, Any]:
    """Write ``out/train`` and ``out/val`` (folder datasets) from ``data`` (and ``replay``), see the module docstring.

    Args:
        data: the new domain's folder dataset.
        out: where the two splits go (emptied first).
        seed: seed of the captions built from masks.
        replay: the starting domain's folder dataset, mixed into the training data.
        known: classes the starting models were trained on; the others are new (none when ``known`` is empty).

    Returns:
        ``classes``, ``new_classes``, ``train`` / ``val`` image counts, ``repeats`` (extra listings of training images
        with a new class), per-class ``class_weights`` (from pixel frequencies of the distinct training images),
        ``feature_weights`` (those, new classes times ``NEW_CLASS_WEIGHT``) and how many images got captions from masks.
    """
    classes = read_classes(data)
    sources = [(data, None)]
    if replay is not None:
        old = read_classes(replay)
        classes += [c for c in old if c not in classes]
        sources.append((replay, np.array([classes.index(c) for c in old] + [IGNORE] * (256 - len(old)), np.uint8)))
    new = [c for c in classes if known and c not in known]
    new_ids = np.array([classes.index(c) for c in new], np.int64)
    shutil.rmtree(out, ignore_errors=True)
    for split in ("train", "val"):
        for sub in ("images", "masks", "captions"):
            (out / split / sub).mkdir(parents=True)
        atomic_write_text(out / split / "classes.txt", "\n".join(classes) + "\n")
    pixels = np.zeros(len(classes), np.int64)
    counts, from_masks, index, repeats = {"train": 0, "val": 0}, 0, 0, 0
    for src, lut in sources:
        prefix = "" if lut is None else "replay_"
        images = {p.stem: p for p in sorted((src / "images").iterdir())}
        for mask_path in sorted((src / "masks").glob("*.png")):
            if mask_path.stem not in images:
                raise ValueError(f"{mask_path}: no image of that name in {src / 'images'}")
            split = "val" if index % VAL_EVERY == VAL_EVERY - 1 else "train"
            stem, image = prefix + mask_path.stem, images[mask_path.stem]
            mask = np.asarray(Image.open(mask_path))
            if lut is not None:  # replay masks are re-indexed: their captions come from the masks too
                mask = lut[mask]
                entry = region_captions(mask, classes, np.random.default_rng([seed, index]))
            else:
                entry = _captions_for(src, mask_path.stem, mask, classes, seed, index)
            copies = NEW_REPEAT if split == "train" and np.isin(new_ids, mask).any() else 1
            for k in range(copies):
                name, dst = stem if k == 0 else f"{stem}_repeat{k}", out / split
                _link(image, dst / "images" / f"{name}{image.suffix}")
                if lut is None:
                    _link(mask_path, dst / "masks" / f"{name}.png")
                else:
                    Image.fromarray(mask, mode="L").save(dst / "masks" / f"{name}.png")
                atomic_write_json(dst / "captions" / f"{name}.json", entry)
            repeats += copies - 1
            from_masks += entry.get("caption", "") == ""
            if split == "train":
                pixels += np.bincount(mask[mask != IGNORE].ravel(), minlength=len(classes))[: len(classes)]
            counts[split] += 1
            index += 1
    if counts["train"] == 0 or counts["val"] == 0:
        raise ValueError(f"{data}: need at least {VAL_EVERY} labelled images (found {index})")
    weights = class_weights(pixels)
    feature = [round(w * (NEW_CLASS_WEIGHT if c in new else 1.0), 3) for c, w in zip(classes, weights, strict=True)]
    return {
        "classes": classes,
        "new_classes": new,
        **counts,
        "repeats": repeats,
        "class_weights": weights,
        "feature_weights": feature,
        "captioned_from_masks": int(from_masks),
    }

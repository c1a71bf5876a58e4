"""Generic "non-class" anchor concepts and prompt templates for the embedding mapper.

Why anchors: with MiniLM, a synonym's cosine to its class (``"ewe"``/``"sheep"`` 0.47) is often lower than a
non-class name's cosine to its nearest class (``"grass"``/``"potted plant"`` ~0.55), so no single threshold separates
them. Asking instead *whether a class is closer than any other known concept* does: a name maps to a class only if
that class beats every anchor. The anchors are the 91 "stuff" categories of COCO-Stuff (Caesar et al., CVPR 2018),
a published, dataset-independent list of background materials and surfaces, written as readable phrases
(``"wall-brick"`` -> ``"brick wall"``, ``"-other"``/``"-stuff"`` suffixes dropped). Anchors that are a class of the
evaluated dataset (or too close to one) are removed per dataset by the backend, so ADE's ``"sky"`` stays a class.
"""

from __future__ import annotations

COCO_STUFF_ANCHORS: tuple[str, ...] = (
    "banner", "blanket", "branch", "bridge", "building", "bush", "cabinet", "cage", "cardboard", "carpet",
    "ceiling", "ceiling tile", "cloth", "clothes", "clouds", "counter", "cupboard", "curtain", "desk", "dirt",
    "door", "fence", "marble floor", "floor", "stone floor", "tile floor", "wood floor", "flower", "fog", "food",
    "fruit", "furniture", "grass", "gravel", "ground", "hill", "house", "leaves", "light", "mat",
    "metal", "mirror", "moss", "mountain", "mud", "napkin", "net", "paper", "pavement", "pillow",
    "plant", "plastic", "platform", "playing field", "railing", "railroad", "river", "road", "rock", "roof",
    "rug", "salad", "sand", "sea", "shelf", "sky", "skyscraper", "snow", "solid", "stairs",
    "stone", "straw", "structure", "table", "tent", "textile", "towel", "tree", "vegetable", "brick wall",
    "concrete wall", "wall", "wall panel", "stone wall", "tile wall", "wood wall", "water", "water drops",
    "window blind", "window", "wood",
)  # fmt: skip

ANCHOR_SETS: dict[str, tuple[str, ...]] = {"coco-stuff": COCO_STUFF_ANCHORS, "none": ()}

# Averaged per name and per class (open_clip style: embeddings averaged then re-normalised).
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a {} in a scene.",
    "{}",
    "there is a {} in the picture.",
)

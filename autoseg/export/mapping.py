"""Generated names -> export categories: every name as its own category, or mapped onto a project's classes by LAVE.

The class mapping is the one ``eval.py`` makes on a ``folder`` dataset with the same ``classes.txt``: the unique names
of the whole prediction folder, sorted, go through :meth:`autoseg.lave.LaveMapper.map_names` under the dataset key
``"folder"`` (so a ``--mapper-cache`` file is shared with ``eval.py``), and a label map becomes class ids by a lookup
table per image. Names that map to no class are dropped (unlabelled) or, with ``keep_unmapped``, kept as categories
of their own after the classes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from autoseg.export.base import Categories

if TYPE_CHECKING:
    from autoseg.evaluate import NameMapper

LAVE_DATASET = "folder"  # the dataset key eval.py gives a folder dataset: same cache entries, same prompts


def map_to_classes(
    vocabularies: Iterable[Sequence[str]], classes: Sequence[str], mapper: NameMapper
) -> dict[str, int | None]:
    """Each unique name of ``vocabularies`` -> index into ``classes`` (None: no class), as ``eval.py`` maps them.

    Raises:
        ValueError: the mapper returned no decision for some name.
        autoseg.lave.MappingError: the mapper's backend failed.
    """
    unique = sorted({name for vocabulary in vocabularies for name in vocabulary})
    mapping = dict(mapper.map_names(unique, list(classes), LAVE_DATASET))
    undecided = [name for name in unique if name not in mapping]
    if undecided:
        raise ValueError(f"the {type(mapper).__name__} mapper returned no class for {undecided[:10]}")
    return mapping


class NameCategories:
    """Turns each image's label map (vocabulary labels) into export category ids.

    Args:
        classes: the project's classes, or None to make every generated name a category.
        mapping: name -> class index (None: no class), from :func:`map_to_classes`; needed with ``classes``.
        keep_unmapped: keep a name without a class as a category of its own (after the classes) instead of dropping
            its pixels.
    """

    def __init__(
        self,
        classes: Sequence[str] | None = None,
        mapping: dict[str, int | None] | None = None,
        keep_unmapped: bool = False,
    ):
        if classes is not None and mapping is None:
            raise ValueError("a class list needs its name -> class mapping (map_to_classes)")
        self.classes = list(classes) if classes is not None else None
        self.mapping = mapping
        self.keep_unmapped = keep_unmapped
        self.categories = Categories(self.classes, open_ended=keep_unmapped)

    def category_of(self, name: str) -> int:
        """The category id of generated ``name`` (0: dropped, its pixels become unlabelled)."""
        if self.mapping is None:
            return self.categories.id_of(name)
        idx = self.mapping.get(name)
        if idx is not None:
            return idx + 1
        return self.categories.id_of(name) if self.keep_unmapped else 0

    def relabel(self, label_map: np.ndarray, vocabulary: Sequence[str]) -> np.ndarray:
        """``H x W`` int32 category ids of a label map whose label ``i`` is ``vocabulary[i - 1]`` (0 stays 0)."""
        lut = np.zeros(len(vocabulary) + 1, dtype=np.int32)
        for i, name in enumerate(vocabulary, start=1):
            lut[i] = self.category_of(name)
        return lut[label_map]

    def class_of(self, name: str) -> str | None:
        """The category name a generated name ends up as (None: dropped), for the summary."""
        cid = self.category_of(name)
        return self.categories.names[cid - 1] if cid else None

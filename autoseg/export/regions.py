"""Connected regions of a label map: what COCO counts as instances, and what ``--min-area`` removes."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from scipy import ndimage

EIGHT_NEIGHBOURS = np.ones((3, 3), dtype=bool)  # a region holds pixels touching at an edge or a corner


def regions(label_map: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """``(label, H x W bool mask)`` per connected region (8-neighbourhood) of each non-zero label, in label order."""
    for label in np.unique(label_map):
        if label == 0:
            continue
        components, n = ndimage.label(label_map == label, structure=EIGHT_NEIGHBOURS)
        for k in range(1, n + 1):
            yield int(label), components == k


def drop_small_regions(label_map: np.ndarray, min_area: int) -> tuple[np.ndarray, int]:
    """Set connected regions (8-neighbourhood) of fewer than ``min_area`` pixels to 0 (unlabelled).

    Returns:
        the new label map (``label_map`` itself when nothing is dropped) and the number of regions dropped.
    """
    if min_area <= 1:
        return label_map, 0
    out, dropped = label_map, 0
    for label in np.unique(label_map):
        if label == 0:
            continue
        components, n = ndimage.label(label_map == label, structure=EIGHT_NEIGHBOURS)
        sizes = np.bincount(components.ravel(), minlength=n + 1)
        small = np.flatnonzero(sizes < min_area)
        small = small[small > 0]
        if small.size:
            out = out.copy() if out is label_map else out
            out[np.isin(components, small)] = 0
            dropped += int(small.size)
    return out, dropped


def bbox(mask: np.ndarray) -> list[int]:
    """COCO ``[x, y, width, height]`` of a non-empty ``H x W`` bool mask, in whole pixels."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]

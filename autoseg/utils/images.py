"""What the Python API accepts as images: PIL images, file paths or uint8 arrays, one or a list."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Union

import numpy as np
import torch
from PIL import Image

from autoseg.utils.io import DEFAULT_MAX_PIXELS, load_image

ImageInput = Union[Image.Image, str, os.PathLike, np.ndarray]  # noqa: UP007 - a runtime alias


def as_image(item: ImageInput, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """One RGB PIL image from a PIL image, a file path (read as ``infer.py`` reads files) or an array.

    Arrays are ``H x W`` (gray) or ``H x W x 3`` / ``H x W x 4`` of uint8 (0..255), or of floats in [0, 1].

    Raises:
        autoseg.utils.io.ImageReadError: an unreadable file (the message names it).
        ValueError: an array of another shape or range, or another type.
    """
    if isinstance(item, Image.Image):
        return item if item.mode == "RGB" else item.convert("RGB")
    if isinstance(item, str | os.PathLike):
        return load_image(item, max_pixels)
    if isinstance(item, np.ndarray):
        array = item
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)) or 0 in array.shape[:2]:
            raise ValueError(f"expected an H x W, H x W x 3 or H x W x 4 image array, got shape {array.shape}")
        if np.issubdtype(array.dtype, np.floating):
            if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
                raise ValueError("a float image array must hold finite values in [0, 1]")
            array = np.round(array * 255)
        elif array.dtype != np.uint8 and (array.min() < 0 or array.max() > 255):
            raise ValueError(f"an integer image array must hold values in [0, 255], got {array.min()}..{array.max()}")
        return Image.fromarray(array.astype(np.uint8)).convert("RGB")
    raise ValueError(f"expected a PIL image, a file path or a numpy array, got {type(item).__name__}")


def as_images(images: ImageInput | Sequence[ImageInput]) -> tuple[list[Image.Image], bool]:
    """``(RGB images, whether a single image was given)``."""
    if isinstance(images, Image.Image | str | os.PathLike | np.ndarray):
        return [as_image(images)], True
    items = list(images)
    if not items:
        raise ValueError("no images given")
    return [as_image(x) for x in items], False


def rgb_tensor(image: Image.Image) -> torch.Tensor:
    """``3 x H x W`` uint8 RGB pixels of a PIL image, in memory of their own (``torch.from_numpy`` warns on the
    read-only array a PIL image exposes)."""
    return torch.from_numpy(np.array(image if image.mode == "RGB" else image.convert("RGB"))).permute(2, 0, 1)

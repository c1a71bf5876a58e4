"""Joint image + mask augmentations for training (torchvision.transforms.v2's crop, flip and resize).

Images and masks move together through every geometric transform; masks are always resampled with nearest
neighbour (as torchvision does for ``tv_tensors.Mask``), so no new class ids appear. Outputs are square, so items
batch with the default collate. Normalisation (each model's own mean/std) is left to the LightningModule, which
takes it from its model's image processor.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import default_collate
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF

NEAREST = InterpolationMode.NEAREST


class SegmentationTransform:
    """Turn a dataset item into tensors at a square size, augmenting when training.

    Train: random resized crop (``scale`` of the area, aspect ``ratio``) to ``size x size`` and a horizontal flip.
    Eval: resize to ``size x size`` (the aspect ratio changes, as the models' own processors do).

    Args:
        size: output side in pixels.
        train: augment (True) or only resize (False).
        scale: area range of the random crop.
        ratio: aspect-ratio range of the random crop.
        hflip: flip probability 0.5 when training.

    Call with a dataset item ``{"image": PIL RGB, "mask": int H x W array (optional), "name": str, ...}``; returns
    ``{"image": 3 x size x size float in [0, 1], "mask": size x size int64 (when given), "name": str, "path": str,
    "orig_size": (H, W) long}``.
    """

    def __init__(
        self,
        size: int,
        train: bool = False,
        scale: Sequence[float] = (0.35, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        hflip: bool = True,
    ):
        if size < 1:
            raise ValueError(f"image size must be positive, got {size}")
        self.size = size
        self.train = train
        self.hflip = hflip
        self.crop = v2.RandomResizedCrop(size, scale=tuple(scale), ratio=tuple(ratio), antialias=True)

    def __call__(self, item: dict[str, Any]) -> dict[str, Any]:
        image = item["image"]
        if not isinstance(image, Image.Image):
            raise TypeError(f"expected a PIL image in item['image'], got {type(image).__name__}")
        pixels = TF.pil_to_tensor(image.convert("RGB"))
        mask = None
        if item.get("mask") is not None:
            mask = torch.as_tensor(np.asarray(item["mask"]), dtype=torch.int64)
            if tuple(mask.shape) != (image.height, image.width):
                raise ValueError(
                    f"{item.get('path', item.get('name', '?'))}: mask {tuple(mask.shape)} and image "
                    f"{(image.height, image.width)} (H, W) differ in size"
                )
        # torchvision's functional ops on plain tensors, drawing what v2.Compose([RandomResizedCrop,
        # RandomHorizontalFlip]) draws (same outputs): the Compose's tv_tensors and pytree handling cost 40% of
        # an item, which the recipe's small CPU training steps wait for
        side = [self.size, self.size]
        if self.train:
            box = self.crop.make_params([pixels])
            pixels = TF.resized_crop(pixels, **box, size=side, antialias=True)
            mask = None if mask is None else TF.resized_crop(mask[None], **box, size=side, interpolation=NEAREST)[0]
            if self.hflip and torch.rand(1) < 0.5:
                pixels, mask = pixels.flip(-1), None if mask is None else mask.flip(-1)
        else:
            pixels = TF.resize(pixels, side, antialias=True)
            mask = None if mask is None else TF.resize(mask[None], side, interpolation=NEAREST)[0]
        result = {
            "image": TF.to_dtype(pixels, torch.float32, scale=True),
            "name": str(item.get("name", "")),
            "path": str(item.get("path", "")),
        }
        if mask is not None:
            result["mask"] = mask
        result["orig_size"] = torch.tensor([image.height, image.width])
        return result


def collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack images ``B x 3 x S x S``, masks ``B x S x S`` and sizes ``B x 2``; names and paths become lists."""
    return default_collate(list(items))

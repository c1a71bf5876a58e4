"""Joint image + mask augmentations for training (torchvision.transforms.v2 with ``tv_tensors.Mask``).

Images and masks move together through every geometric transform; masks are always resampled with nearest
neighbour (torchvision does this for ``tv_tensors.Mask``), so no new class ids appear. Outputs are square, so items
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
from torchvision import tv_tensors
from torchvision.transforms import v2


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
        ops: list[Any] = []
        if train:
            ops.append(v2.RandomResizedCrop(size, scale=tuple(scale), ratio=tuple(ratio), antialias=True))
            if hflip:
                ops.append(v2.RandomHorizontalFlip())
        else:
            ops.append(v2.Resize((size, size), antialias=True))
        ops.append(v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True))
        self.transform = v2.Compose(ops)

    def __call__(self, item: dict[str, Any]) -> dict[str, Any]:
        image = item["image"]
        if not isinstance(image, Image.Image):
            raise TypeError(f"expected a PIL image in item['image'], got {type(image).__name__}")
        sample: dict[str, Any] = {"image": tv_tensors.Image(v2.functional.pil_to_tensor(image.convert("RGB")))}
        if item.get("mask") is not None:
            mask = torch.as_tensor(np.asarray(item["mask"]), dtype=torch.int64)
            if tuple(mask.shape) != (image.height, image.width):
                raise ValueError(
                    f"{item.get('path', item.get('name', '?'))}: mask {tuple(mask.shape)} and image "
                    f"{(image.height, image.width)} (H, W) differ in size"
                )
            sample["mask"] = tv_tensors.Mask(mask)
        out = self.transform(sample)
        result = {
            "image": out["image"].as_subclass(torch.Tensor),
            "name": str(item.get("name", "")),
            "path": str(item.get("path", "")),
        }
        if "mask" in out:
            result["mask"] = out["mask"].as_subclass(torch.Tensor)
        result["orig_size"] = torch.tensor([image.height, image.width])
        return result


def collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack images ``B x 3 x S x S``, masks ``B x S x S`` and sizes ``B x 2``; names and paths become lists."""
    return default_collate(list(items))

"""Joint image + mask augmentations for training (torchvision.transforms.v2's crop, flip and resize).

Images and masks move together through every geometric transform; masks are always resampled with nearest
neighbour (as torchvision does for ``tv_tensors.Mask``), so no new class ids appear. Outputs are square, so items
batch with the default collate. Normalisation (each model's own mean/std) is left to the LightningModule, which
takes it from its model's image processor.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import default_collate
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from autoseg.utils.images import rgb_tensor


@lru_cache(maxsize=4096)
def nearest_index(n_in: int, n_out: int) -> torch.Tensor:
    """Source index of each of ``n_out`` pixels in torch's ``mode="nearest"`` resize from ``n_in`` (ATen's
    ``nearest_idx``: ``min(floor(i * (n_in / n_out)), n_in - 1)`` in float32), which torchvision's mask resize runs."""
    if n_out == n_in:
        return torch.arange(n_out)
    if n_out == 2 * n_in:
        return torch.arange(n_out) // 2
    scale = np.float32(n_in) / np.float32(n_out)
    return torch.from_numpy(np.minimum(np.floor(np.arange(n_out, dtype=np.float32) * scale), n_in - 1).astype(np.int64))


def crop_resize_mask(mask: torch.Tensor, top: int, left: int, height: int, width: int, size: int) -> torch.Tensor:
    """``mask[top:top+height, left:left+width]`` resized to ``size x size`` by nearest neighbour: what
    ``TF.resized_crop(mask, ..., interpolation=NEAREST)`` gives, as one gather (torchvision casts a label map to float
    and back around ``upsample_nearest2d``: most of an item's mask cost)."""
    return mask.index_select(0, nearest_index(height, size) + top).index_select(1, nearest_index(width, size) + left)


def crop_resize_image(pixels: torch.Tensor, top: int, left: int, height: int, width: int, size: int) -> torch.Tensor:
    """``3 x H x W`` uint8 cropped and resized (bilinear, antialiased) to ``size x size`` uint8: torchvision's
    ``resized_crop`` kernel for a uint8 image on the CPU, called without its dispatch."""
    crop = pixels[:, top : top + height, left : left + width]
    if (height, width) == (size, size):
        return crop
    return F.interpolate(crop[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]


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
        pixels = rgb_tensor(image)
        mask = None
        if item.get("mask") is not None:
            mask = torch.from_numpy(np.array(item["mask"]))  # labels of up to 255 stay uint8 until the end
            mask = mask if mask.dtype == torch.uint8 else mask.long()
            if tuple(mask.shape) != (image.height, image.width):
                raise ValueError(
                    f"{item.get('path', item.get('name', '?'))}: mask {tuple(mask.shape)} and image "
                    f"{(image.height, image.width)} (H, W) differ in size"
                )
        # torchvision's kernels on plain tensors, drawing what v2.Compose([RandomResizedCrop, RandomHorizontalFlip])
        # draws (same outputs): the Compose's tv_tensors and pytree handling, the dispatch and the mask's float casts
        # cost most of an item, which the recipe's small CPU training steps wait for
        box = {"top": 0, "left": 0, "height": image.height, "width": image.width}
        if self.train:
            box = self.crop.make_params([pixels])
        pixels = crop_resize_image(pixels, **box, size=self.size)
        mask = None if mask is None else crop_resize_mask(mask, **box, size=self.size)
        if self.train and self.hflip and torch.rand(1) < 0.5:
            pixels, mask = pixels.flip(-1), None if mask is None else mask.flip(-1)
        result = {
            "image": TF.to_dtype_image(pixels, torch.float32, scale=True),
            "name": str(item.get("name", "")),
            "path": str(item.get("path", "")),
        }
        if mask is not None:
            result["mask"] = mask.long()
        result["orig_size"] = torch.tensor([image.height, image.width])
        return result


def collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack images ``B x 3 x S x S``, masks ``B x S x S`` and sizes ``B x 2``; names and paths become lists."""
    return default_collate(list(items))

"""Drop-in layers that compute what a torch layer computes, faster on CPU for the shapes our models use."""

from __future__ import annotations

import torch
from torch import nn


class PatchTransposeConv2d(nn.ConvTranspose2d):
    """A ``ConvTranspose2d`` whose kernel equals its stride (CLIPSeg's upsampling), as one matrix product.

    Each input pixel then writes its own ``k x k`` block of the output, so the layer is a per-pixel linear map
    followed by a rearrangement. oneDNN's transposed convolution took a quarter of a ShapesWorld segmenter training
    step for these small channel counts; the product takes a few percent. Same parameters and state dict, so
    :func:`use_patch_transpose_convs` swaps it in place into a loaded model. The output is ``N x C x H x W`` viewed
    over channels-last memory (a following layer of this kind reads it without a copy).
    """

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        if output_size is not None or x.dim() != 4:
            return super().forward(x, output_size)
        n, c, h, w = x.shape
        k1, k2 = self.kernel_size
        out = self.out_channels
        weight = self.weight.permute(0, 2, 3, 1).reshape(c, k1 * k2 * out)  # columns (k1, k2, out): copy in blocks
        flat = x.permute(0, 2, 3, 1).reshape(n * h * w, c)
        if self.bias is None:
            y = flat @ weight
        else:
            y = torch.addmm(self.bias.repeat(k1 * k2), flat, weight)
        y = y.view(n, h, w, k1, k2, out).permute(0, 1, 3, 2, 4, 5).reshape(n, h * k1, w * k2, out)
        return y.permute(0, 3, 1, 2)


def patch_transpose_eligible(module: nn.Module) -> bool:
    """Whether ``module`` is a plain ``ConvTranspose2d`` that :class:`PatchTransposeConv2d` computes exactly."""
    return (
        type(module) is nn.ConvTranspose2d
        and tuple(module.kernel_size) == tuple(module.stride)
        and tuple(module.padding) == (0, 0)
        and tuple(module.output_padding) == (0, 0)
        and tuple(module.dilation) == (1, 1)
        and module.groups == 1
        and module.padding_mode == "zeros"
    )


def use_patch_transpose_convs(model: nn.Module) -> int:
    """Turn every eligible ``ConvTranspose2d`` of ``model`` into a :class:`PatchTransposeConv2d` (in place, same
    parameters). Returns how many were changed."""
    changed = 0
    for module in model.modules():
        if patch_transpose_eligible(module):
            module.__class__ = PatchTransposeConv2d
            changed += 1
    return changed

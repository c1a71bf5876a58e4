"""PatchTransposeConv2d against torch's ConvTranspose2d: same outputs, gradients and state dict."""

import copy

import pytest
import torch
from torch import nn

from autoseg.models.layers import PatchTransposeConv2d, use_patch_transpose_convs


@pytest.mark.parametrize(("cin", "cout", "k", "bias"), [(48, 24, 4, True), (24, 1, 4, True), (5, 3, 2, False)])
def test_matches_conv_transpose_outputs_and_gradients(cin, cout, k, bias):
    torch.manual_seed(0)
    ref = nn.Sequential(nn.ConvTranspose2d(cin, cout, k, stride=k, bias=bias), nn.ReLU(), nn.Conv2d(cout, 2, 3))
    fast = copy.deepcopy(ref)
    assert use_patch_transpose_convs(fast) == 1 and isinstance(fast[0], PatchTransposeConv2d)
    x = torch.randn(3, cin, 5, 7)
    weights = torch.randn(3, 2, 5 * k - 2, 7 * k - 2)
    grads = []
    for model in (ref, fast):
        xi = x.clone().requires_grad_(True)
        out = model(xi)
        (out * weights).sum().backward()
        grads.append((out.detach(), xi.grad, *[p.grad for p in model.parameters()]))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert fast.state_dict().keys() == ref.state_dict().keys()


def test_only_exact_equivalents_are_swapped():
    model = nn.Sequential(
        nn.ConvTranspose2d(4, 4, 4, stride=2),  # overlapping blocks
        nn.ConvTranspose2d(4, 4, 2, stride=2, padding=1),
        nn.ConvTranspose2d(4, 4, 2, stride=2, groups=2),
        nn.ConvTranspose2d(4, 4, (2, 3), stride=(2, 3)),  # eligible: rectangular but kernel == stride
    )
    assert use_patch_transpose_convs(model) == 1
    assert [type(m) for m in model] == [nn.ConvTranspose2d] * 3 + [PatchTransposeConv2d]
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(model[3](x), nn.functional.conv_transpose2d(x, model[3].weight, model[3].bias, (2, 3)))

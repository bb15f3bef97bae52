"""Weight-only integer storage: the stored codes give back fake_quantize's weight exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedsim.quant.fake import fake_quantize
from fedsim.quant.weight_only import WeightOnlyLinear, quantize_frozen_linears


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("columns", [6, 7])  # int4 packs two a byte: an odd width pads one
def test_the_stored_weight_is_the_fake_quantized_weight(bits, columns):
    torch.manual_seed(0)
    linear = nn.Linear(columns, 5)
    layer = WeightOnlyLinear(linear, bits)
    want = fake_quantize(linear.weight.detach(), bits, axis=0)
    torch.testing.assert_close(layer.weight, want, rtol=0, atol=0)
    x = torch.randn(3, columns)
    torch.testing.assert_close(layer(x), x @ want.T + linear.bias.detach())
    assert layer.codes.numel() == 5 * (columns if bits == 8 else (columns + 1) // 2)


def test_only_frozen_linears_are_replaced():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    model[1].weight.requires_grad_(False)
    model[2].weight.requires_grad_(False)
    assert quantize_frozen_linears(model, "int8", skip=("2",)) == 1
    assert [type(m).__name__ for m in model] == ["Linear", "WeightOnlyLinear", "Linear"]

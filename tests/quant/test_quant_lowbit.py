"""fedsim.quant.lowbit: quantized forward and stochastically rounded backward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedsim.quant import LowBitConfig, prepare_lowbit
from fedsim.quant.lowbit import LowBitConv2d, LowBitLinear, quantize_gradient


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantize_gradient_lands_on_the_per_sample_grid_and_is_unbiased(bits):
    qmax = 2 ** (bits - 1) - 1
    grad = torch.randn(3, 50, generator=torch.Generator().manual_seed(bits))
    step = grad.abs().amax(dim=1, keepdim=True) / qmax
    draws = torch.stack([quantize_gradient(grad, bits) for _ in range(3000)])
    codes = draws / step
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    assert all(draws[0, n].unique().numel() <= 2**bits - 1 for n in range(3))
    assert torch.all((draws - grad).abs() <= step * (1 + 1e-5))
    assert torch.all((draws.mean(0) - grad).abs() < 0.06 * step)  # ~6 standard errors


def test_output_gradient_reaching_the_layer_is_stochastically_rounded():
    bits, batch = 4, 4000
    torch.manual_seed(0)
    layer = prepare_lowbit(nn.Sequential(nn.Linear(5, 7)), LowBitConfig(bits=8, grad_bits=bits))[0]
    upstream = torch.randn(7)
    step = upstream.abs().max() / (2 ** (bits - 1) - 1)
    # One sample: dL/db is that sample's quantized output gradient, on the grid of step.
    layer(torch.randn(1, 5)).mul(upstream).sum().backward()
    codes = layer.bias.grad / step
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    assert not torch.allclose(layer.bias.grad, upstream, atol=1e-3)
    # Many identical samples, independently rounded: their mean is the true gradient.
    layer.bias.grad = None
    layer(torch.randn(batch, 5)).mul(upstream).sum().backward()
    assert torch.all((layer.bias.grad / batch - upstream).abs() < 0.05 * step)


def test_prepare_lowbit_swaps_layers_shares_names_and_trains_conv2d():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 6 * 6, 4))
    lowbit = prepare_lowbit(model, LowBitConfig(bits=4, grad_bits=4))
    assert isinstance(lowbit[0], LowBitConv2d) and isinstance(lowbit[3], LowBitLinear)
    assert type(model[0]) is nn.Conv2d and type(model[3]) is nn.Linear
    assert lowbit.state_dict().keys() == model.state_dict().keys()
    lowbit(torch.rand(2, 1, 8, 8)).square().sum().backward()
    assert all(p.grad is not None and torch.all(torch.isfinite(p.grad)) for p in lowbit.parameters())


def test_lowbit_int8_on_digits_is_within_3_points_of_float(train_digits, make_mlp, float_accuracy):
    torch.manual_seed(0)
    lowbit_accuracy = train_digits(prepare_lowbit(make_mlp(), LowBitConfig(bits=8, grad_bits=8)))
    assert lowbit_accuracy >= float_accuracy - 0.03


def test_config_errors_name_the_value_and_the_allowed_ones():
    with pytest.raises(ValueError, match=r"LowBitConfig.grad_bits: 16 is not supported; allowed: 2, 3, 4, 5, 6, 7, 8"):
        LowBitConfig(grad_bits=16)

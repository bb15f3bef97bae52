"""fedsim.quant.fake: fake quantization in torchao's convention, with a straight-through gradient."""

from __future__ import annotations

import pytest
import torch
from torchao.quantization.qat import IntxFakeQuantizeConfig, IntxFakeQuantizer
from torchao.quantization.quant_primitives import (
    MappingType,
    _fake_quantize_affine,
    choose_qparams_affine,
)

from fedsim.quant import fake_quantize
from fedsim.quant.fake import choose_qparams, quant_range

TORCH_INT = {2: torch.int2, 4: torch.int4, 8: torch.int8}


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_at_most_2_to_bits_values_per_tensor_and_per_channel(bits, symmetric):
    w = torch.randn(16, 40, generator=torch.Generator().manual_seed(bits)) * 3 + 0.5
    assert fake_quantize(w, bits, symmetric=symmetric).unique().numel() <= 2**bits
    per_channel = fake_quantize(w, bits, symmetric=symmetric, axis=0)
    assert all(row.unique().numel() <= 2**bits for row in per_channel)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_round_to_nearest_error_is_at_most_half_a_step(bits):
    w = torch.randn(8, 100, generator=torch.Generator().manual_seed(0))
    scale, _ = choose_qparams(w, bits, axis=0)
    error = (fake_quantize(w, bits, axis=0) - w).abs()
    # The symmetric grid covers [-max|w| - scale/2, max|w| - scale/2]: nothing is clipped by more.
    assert torch.all(error <= scale / 2 * (1 + 1e-5))


def test_stochastic_rounding_is_unbiased_inside_the_range():
    bits, draws = 4, 4000
    x = torch.linspace(-1.0, 0.9, 37)
    scale, _ = choose_qparams(x, bits)
    repeated = x.expand(draws, -1).contiguous()  # same max|x|, so the same per-tensor scale
    samples = fake_quantize(repeated, bits, stochastic=True, generator=torch.Generator().manual_seed(0))
    assert samples.unique().numel() <= 2**bits
    in_range = x * (1.0 / scale) <= quant_range(bits)[1]
    bias = (samples.mean(0) - x)[in_range].abs()
    assert torch.all(bias < 0.05 * scale)  # ~6 standard errors of a 4000-draw mean
    # round-to-nearest is biased on the same grid
    assert (fake_quantize(x, bits) - x)[in_range].abs().max() > 0.3 * scale


def test_stochastic_rounding_is_reproducible_with_a_generator():
    x = torch.randn(100)
    a = fake_quantize(x, 4, stochastic=True, generator=torch.Generator().manual_seed(3))
    b = fake_quantize(x, 4, stochastic=True, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_gradient_is_straight_through_inside_the_range_and_zero_outside():
    # int8 with max|x| = 127.5 / 16: scale = 1/16 exactly, so -max|x| maps to -127.5 -> -128 (in
    # range) and +max|x| to 127.5 -> 128 (clipped to 127).
    x = torch.tensor([-7.96875, -1.0, 0.3, 7.96875], requires_grad=True)
    fake_quantize(x, 8).backward(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert torch.equal(x.grad, torch.tensor([1.0, 2.0, 3.0, 0.0]))


def test_asymmetric_gradient_is_zero_where_clipped():
    x = torch.randn(50, requires_grad=True)
    scale, zero_point = choose_qparams(x, 4, symmetric=False)
    qmin, qmax = quant_range(4)
    codes = torch.round(x.detach() * (1.0 / scale)) + zero_point
    fake_quantize(x, 4, symmetric=False).sum().backward()
    assert torch.equal(x.grad, ((codes >= qmin) & (codes <= qmax)).float())


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_per_channel_matches_torchao_intx_fake_quantizer_exactly(bits):
    w = torch.randn(64, 48, generator=torch.Generator().manual_seed(bits))
    reference = IntxFakeQuantizer(IntxFakeQuantizeConfig(TORCH_INT[bits], "per_channel"))(w)
    assert torch.equal(fake_quantize(w, bits, axis=0), reference)


@pytest.mark.parametrize("bits", [4, 8])
def test_asymmetric_per_token_matches_torchao_intx_fake_quantizer_exactly(bits):
    x = torch.randn(32, 48, generator=torch.Generator().manual_seed(bits)) * 2 + 0.7
    config = IntxFakeQuantizeConfig(TORCH_INT[bits], "per_token", is_symmetric=False)
    assert torch.equal(fake_quantize(x, bits, symmetric=False, axis=0), IntxFakeQuantizer(config)(x))


@pytest.mark.parametrize("symmetric", [True, False])
def test_per_tensor_matches_torchao_affine_primitives_exactly(symmetric):
    x = torch.randn(20, 30, generator=torch.Generator().manual_seed(1)) + 0.3
    mapping = MappingType.SYMMETRIC if symmetric else MappingType.ASYMMETRIC
    block = tuple(x.shape)
    scale, zero_point = choose_qparams_affine(x, mapping, block, torch.int8, -128, 127)
    reference = _fake_quantize_affine(x, block, scale, zero_point, torch.int8, -128, 127)
    assert torch.equal(fake_quantize(x, 8, symmetric=symmetric), reference)


def test_conv2d_weight_per_channel_matches_torchao_on_the_flattened_weight():
    w = torch.randn(6, 3, 3, 3, generator=torch.Generator().manual_seed(2))
    quantized = fake_quantize(w, 4, axis=0)
    reference = IntxFakeQuantizer(IntxFakeQuantizeConfig(torch.int4, "per_channel"))(w.reshape(6, -1))
    assert torch.equal(quantized, reference.reshape(w.shape))
    assert all(channel.unique().numel() <= 16 for channel in quantized)


def test_all_zero_tensor_stays_zero_with_finite_gradient():
    x = torch.zeros(4, 5, requires_grad=True)
    y = fake_quantize(x, 8, axis=0)
    y.sum().backward()
    assert torch.equal(y, torch.zeros(4, 5))
    assert torch.all(torch.isfinite(x.grad))


def test_bad_bits_and_axis_are_named_in_the_error():
    with pytest.raises(ValueError, match=r"bits: 9 is not supported; allowed: 2, 3, 4, 5, 6, 7, 8"):
        fake_quantize(torch.randn(3), 9)
    with pytest.raises(ValueError, match=r"axis: 2 is out of range"):
        fake_quantize(torch.randn(3, 4), 8, axis=2)

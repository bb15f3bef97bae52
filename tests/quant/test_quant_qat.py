"""fedsim.quant.qat: prepare_qat / convert, LSQ, the float warm-up, and QAT on digits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchao.quantization.qat import FakeQuantizedLinear, IntxFakeQuantizer

from fedsim.quant import (
    QATController,
    QATRecipe,
    convert,
    fake_quantize,
    prepare_qat,
    set_qat_enabled,
)
from fedsim.quant.qat import FakeQuantizer, LSQQuantizer, QATConv2d


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 16), nn.ReLU(), nn.Linear(16, 10)
    )


def test_prepare_qat_swaps_linear_and_conv2d_and_leaves_the_input_model_alone():
    model = small_cnn()
    prepared = prepare_qat(model, QATRecipe())
    assert isinstance(prepared[0], QATConv2d)
    assert isinstance(prepared[3], FakeQuantizedLinear) and isinstance(prepared[5], FakeQuantizedLinear)
    assert type(model[0]) is nn.Conv2d and type(model[3]) is nn.Linear
    assert prepared.state_dict().keys() == model.state_dict().keys()
    assert all(
        torch.equal(a, b) for a, b in zip(prepared.state_dict().values(), model.state_dict().values(), strict=True)
    )


def test_torchao_quantizes_symmetric_per_channel_linear_and_fedsim_the_rest():
    assert isinstance(prepare_qat(small_cnn(), QATRecipe())[3].weight_fake_quantizer, IntxFakeQuantizer)
    per_tensor = prepare_qat(small_cnn(), QATRecipe(granularity="per_tensor"))
    assert isinstance(per_tensor[3].weight_fake_quantizer, FakeQuantizer)
    assert isinstance(prepare_qat(small_cnn(), QATRecipe(lsq=True))[3].weight_fake_quantizer, LSQQuantizer)


def test_prepared_layers_compute_with_fake_quantized_weights_and_inputs():
    prepared = prepare_qat(small_cnn(), QATRecipe(weight_bits=4, activation_bits=8))
    x = torch.rand(2, 1, 8, 8)
    conv = prepared[0]
    x_q = fake_quantize(x, 8, symmetric=False, axis=(0, 2, 3))
    expected = F.conv2d(x_q, fake_quantize(conv.weight, 4, axis=0), conv.bias, padding=1)
    assert torch.allclose(conv(x), expected, atol=1e-6)
    linear = prepared[5]
    h = torch.randn(3, 16)
    h_q = fake_quantize(h, 8, symmetric=False, axis=0)
    expected = F.linear(h_q, fake_quantize(linear.weight, 4, axis=0), linear.bias)
    assert torch.allclose(linear(h), expected, atol=1e-6)


@pytest.mark.parametrize(
    "config",
    [
        QATRecipe(weight_bits=8),
        QATRecipe(weight_bits=4, lsq=True),
        QATRecipe(weight_bits=2),
        QATRecipe(weight_bits=4, symmetric=False),
    ],
    ids=["int8", "int4-lsq", "int2", "int4-asym"],
)
def test_convert_bakes_weights_into_plain_layers_with_at_most_2_to_bits_values_per_channel(config):
    prepared = prepare_qat(small_cnn(), config)
    converted = convert(prepared)
    layers = [converted[0], converted[3], converted[5]]
    assert [type(m) for m in layers] == [nn.Conv2d, nn.Linear, nn.Linear]
    for layer in layers:
        assert all(channel.unique().numel() <= 2**config.weight_bits for channel in layer.weight)
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(converted(x), prepared(x), atol=1e-6)
    assert isinstance(prepared[0], QATConv2d)  # convert copies


def test_lsq_step_size_gradient_follows_the_paper_on_a_hand_made_weight():
    # int2: grid [-2, 1]; s = 0.5; w / s = [0.4, -1.4, 2.0, -2.6] -> round [0, -1, 2, -3], the last two clipped.
    w = torch.tensor([0.2, -0.7, 1.0, -1.3], requires_grad=True)
    quantizer = LSQQuantizer(w.detach(), 2, axis=None)
    with torch.no_grad():
        quantizer.scale.fill_(0.5)
    out = quantizer(w)
    assert torch.equal(out, torch.tensor([0.0, -0.5, 0.5, -1.0]))
    out.sum().backward()
    assert torch.equal(w.grad, torch.tensor([1.0, 1.0, 0.0, 0.0]))
    # sum of (round(w/s) - w/s) in range, qmin/qmax clipped: -0.4 + 0.4 + 1 - 2 = -1; times 1/sqrt(4 * 1)
    assert torch.allclose(quantizer.scale.grad, torch.tensor(-0.5))


def test_lsq_step_sizes_get_gradients_in_a_model():
    prepared = prepare_qat(small_cnn(), QATRecipe(weight_bits=4, lsq=True))
    prepared(torch.rand(4, 1, 8, 8)).square().mean().backward()
    scales = [m.weight_fake_quantizer.scale for m in (prepared[0], prepared[3], prepared[5])]
    assert [tuple(s.shape) for s in scales] == [(4, 1, 1, 1), (16, 1), (10, 1)]
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in scales)
    assert "0.weight_fake_quantizer.scale" in prepared.state_dict()


def test_start_fraction_switches_fake_quantization_on_at_the_right_step():
    config = QATRecipe(weight_bits=2, lsq=True, start_fraction=0.3)
    prepared = prepare_qat(small_cnn(), config)
    float_model = small_cnn()
    controller = QATController(prepared, config, total_steps=10)
    assert controller.switch_step == 3
    x = torch.rand(2, 1, 8, 8)
    enabled = []
    for _ in range(6):
        enabled.append(controller.enabled)
        with torch.no_grad():
            assert torch.equal(prepared(x), float_model(x)) != controller.enabled
        controller.step()
    assert enabled == [False, False, False, True, True, True]
    resumed = QATController(prepare_qat(small_cnn(), config), config, total_steps=10)
    resumed.load_state_dict(controller.state_dict())
    assert resumed.enabled and resumed.model[0].weight_fake_quantizer.enabled


def test_set_qat_enabled_turns_every_quantizer_off_and_on():
    prepared = prepare_qat(small_cnn(), QATRecipe(activation_bits=8))
    x = torch.rand(2, 1, 8, 8)
    set_qat_enabled(prepared, False)
    with torch.no_grad():
        assert torch.equal(prepared(x), small_cnn()(x))
    set_qat_enabled(prepared, True)
    with torch.no_grad():
        assert not torch.equal(prepared(x), small_cnn()(x))


def test_config_errors_name_the_value_and_the_allowed_ones():
    with pytest.raises(ValueError, match=r"QATRecipe.weight_bits: 3 is not supported; allowed: 2, 4, 8"):
        QATRecipe(weight_bits=3)
    with pytest.raises(ValueError, match=r"QATRecipe.granularity: 'per_row' is not supported"):
        QATRecipe(granularity="per_row")
    with pytest.raises(ValueError, match=r"lsq"):
        QATRecipe(lsq=True, symmetric=False)
    with pytest.raises(ValueError, match=r"start_fraction: 1.0 is not in \[0, 1\)"):
        QATRecipe(start_fraction=1.0)
    with pytest.raises(ValueError, match=r"already has quantized layers: 0 \(QATConv2d\)"):
        prepare_qat(prepare_qat(small_cnn(), QATRecipe()), QATRecipe())


def test_qat_int8_on_digits_is_within_2_points_of_float(train_digits, make_mlp, float_accuracy):
    prepared = prepare_qat(make_mlp(), QATRecipe(weight_bits=8))
    qat_accuracy = train_digits(prepared)
    assert float_accuracy > 0.93
    assert qat_accuracy >= float_accuracy - 0.02
    with torch.no_grad():
        assert torch.equal(convert(prepared)(torch.ones(1, 64)), prepared(torch.ones(1, 64)))

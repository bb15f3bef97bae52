"""fedsim.quant.ptq: round-to-nearest and AWQ post-training weight quantization."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedsim.quant import quantize_weights_awq, quantize_weights_rtn


def conv_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 8))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_rtn_weights_take_at_most_2_to_bits_values_per_channel(bits):
    model = conv_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    quantized = quantize_weights_rtn(model, bits)
    for layer in (quantized[0], quantized[3]):
        assert all(channel.unique().numel() <= 2**bits for channel in layer.weight)
    per_tensor = quantize_weights_rtn(model, bits, per_channel=False)
    assert per_tensor[3].weight.unique().numel() <= 2**bits
    assert torch.equal(quantized[3].bias, model[3].bias)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def salient_layer_and_inputs() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(64, 32))
    with torch.no_grad():
        # Gaussian, like trained weights; nn.Linear's uniform init puts every channel's
        # largest weights at the same bound, which leaves AWQ no room to scale.
        layer[0].weight.copy_(torch.randn(32, 64) / 8)
    x = torch.randn(256, 64)
    x[:, :4] *= 30.0  # four salient input channels
    return layer, x


def output_mse(model: nn.Module, reference: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return torch.mean((model(x) - reference(x)) ** 2).item()


def test_awq_output_error_is_well_below_rtn_with_salient_input_channels():
    model, x = salient_layer_and_inputs()
    before = model[0].weight.clone()
    rtn_error = output_mse(quantize_weights_rtn(model, 4), model, x)
    awq_error = output_mse(quantize_weights_awq(model, x, 4), model, x)
    assert awq_error < 0.75 * rtn_error  # 0.45 to 0.65 over seeds
    assert torch.equal(model[0].weight, before)


def test_awq_error_is_never_above_rtn_per_layer_on_a_conv_model():
    model = conv_mlp()
    batches = [torch.randn(16, 2, 6, 6) for _ in range(2)]
    awq = quantize_weights_awq(model, batches, 3, grid_size=10)
    rtn = quantize_weights_rtn(model, 3)
    x = torch.cat(batches)
    with torch.no_grad():
        conv_in, linear_in = x, model[2](model[1](model[0](x)))
    assert output_mse(awq[0], model[0], conv_in) <= output_mse(rtn[0], model[0], conv_in)
    assert output_mse(awq[3], model[3], linear_in) <= output_mse(rtn[3], model[3], linear_in)


def test_awq_rejects_a_bad_grid_and_empty_calibration():
    model, _ = salient_layer_and_inputs()
    with pytest.raises(ValueError, match=r"grid_size: 0 is not a positive integer"):
        quantize_weights_awq(model, torch.randn(2, 64), 4, grid_size=0)
    with pytest.raises(ValueError, match=r"no batches"):
        quantize_weights_awq(model, [], 4)

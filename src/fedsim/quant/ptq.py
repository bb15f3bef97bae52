"""Post-training weight quantization of a trained (global) model for deployment.

Both functions quantize the weights of every ``nn.Linear`` and ``nn.Conv2d`` symmetrically
(torchao's convention, :mod:`fedsim.quant.fake`), keep biases in float, and return a new model
with the dequantized float weights; the input model is not modified.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from fedsim.quant.fake import fake_quantize


def _layers(model: nn.Module) -> list[tuple[str, nn.Linear | nn.Conv2d]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)]


@torch.no_grad()
def quantize_weights_rtn(model: nn.Module, bits: int, per_channel: bool = True) -> nn.Module:
    """Round-to-nearest weight quantization.

    ``W_q = clamp(round(W * (1 / scale)), qmin, qmax) * scale`` with
    ``scale = max|W| / ((qmax - qmin) / 2)`` per output channel (or per tensor).

    Parameters
    ----------
    model : nn.Module
        Float model; it is not modified.
    bits : int
        Bit width, 2 to 8: each channel's weights take at most ``2^bits`` values.
    per_channel : bool, default True
        One scale per output channel (``True``) or per tensor.

    Returns
    -------
    nn.Module
        A deep copy with quantized weights.
    """
    model = copy.deepcopy(model)
    axis = 0 if per_channel else None
    for _, layer in _layers(model):
        layer.weight.copy_(fake_quantize(layer.weight, bits, axis=axis))
    return model


def _layer_output(layer: nn.Linear | nn.Conv2d, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight)
    return layer._conv_forward(x, weight, None)


def _channel_magnitude(layer: nn.Linear | nn.Conv2d, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Mean |activation| per input channel, and the shape that broadcasts it over the weight."""
    if isinstance(layer, nn.Linear):
        return x.abs().reshape(-1, layer.in_features).mean(dim=0), (1, layer.in_features)
    return x.abs().mean(dim=(0, 2, 3)), (1, layer.in_channels, 1, 1)


@torch.no_grad()
def _awq_weight(
    layer: nn.Linear | nn.Conv2d, x: torch.Tensor, bits: int, axis: int | None, grid_size: int
) -> torch.Tensor:
    weight = layer.weight
    reference = _layer_output(layer, x, weight)
    magnitude, shape = _channel_magnitude(layer, x)
    best_weight, best_error = None, float("inf")
    for alpha in torch.linspace(0.0, 1.0, grid_size + 1).tolist():
        s = magnitude.pow(alpha).clamp(min=1e-4)
        s = (s / (s.max() * s.min()).sqrt()).reshape(shape)
        candidate = fake_quantize(weight * s, bits, axis=axis) / s
        error = torch.mean((_layer_output(layer, x, candidate) - reference) ** 2).item()
        if best_weight is None or error < best_error:
            best_weight, best_error = candidate, error
    return best_weight


@torch.no_grad()
def quantize_weights_awq(
    model: nn.Module,
    calibration_inputs: torch.Tensor | Iterable[torch.Tensor],
    bits: int,
    *,
    per_channel: bool = True,
    grid_size: int = 20,
) -> nn.Module:
    """Activation-aware weight quantization (AWQ).

    Lin et al. 2023, "AWQ: Activation-aware Weight Quantization for LLM Compression and
    Acceleration", arXiv 2306.00978. Weights that meet large activations matter most; scaling
    input channel ``j`` of ``W`` up by ``s_j`` before quantizing (and the activation down by
    ``s_j``) shrinks their relative rounding error. Per layer, with calibration inputs ``X``::

        s(alpha) = mean|X_j| ** alpha                       (per input channel j)
        W(alpha) = Q(W * diag(s)) * diag(s)^-1
        alpha*   = argmin_{alpha in {0, 1/n, ..., 1}} || X W(alpha)^T - X W^T ||^2

    As in the authors' code, ``s`` is clamped below by 1e-4 and normalized by
    ``sqrt(max(s) * min(s))``. The division by ``s`` is folded into the returned float weight
    (a deployment would fold it into the preceding operation instead and store ``Q(W s)``);
    the layer's output is the same. ``alpha = 0`` is plain round-to-nearest, so each layer's
    calibration error is at most RTN's. Every layer sees the float model's activations (one
    calibration pass). The weight-clipping search of the paper is not done.

    Linear and Conv2d (``groups == 1``) layers reached by the calibration pass get AWQ; other
    grouped convolutions and layers the pass does not reach get round-to-nearest.

    Parameters
    ----------
    model : nn.Module
        Float model; it is not modified.
    calibration_inputs : torch.Tensor or iterable of torch.Tensor
        One batch, or batches, of model inputs.
    bits : int
        Bit width, 2 to 8.
    per_channel : bool, default True
        One scale per output channel (``True``) or per tensor.
    grid_size : int, default 20
        Number of grid intervals of ``alpha`` in [0, 1] (``grid_size + 1`` candidates).

    Returns
    -------
    nn.Module
        A deep copy with quantized weights.
    """
    if isinstance(grid_size, bool) or not isinstance(grid_size, int) or grid_size < 1:
        raise ValueError(f"quantize_weights_awq.grid_size: {grid_size!r} is not a positive integer")
    batches = [calibration_inputs] if isinstance(calibration_inputs, torch.Tensor) else list(calibration_inputs)
    if not batches:
        raise ValueError("quantize_weights_awq.calibration_inputs: no batches given")
    model = copy.deepcopy(model)
    layers = _layers(model)
    seen: dict[str, list[torch.Tensor]] = {name: [] for name, _ in layers}
    handles = [
        layer.register_forward_hook(lambda _m, args, _out, name=name: seen[name].append(args[0].detach()))
        for name, layer in layers
    ]
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        for batch in batches:
            model(batch)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.train(training)
    axis = 0 if per_channel else None
    for name, layer in layers:
        awq_fits = seen[name] and (isinstance(layer, nn.Linear) or layer.groups == 1)
        if awq_fits:
            new_weight = _awq_weight(layer, torch.cat(seen[name]), bits, axis, grid_size)
        else:
            new_weight = fake_quantize(layer.weight, bits, axis=axis)
        layer.weight.copy_(new_weight)
    return model

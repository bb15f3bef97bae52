"""Low-bit training: quantized forward and backward passes, simulated in float.

Fully quantized training (FQT) in the sense of Chen et al. 2020, "A Statistical Framework for
Low-bitwidth Training of Deep Neural Networks" (NeurIPS 2020, arXiv 2010.14298), building on
Banner et al. 2018, "Scalable Methods for 8-bit Training of Neural Networks" (arXiv
1805.11046). For a layer ``Y = X W^T + b`` (or the Conv2d equivalent):

Forward::

    X_q = Q_f(X)     per tensor, asymmetric, round-to-nearest
    W_q = Q_f(W)     per output channel, symmetric, round-to-nearest
    Y   = X_q W_q^T + b

Backward, with ``G = dL/dY``::

    G_q   = Q_b(G)   per sample (row), symmetric, stochastic rounding
    dL/dX = (G_q W_q)    * 1[X in range]     (straight-through past Q_f)
    dL/dW = (G_q^T X_q)  * 1[W in range]
    dL/db = sum_n G_q

``Q_f`` is :func:`fedsim.quant.fake.fake_quantize` (torchao's convention). ``Q_b`` uses the
scale ``max_n |G_n| / qmax`` so that no entry is clipped and stochastic rounding keeps
``E[G_q] = G``: the backward pass is an unbiased estimate of the QAT gradient (Chen et al.).
Per-sample scales are Chen et al.'s "per-sample quantization", which their variance analysis
favours over a per-tensor scale at the same bit width. The rounding noise is drawn from
the generator given to :func:`prepare_lowbit` (fedsim seeds one per client and round), else
from torch's global generator.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fedsim.quant.fake import (
    SUPPORTED_BITS,
    check_choice,
    fake_quantize,
    quant_range,
    stochastic_round,
)
from fedsim.quant.layers import conv2d_sharing, reject_prepared, swap_layers


@dataclass(frozen=True)
class LowBitConfig:
    """Bit widths of low-bit training.

    Parameters
    ----------
    bits : int, default 8
        Bit width of the forward pass (weights and layer inputs), 2 to 8.
    grad_bits : int, default 8
        Bit width of the output gradients in the backward pass, 2 to 8, stochastically rounded.
    """

    bits: int = 8
    grad_bits: int = 8

    def __post_init__(self) -> None:
        check_choice("LowBitConfig.bits", self.bits, SUPPORTED_BITS)
        check_choice("LowBitConfig.grad_bits", self.grad_bits, SUPPORTED_BITS)


def quantize_gradient(grad: torch.Tensor, bits: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample symmetric stochastic quantization of a gradient.

    ``G_q[n] = SR(G[n] * (qmax / max|G[n]|)) * (max|G[n]| / qmax)`` for each sample ``n``
    (index along dimension 0), ``SR`` unbiased stochastic rounding: ``E[G_q] = G``,
    ``|G_q - G| < max|G[n]| / qmax`` and at most ``2^bits - 1`` distinct values per sample.

    Parameters
    ----------
    grad : torch.Tensor
        Gradient, samples along dimension 0.
    bits : int
        Bit width, 2 to 8.
    generator : torch.Generator, optional
        Source of the rounding noise (torch's global generator if ``None``).
    """
    qmax = quant_range(bits)[1]
    dims = tuple(range(1, grad.dim()))
    amax = torch.amax(grad.abs(), dim=dims, keepdim=True) if dims else grad.abs()
    scale = amax / qmax
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.clamp(stochastic_round(grad * (1.0 / safe), generator), -qmax, qmax)
    return codes * scale


class _QuantizeGradient(torch.autograd.Function):
    """Identity forward; :func:`quantize_gradient` on the way back."""

    @staticmethod
    def forward(ctx, y, bits, generator):
        ctx.bits, ctx.generator = bits, generator
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        return quantize_gradient(grad, ctx.bits, generator=ctx.generator), None, None


class _LowBitLayer:
    """What :class:`LowBitLinear` and :class:`LowBitConv2d` share: the bit widths, the
    rounding generator, ``Q_f`` of the input and the weight, and ``Q_b`` on the way back."""

    bits: int
    grad_bits: int
    generator: torch.Generator | None
    weight: torch.Tensor

    def _take(self, config: LowBitConfig, generator: torch.Generator | None):
        self.bits, self.grad_bits, self.generator = config.bits, config.grad_bits, generator
        return self

    def _quantized(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return fake_quantize(x, self.bits, symmetric=False), fake_quantize(self.weight, self.bits, axis=0)

    def _gradient_quantized(self, y: torch.Tensor) -> torch.Tensor:
        return _QuantizeGradient.apply(y, self.grad_bits, self.generator)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bits={self.bits}, grad_bits={self.grad_bits}"


class LowBitLinear(_LowBitLayer, nn.Linear):
    """``nn.Linear`` trained with quantized forward and backward passes (see module docstring)."""

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: LowBitConfig,
                    generator: torch.Generator | None = None) -> LowBitLinear:
        """Wrap ``linear``, sharing its parameters."""
        new = cls(linear.in_features, linear.out_features, linear.bias is not None,
                  device=linear.weight.device, dtype=linear.weight.dtype)
        new.weight = linear.weight
        new.bias = linear.bias
        return new._take(config, generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_q, w_q = self._quantized(x)
        return self._gradient_quantized(F.linear(x_q, w_q, self.bias))


class LowBitConv2d(_LowBitLayer, nn.Conv2d):
    """``nn.Conv2d`` trained with quantized forward and backward passes (see module docstring)."""

    @classmethod
    def from_conv2d(cls, conv: nn.Conv2d, config: LowBitConfig,
                    generator: torch.Generator | None = None) -> LowBitConv2d:
        """Wrap ``conv``, sharing its parameters."""
        return conv2d_sharing(cls, conv)._take(config, generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_q, w_q = self._quantized(x)
        return self._gradient_quantized(self._conv_forward(x_q, w_q, self.bias))


def prepare_lowbit(model: nn.Module, config: LowBitConfig, generator: torch.Generator | None = None) -> nn.Module:
    """Copy ``model`` with every ``nn.Linear`` / ``nn.Conv2d`` trained in low bit width.

    Parameters
    ----------
    model : nn.Module
        Float model; it is not modified.
    config : LowBitConfig
        Forward and backward bit widths.
    generator : torch.Generator, optional
        Source of the gradients' rounding noise, on the model's device (torch's global
        generator if None).

    Returns
    -------
    nn.Module
        A deep copy with :class:`LowBitLinear` / :class:`LowBitConv2d` layers. Parameter names
        are unchanged and stay float (the master weights), so its ``state_dict`` loads into
        the float model.
    """
    reject_prepared(model, (LowBitLinear, LowBitConv2d), "prepare_lowbit")
    model = copy.deepcopy(model)

    def replace(module: nn.Module) -> nn.Module | None:
        if isinstance(module, nn.Linear):
            return LowBitLinear.from_linear(module, config, generator)
        if isinstance(module, nn.Conv2d):
            return LowBitConv2d.from_conv2d(module, config, generator)
        return None

    swap_layers(model, replace)
    return model

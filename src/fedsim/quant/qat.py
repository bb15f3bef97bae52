"""Quantization-aware training (QAT) of Linear and Conv2d layers.

``prepare_qat(model, QATRecipe(...))`` returns a copy of ``model`` whose ``nn.Linear`` and
``nn.Conv2d`` layers fake-quantize their weights (and, when asked, their inputs) in the
forward pass and train through the straight-through estimator (Jacob et al. 2018,
"Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
Inference", arXiv 1712.05877). ``convert(model)`` bakes the quantized weights in and returns
plain layers.

Linear layers become torchao's ``FakeQuantizedLinear``. Where torchao's QAT fits (symmetric
per-channel weights, no LSQ) its ``IntxFakeQuantizer`` does the work; elsewhere (per-tensor or
asymmetric weights, LSQ, Conv2d, which torchao's QAT does not cover) fedsim's quantizers
implement the same numerics (:mod:`fedsim.quant.fake`). Layer parameters keep their names
(``weight``, ``bias``), so a prepared model loads a float model's ``state_dict`` unchanged;
with LSQ each layer also holds ``weight_fake_quantizer.scale``.

Training schedule: fake quantization is on from the first step unless a
:class:`QATController` holds it off for the first ``start_fraction`` of the steps (train in
float, then quantization-aware for the rest: Dremov et al. 2025, "Compute-Optimal
Quantization-Aware Training"). Call ``controller.step()`` after every optimizer step, or switch
by hand with :func:`set_qat_enabled`.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from fedsim.quant.fake import check_choice, choose_qparams, fake_quantize, quant_range
from fedsim.quant.layers import conv2d_sharing, reject_prepared, swap_layers
from fedsim.quant.torchao_import import quiet_torchao_import

with quiet_torchao_import():
    from torchao.quantization.qat import (
        FakeQuantizedLinear,
        FakeQuantizerBase,
        IntxFakeQuantizeConfig,
    )

WEIGHT_BITS = (2, 4, 8)
ACTIVATION_BITS = (None, 2, 4, 8)
GRANULARITIES = ("per_channel", "per_tensor")
_TORCH_INT = {2: torch.int2, 4: torch.int4, 8: torch.int8}


@dataclass(frozen=True)
class QATRecipe:
    """What quantization-aware training simulates.

    (Named so as not to shadow torchao's own ``torchao.quantization.qat.QATConfig``, which
    takes different arguments and covers Linear and Embedding only.)

    Parameters
    ----------
    weight_bits : int, default 8
        Weight bit width: 8, 4 or 2.
    granularity : str, default "per_channel"
        ``"per_channel"`` (one scale per output channel) or ``"per_tensor"`` weight scales.
    symmetric : bool, default True
        Symmetric weight grid (zero point 0) or asymmetric with an integer zero point.
    activation_bits : int or None, default None
        Bit width of the layer inputs (8, 4 or 2), or ``None`` to keep them in float.
        Inputs are quantized dynamically and asymmetrically, one (scale, zero point) per
        input vector: per token for Linear (torchao's ``"per_token"``), per pixel over the
        channels for Conv2d.
    lsq : bool, default False
        Learn the weight step size (LSQ, Esser et al. 2020, arXiv 1902.08153) instead of
        taking it from ``max|w|`` at every step. Needs ``symmetric=True``.
    start_fraction : float, default 0.0
        Fraction of the training steps, in [0, 1), run in float before fake quantization
        switches on (applied by :class:`QATController`).
    """

    weight_bits: int = 8
    granularity: str = "per_channel"
    symmetric: bool = True
    activation_bits: int | None = None
    lsq: bool = False
    start_fraction: float = 0.0

    def __post_init__(self) -> None:
        check_choice("QATRecipe.weight_bits", self.weight_bits, WEIGHT_BITS)
        check_choice("QATRecipe.granularity", self.granularity, GRANULARITIES)
        check_choice("QATRecipe.activation_bits", self.activation_bits, ACTIVATION_BITS)
        if self.lsq and not self.symmetric:
            raise ValueError("QATRecipe.lsq: True needs symmetric=True (LSQ learns a step size, not a zero point)")
        if isinstance(self.start_fraction, bool) or not 0.0 <= self.start_fraction < 1.0:
            raise ValueError(f"QATRecipe.start_fraction: {self.start_fraction!r} is not in [0, 1)")

    @property
    def weight_axis(self) -> int | None:
        """Axis of the weight scales: 0 (output channels) or ``None`` (per tensor)."""
        return 0 if self.granularity == "per_channel" else None


class FakeQuantizer(nn.Module):
    """Dynamic fake quantizer: (scale, zero point) recomputed from every tensor it sees.

    Parameters
    ----------
    bits : int
        Bit width.
    symmetric : bool
        Symmetric or asymmetric grid.
    axis : int or tuple of int or None
        Axes that keep their own scale (see :func:`fedsim.quant.fake.fake_quantize`).
    """

    def __init__(self, bits: int, *, symmetric: bool, axis: int | tuple[int, ...] | None) -> None:
        super().__init__()
        quant_range(bits)
        self.bits = bits
        self.symmetric = symmetric
        self.axis = axis
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        return fake_quantize(x, self.bits, symmetric=self.symmetric, axis=self.axis)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, symmetric={self.symmetric}, axis={self.axis}, enabled={self.enabled}"


class _LSQFunction(torch.autograd.Function):
    """LSQ fake quantization with the paper's gradients.

    Forward ``w_q = clamp(round(w * (1 / s)), qmin, qmax) * s``. Backward
    ``dw_q/dw = 1`` in range, ``0`` clipped; ``dw_q/ds = round(w/s) - w/s`` in range and
    ``qmin`` or ``qmax`` when clipped, summed over the weights sharing ``s`` and scaled by
    ``g = 1 / sqrt(n * qmax)`` (``n`` weights per step size).
    """

    @staticmethod
    def forward(ctx, w, scale, qmin, qmax, grad_scale):
        s = torch.clamp(scale, min=torch.finfo(scale.dtype).smallest_normal)
        y = w * (1.0 / s)
        rounded = torch.round(y)
        in_range = (rounded >= qmin) & (rounded <= qmax)
        q = torch.clamp(rounded, qmin, qmax)
        ctx.save_for_backward(y, q, in_range)
        ctx.scale_shape = scale.shape
        ctx.grad_scale = grad_scale
        return q * s

    @staticmethod
    def backward(ctx, grad):
        y, q, in_range = ctx.saved_tensors
        grad_w = grad * in_range
        grad_s = (grad * (q - torch.where(in_range, y, torch.zeros_like(y)))).sum_to_size(ctx.scale_shape)
        return grad_w, grad_s * ctx.grad_scale, None, None, None


class LSQQuantizer(nn.Module):
    """Symmetric weight fake quantizer with a learned step size.

    Learned Step Size Quantization (Esser et al. 2020, arXiv 1902.08153):
    ``w_q = clamp(round(w / s), -Q_N, Q_P) * s`` with ``s`` trained by gradient descent,
    ``dw_q/ds = round(w/s) - w/s`` inside the range and ``-Q_N`` or ``Q_P`` outside, and the
    step-size gradient scaled by ``g = 1 / sqrt(n * Q_P)`` (``n`` weights sharing ``s``).
    The step size starts at torchao's dynamic scale ``max|w| / ((qmax - qmin) / 2)`` (as
    torchao's range learning does) rather than the paper's ``2 mean|w| / sqrt(Q_P)``, so the
    first step equals the dynamic quantizer's.

    Parameters
    ----------
    weight : torch.Tensor
        Weight the step size is initialized from.
    bits : int
        Bit width.
    axis : int or None
        0 for one step size per output channel, ``None`` for one per tensor.
    """

    def __init__(self, weight: torch.Tensor, bits: int, *, axis: int | None) -> None:
        super().__init__()
        self.bits = bits
        self.axis = axis
        scale, _ = choose_qparams(weight, bits, symmetric=True, axis=axis)
        self.scale = nn.Parameter(scale.clone())
        per_scale = weight.numel() // scale.numel()
        self.grad_scale = 1.0 / math.sqrt(per_scale * quant_range(bits)[1])
        self.enabled = True

    @torch.no_grad()
    def initialize(self, weight: torch.Tensor) -> None:
        """Reset the step size to the dynamic scale of ``weight``."""
        scale, _ = choose_qparams(weight, self.bits, symmetric=True, axis=self.axis)
        self.scale.copy_(scale)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return w
        qmin, qmax = quant_range(self.bits)
        return _LSQFunction.apply(w, self.scale, qmin, qmax, self.grad_scale)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, axis={self.axis}, enabled={self.enabled}"


class QATConv2d(nn.Conv2d):
    """``nn.Conv2d`` with fake-quantized weights and, optionally, inputs.

    Mirrors torchao's ``FakeQuantizedLinear``: ``weight_fake_quantizer`` and
    ``activation_fake_quantizer`` submodules (the latter may be ``None``).
    """

    weight_fake_quantizer: nn.Module
    activation_fake_quantizer: nn.Module | None

    @classmethod
    def from_conv2d(
        cls, conv: nn.Conv2d, weight_fake_quantizer: nn.Module, activation_fake_quantizer: nn.Module | None
    ) -> QATConv2d:
        """Wrap ``conv``, sharing its parameters."""
        new = conv2d_sharing(cls, conv)
        new.weight_fake_quantizer = weight_fake_quantizer
        new.activation_fake_quantizer = activation_fake_quantizer
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation_fake_quantizer is not None:
            x = self.activation_fake_quantizer(x)
        return self._conv_forward(x, self.weight_fake_quantizer(self.weight), self.bias)


_PREPARED = (FakeQuantizedLinear, QATConv2d)
_QUANTIZERS = (FakeQuantizerBase, FakeQuantizer, LSQQuantizer)


def _weight_quantizer(layer: nn.Module, config: QATRecipe) -> nn.Module:
    if config.lsq:
        return LSQQuantizer(layer.weight, config.weight_bits, axis=config.weight_axis)
    return FakeQuantizer(config.weight_bits, symmetric=config.symmetric, axis=config.weight_axis)


def _torchao_weight_fits(linear: nn.Linear, config: QATRecipe) -> bool:
    """Whether torchao's per-channel IntxFakeQuantizer covers this layer's weights."""
    return config.granularity == "per_channel" and config.symmetric and not config.lsq and linear.in_features > 1


def _qat_linear(linear: nn.Linear, config: QATRecipe) -> FakeQuantizedLinear:
    activation_config = None
    if config.activation_bits is not None:
        activation_config = IntxFakeQuantizeConfig(_TORCH_INT[config.activation_bits], "per_token", is_symmetric=False)
    if _torchao_weight_fits(linear, config):
        weight_config = IntxFakeQuantizeConfig(_TORCH_INT[config.weight_bits], "per_channel")
        return FakeQuantizedLinear.from_linear(linear, activation_config, weight_config)
    new = FakeQuantizedLinear.from_linear(linear, activation_config, None)
    new.weight_fake_quantizer = _weight_quantizer(linear, config)
    return new


def _qat_conv2d(conv: nn.Conv2d, config: QATRecipe) -> QATConv2d:
    activation_quantizer = None
    if config.activation_bits is not None:
        activation_quantizer = FakeQuantizer(config.activation_bits, symmetric=False, axis=(0, 2, 3))
    return QATConv2d.from_conv2d(conv, _weight_quantizer(conv, config), activation_quantizer)


def prepare_qat(model: nn.Module, config: QATRecipe) -> nn.Module:
    """Copy ``model`` with every ``nn.Linear`` and ``nn.Conv2d`` fake-quantized per ``config``.

    Parameters
    ----------
    model : nn.Module
        Float model; it is not modified.
    config : QATRecipe
        Bit widths, granularity, symmetry, LSQ and the float warm-up fraction.

    Returns
    -------
    nn.Module
        A deep copy whose Linear layers are torchao ``FakeQuantizedLinear`` and Conv2d layers
        :class:`QATConv2d`, with fake quantization enabled. Build the optimizer on it.
    """
    reject_prepared(model, _PREPARED, "prepare_qat")
    model = copy.deepcopy(model)

    def replace(module: nn.Module) -> nn.Module | None:
        if isinstance(module, nn.Linear):
            return _qat_linear(module, config)
        if isinstance(module, nn.Conv2d):
            return _qat_conv2d(module, config)
        return None

    swap_layers(model, replace)
    return model


def set_qat_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch every fake quantizer of a prepared ``model`` on or off (off: float forward)."""
    for module in model.modules():
        if isinstance(module, _QUANTIZERS):
            module.enabled = enabled


@torch.no_grad()
def _quantized_weight(layer: FakeQuantizedLinear | QATConv2d) -> torch.Tensor:
    quantizer = layer.weight_fake_quantizer
    was_enabled = quantizer.enabled
    quantizer.enabled = True
    weight = quantizer(layer.weight).detach().clone()
    quantizer.enabled = was_enabled
    return weight


def quantized_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The fake-quantized (dequantized float) weight of every prepared layer of ``model``,
    by state-dict name: the values the quantized model computes with, on its grid."""
    return {f"{name}.weight": _quantized_weight(module) for name, module in model.named_modules()
            if isinstance(module, _PREPARED)}


def convert(model: nn.Module) -> nn.Module:
    """Copy a prepared ``model`` with quantized weights baked into plain layers.

    Every ``FakeQuantizedLinear`` becomes ``nn.Linear`` and every :class:`QATConv2d`
    ``nn.Conv2d``, whose weight is the fake-quantized (dequantized float) weight: at most
    ``2^weight_bits`` distinct values per scale. Input fake quantization is dropped. The
    quantizers are applied even where they are switched off.

    Parameters
    ----------
    model : nn.Module
        Model from :func:`prepare_qat`; it is not modified.

    Returns
    -------
    nn.Module
        A deep copy with plain ``nn.Linear`` / ``nn.Conv2d`` layers.
    """
    model = copy.deepcopy(model)

    def replace(module: nn.Module) -> nn.Module | None:
        if isinstance(module, FakeQuantizedLinear):
            plain = nn.Linear(
                module.in_features,
                module.out_features,
                module.bias is not None,
                device=module.weight.device,
                dtype=module.weight.dtype,
            )
        elif isinstance(module, QATConv2d):
            plain = nn.Conv2d(
                module.in_channels,
                module.out_channels,
                module.kernel_size,
                stride=module.stride,
                padding=module.padding,
                dilation=module.dilation,
                groups=module.groups,
                bias=module.bias is not None,
                padding_mode=module.padding_mode,
                device=module.weight.device,
                dtype=module.weight.dtype,
            )
        else:
            return None
        plain.weight = nn.Parameter(_quantized_weight(module))
        plain.bias = module.bias
        return plain

    swap_layers(model, replace)
    return model


class QATController:
    """Switches fake quantization on after the float warm-up of ``config.start_fraction``.

    The first ``switch_step = floor(start_fraction * total_steps)`` optimizer steps run in
    float; from then on the model is fake-quantized. At the switch, LSQ step sizes are
    re-initialized from the (float-trained) weights. Usage::

        model = prepare_qat(model, config)
        controller = QATController(model, config, total_steps)
        for batch in batches:
            loss(model(batch)).backward(); optimizer.step(); optimizer.zero_grad()
            controller.step()

    In federated training count the steps over all rounds and keep ``state_dict()`` in the
    client's persistent state; ``load_state_dict`` restores the phase without re-initializing
    step sizes.

    Parameters
    ----------
    model : nn.Module
        Model from :func:`prepare_qat`.
    config : QATRecipe
        Its ``start_fraction`` sets the switch.
    total_steps : int
        Number of optimizer steps of the whole training run.
    """

    def __init__(self, model: nn.Module, config: QATRecipe, total_steps: int) -> None:
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"QATController.total_steps: {total_steps!r} is not a positive integer")
        self.model = model
        self.switch_step = math.floor(config.start_fraction * total_steps)
        self.steps_done = 0
        set_qat_enabled(model, self.enabled)

    @property
    def enabled(self) -> bool:
        """Whether the next forward pass is fake-quantized."""
        return self.steps_done >= self.switch_step

    def step(self) -> None:
        """Record one optimizer step; switch fake quantization on when its turn comes."""
        self.steps_done += 1
        if self.steps_done == self.switch_step:
            for module in self.model.modules():
                if isinstance(module, _PREPARED) and isinstance(module.weight_fake_quantizer, LSQQuantizer):
                    module.weight_fake_quantizer.initialize(module.weight)
        set_qat_enabled(self.model, self.enabled)

    def state_dict(self) -> dict[str, int]:
        """``{"steps_done": n}``."""
        return {"steps_done": self.steps_done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore the step count and the matching on/off state."""
        self.steps_done = int(state["steps_done"])
        set_qat_enabled(self.model, self.enabled)

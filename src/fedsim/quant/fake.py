"""Fake (simulated) integer quantization with a straight-through estimator.

One convention holds throughout ``fedsim.quant``, torchao's (``choose_qparams_affine`` and
``_fake_quantize_affine`` in ``torchao.quantization.quant_primitives``), so a tensor
fake-quantized here equals, bit for bit, the same tensor fake-quantized by torchao's QAT
(``IntxFakeQuantizeConfig``). For ``b`` bits the integer grid is signed,
``[qmin, qmax] = [-2^(b-1), 2^(b-1) - 1]``, for symmetric and asymmetric alike.

Symmetric::

    scale = max(|w|) / ((qmax - qmin) / 2)           # 127.5 for int8, 7.5 for int4, 1.5 for int2
    q     = clamp(round_half_even(w * (1 / scale)), qmin, qmax)
    w_q   = q * scale

Asymmetric (zero point kept on the integer grid, zero exactly representable)::

    lo, hi     = min(min(w), 0), max(max(w), 0)
    scale      = (hi - lo) / (qmax - qmin)
    zero_point = clamp(qmin - round_half_even(lo / scale), qmin, qmax)
    q          = clamp(round_half_even(w * (1 / scale)) + zero_point, qmin, qmax)
    w_q        = (q - zero_point) * scale

Scales are clamped below by the smallest normal float of the tensor's dtype (torchao's default
``eps``), which guards the all-zero tensor. The quantization is multiplied by the reciprocal
of the scale, as torchao does: dividing by the scale rounds the extreme value differently.
Note that under the symmetric convention the positive maximum maps to ``qmax + 0.5`` and is
clipped to ``qmax``.

The backward pass is the straight-through estimator (Bengio et al. 2013, arXiv 1308.3432)
restricted to the clipping range, as in QAT (Jacob et al. 2018, arXiv 1712.05877):
``dL/dw = dL/dw_q * 1[qmin <= round(w / scale) + zero_point <= qmax]``.
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8)

Axis = int | tuple[int, ...] | None


def check_choice(where: str, value: object, allowed: tuple) -> None:
    """Raise ``ValueError`` naming ``where``, the bad ``value`` and the ``allowed`` ones."""
    if isinstance(value, bool) or value not in allowed:
        known = ", ".join(repr(a) if isinstance(a, str) else str(a) for a in allowed)
        raise ValueError(f"{where}: {value!r} is not supported; allowed: {known}")


def quant_range(bits: int) -> tuple[int, int]:
    """Signed integer grid ``(qmin, qmax) = (-2^(b-1), 2^(b-1) - 1)`` of ``bits`` bits."""
    check_choice("bits", bits, SUPPORTED_BITS)
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def _reduce_dims(x: torch.Tensor, axis: Axis) -> tuple[int, ...]:
    """Dimensions reduced to one (scale, zero point): all but ``axis``."""
    if axis is None:
        return tuple(range(x.dim()))
    kept = (axis,) if isinstance(axis, int) else tuple(axis)
    for a in kept:
        if not -x.dim() <= a < x.dim():
            raise ValueError(f"axis: {a} is out of range for a tensor of {x.dim()} dimensions")
    kept = {a % x.dim() for a in kept}
    return tuple(d for d in range(x.dim()) if d not in kept)


@torch.no_grad()
def choose_qparams(
    x: torch.Tensor, bits: int, *, symmetric: bool = True, axis: Axis = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of ``x`` under torchao's convention (see the module docstring).

    Parameters
    ----------
    x : torch.Tensor
        Floating-point tensor.
    bits : int
        Bit width, 2 to 8.
    symmetric : bool, default True
        Symmetric (zero point 0) or asymmetric grid.
    axis : int or tuple of int or None, default None
        ``None``: one scale for the tensor. Otherwise one scale per index along ``axis``
        (per channel), reducing over every other dimension; a tuple keeps several axes
        (e.g. ``(0, 2, 3)`` gives one scale per pixel of an NCHW activation).

    Returns
    -------
    tuple[torch.Tensor, torch.Tensor]
        ``(scale, zero_point)``, detached, with ``x``'s number of dimensions (size 1 along
        the reduced ones) so they broadcast against ``x``. ``zero_point`` holds integers.
    """
    if not x.is_floating_point():
        raise ValueError(f"fake quantization needs a floating-point tensor; got dtype {x.dtype}")
    qmin, qmax = quant_range(bits)
    dims = _reduce_dims(x, axis)
    if dims:
        min_val = torch.amin(x, dim=dims, keepdim=True)
        max_val = torch.amax(x, dim=dims, keepdim=True)
    else:
        min_val = max_val = x.detach()
    min_neg = torch.minimum(min_val, torch.zeros_like(min_val))
    max_pos = torch.maximum(max_val, torch.zeros_like(max_val))
    eps = torch.finfo(x.dtype).smallest_normal
    if symmetric:
        amax = torch.maximum(-min_neg, max_pos)
        scale = torch.clamp(amax / (float(qmax - qmin) / 2), min=eps)
        zero_point = torch.zeros_like(scale)
    else:
        scale = torch.clamp((max_pos - min_neg) / float(qmax - qmin), min=eps)
        zero_point = torch.clamp(qmin - torch.round(min_neg / scale), qmin, qmax)
    return scale, zero_point


def stochastic_round(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Unbiased stochastic rounding: ``floor(x) + Bernoulli(x - floor(x))``.

    ``E[stochastic_round(x)] = x`` exactly (Gupta et al. 2015, "Deep Learning with Limited
    Numerical Precision", arXiv 1502.02551). Draws from ``generator`` (on ``x``'s device) or,
    when it is ``None``, from torch's global generator.
    """
    floor = torch.floor(x)
    u = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    return floor + (u < x - floor).to(x.dtype)


def quantize_dequantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    *,
    stochastic: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize to the grid and back, in torchao's order of operations.

    Returns
    -------
    tuple[torch.Tensor, torch.Tensor]
        ``(x_q, in_range)``: the dequantized tensor and the boolean mask of entries whose
        rounded code lies in ``[qmin, qmax]`` before clipping (where the STE passes gradient).
    """
    y = x * (1.0 / scale)
    rounded = stochastic_round(y, generator) if stochastic else torch.round(y)
    q = rounded + zero_point
    in_range = (q >= qmin) & (q <= qmax)
    q = torch.clamp(q, qmin, qmax)
    return (q - zero_point) * scale, in_range


class _FakeQuantizeSTE(torch.autograd.Function):
    """Fake quantization whose gradient is the identity inside the clipping range."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, stochastic, generator):
        x_q, in_range = quantize_dequantize(
            x, scale, zero_point, qmin, qmax, stochastic=stochastic, generator=generator
        )
        ctx.save_for_backward(in_range)
        return x_q

    @staticmethod
    def backward(ctx, grad):
        (in_range,) = ctx.saved_tensors
        return grad * in_range, None, None, None, None, None, None


def fake_quantize(
    x: torch.Tensor,
    bits: int,
    *,
    symmetric: bool = True,
    axis: Axis = None,
    stochastic: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Fake-quantize ``x`` to ``bits`` bits with a straight-through gradient.

    Forward: ``x_q = (clamp(R(x * (1 / scale)) + zero_point, qmin, qmax) - zero_point) * scale``
    with ``(scale, zero_point)`` from :func:`choose_qparams` (torchao's convention, see the
    module docstring) and ``R`` round-half-to-even, or unbiased stochastic rounding when
    ``stochastic``. Backward: ``dL/dx = dL/dx_q`` where the rounded code lies in
    ``[qmin, qmax]``, ``0`` where it was clipped. Scales are computed from ``x`` itself
    (dynamic quantization) and receive no gradient.

    Parameters
    ----------
    x : torch.Tensor
        Floating-point tensor.
    bits : int
        Bit width, 2 to 8: ``x_q`` takes at most ``2^bits`` distinct values per scale.
    symmetric : bool, default True
        Symmetric grid (zero point 0) or asymmetric grid with an integer zero point.
    axis : int or tuple of int or None, default None
        ``None`` for one scale per tensor; an axis (or axes) for one scale per index along it
        (per channel: ``axis=0`` for Linear and Conv2d weights).
    stochastic : bool, default False
        Stochastic rounding, unbiased (``E[x_q] = x``) for every entry whose scaled value lies
        in ``[qmin, qmax]``; round-to-nearest (error at most ``scale / 2`` in range) otherwise.
    generator : torch.Generator, optional
        Source of the stochastic rounding's randomness (torch's global generator if ``None``).

    Returns
    -------
    torch.Tensor
        The fake-quantized tensor, same shape and dtype as ``x``.
    """
    qmin, qmax = quant_range(bits)
    scale, zero_point = choose_qparams(x, bits, symmetric=symmetric, axis=axis)
    return _FakeQuantizeSTE.apply(x, scale, zero_point, qmin, qmax, stochastic, generator)

"""Weight-only integer storage of frozen linear layers: the QLoRA-like base of adapter training.

A frozen ``nn.Linear`` is replaced by a :class:`WeightOnlyLinear` that holds its weight as
integers and one float scale per output channel, and computes in float. Quantization is
symmetric round-to-nearest in :mod:`fedsim.quant.fake`'s (torchao's) convention::

    scale = max_j |W_ij| / ((qmax - qmin) / 2),   q = clamp(round(W / scale), qmin, qmax)
    y     = x (q * scale)^T + b

with ``[qmin, qmax] = [-128, 127]`` (int8) or ``[-8, 7]`` (int4). int8 codes take a byte each;
int4 codes are packed two to a byte, so the weight's memory is a quarter (int8) or an eighth
(int4) of float32's, plus the scales. The weight is dequantized per call, as weight-only
quantization does on hardware without integer matrix products (Dettmers et al., "QLoRA:
Efficient Finetuning of Quantized LLMs", arXiv 2305.14314, store the base in 4 bits and compute
in 16; the NF4 data type of the paper is not used here, the integer grid is).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedsim.quant.fake import quant_range

BASE_BITS = {"int8": 8, "int4": 4}
"""The weight-only formats a frozen base may take, by config name."""


def _pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Signed 4-bit codes ``(out, in)`` as bytes ``(out, ceil(in / 2))``: low nibble first."""
    unsigned = (codes + 8).to(torch.uint8)
    if unsigned.shape[1] % 2:
        unsigned = F.pad(unsigned, (0, 1))
    return unsigned[:, 0::2] | (unsigned[:, 1::2] << 4)


def _unpack_int4(packed: torch.Tensor, columns: int) -> torch.Tensor:
    """Inverse of :func:`_pack_int4`: int8 codes ``(out, columns)``."""
    low, high = packed & 0x0F, packed >> 4
    return torch.stack([low, high], dim=2).reshape(packed.shape[0], -1)[:, :columns].to(torch.int8) - 8


class WeightOnlyLinear(nn.Module):
    """A frozen linear layer stored as integer codes and per-output-channel scales.

    Parameters
    ----------
    linear : nn.Linear
        The float layer it replaces; its weight is quantized, its bias kept in float.
    bits : int
        8 (one code a byte) or 4 (two codes a byte).
    """

    def __init__(self, linear: nn.Linear, bits: int) -> None:
        super().__init__()
        if bits not in BASE_BITS.values():
            raise ValueError(f"WeightOnlyLinear: bits {bits} is not a weight-only format; allowed: 8, 4")
        weight = linear.weight.detach().float()
        qmin, qmax = quant_range(bits)
        scale = weight.abs().amax(dim=1, keepdim=True) / ((qmax - qmin) / 2)
        scale = scale.clamp(min=torch.finfo(torch.float32).tiny)
        codes = torch.clamp(torch.round(weight * (1.0 / scale)), qmin, qmax).to(torch.int8)
        self.bits, self.in_features, self.out_features = bits, linear.in_features, linear.out_features
        self.register_buffer("codes", _pack_int4(codes) if bits == 4 else codes)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight ``q * scale``, float32 ``(out, in)``."""
        codes = _unpack_int4(self.codes, self.in_features) if self.bits == 4 else self.codes
        return codes.float() * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}"


def quantize_frozen_linears(model: nn.Module, fmt: str, skip: tuple[str, ...] = ()) -> int:
    """Replace, in place, every ``nn.Linear`` of ``model`` whose weight does not train (and
    whose name is not in ``skip``) by a :class:`WeightOnlyLinear` of format ``fmt``.

    Returns
    -------
    int
        Layers replaced.
    """
    if fmt not in BASE_BITS:
        raise ValueError(f"quantize_frozen_linears: {fmt!r} is not a weight-only format; "
                         f"allowed: {', '.join(BASE_BITS)}")
    targets = [(name, module) for name, module in model.named_modules()
               if type(module) is nn.Linear and not module.weight.requires_grad and name not in skip]
    for name, module in targets:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, WeightOnlyLinear(module, BASE_BITS[fmt]))
    return len(targets)


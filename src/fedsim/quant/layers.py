"""Walking a model and swapping its layers, shared by QAT and low-bit training."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from torch import nn

ConvT = TypeVar("ConvT", bound=nn.Conv2d)


def swap_layers(model: nn.Module, replace: Callable[[nn.Module], nn.Module | None]) -> None:
    """Replace, in place, every submodule for which ``replace(module)`` returns a module.

    The walk is depth-first over children; a replaced module's own children are not visited.
    A replacement keeps the training mode of the module it replaces.
    """
    for child_name, child in model.named_children():
        new = replace(child)
        if new is None:
            swap_layers(child, replace)
            continue
        new.train(child.training)
        setattr(model, child_name, new)


def reject_prepared(model: nn.Module, prepared: tuple[type, ...], verb: str) -> None:
    """Raise if ``model`` already holds layers of the ``prepared`` types."""
    found = [f"{n} ({type(m).__name__})" for n, m in model.named_modules() if isinstance(m, prepared)]
    if found:
        raise ValueError(
            f"{verb}: the model already has quantized layers: {', '.join(found)}; start from a float model"
        )


def conv2d_sharing(cls: type[ConvT], conv: nn.Conv2d) -> ConvT:
    """A ``cls`` (a Conv2d subclass) with ``conv``'s geometry, sharing its weight and bias."""
    new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
              dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
              padding_mode=conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype)
    new.weight = conv.weight
    new.bias = conv.bias
    return new

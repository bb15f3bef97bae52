"""Per-sample gradient norms and the clipped sum of Linear layers without per-sample gradients.

For a Linear layer ``z = a W^T + b`` applied to one sample's ``T`` rows of inputs ``a_t`` (a
vector input is ``T = 1``) with output gradients ``delta_t = dl/dz_t``, the sample's gradients
are ``G_W = sum_t delta_t a_t^T`` and ``G_b = sum_t delta_t``, so (Goodfellow 2015, "Efficient
Per-Example Gradient Computations", arXiv 1510.01799; Li et al. 2022, "Large Language Models Can
Be Strong Differentially Private Learners", arXiv 2110.05679, ghost clipping)

    ||G_W||^2 = sum_{t, s} (a_t . a_s) (delta_t . delta_s)       (= ||a||^2 ||delta||^2 when T = 1)
    ||G_b||^2 = ||sum_t delta_t||^2

and the clipped sum over a batch with per-sample factors ``c_b`` is one weighted product,
``sum_b c_b G_W,b = sum_{b, t} (c_b delta_bt) a_bt^T``. Only the layer's inputs and output
gradients are held, ``(B, T, in + out)`` values per layer instead of the ``B x D`` of
materialised per-sample gradients. The layers' outputs are read through forward hooks that
record each input and add a zero "tap" whose gradient is ``delta`` (the tap is the input the
gradient is taken against; the hook closes over it while the forward runs).

Written here rather than taken from Opacus: Opacus's ``GradSampleModule`` hooks modules of a
model trained one at a time, not parameters stacked per client under ``torch.func.vmap``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["linear_clipped_sum", "linear_layers", "linear_norms_sq", "parameter_name", "tapped"]


def linear_layers(model: nn.Module, param_names: set[str]) -> dict[str, nn.Linear] | None:
    """``model``'s Linear modules by name when every parameter in ``param_names`` is the
    weight or bias of one of them, and each of theirs is in it once (no other layer, no tied
    weight); else None."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    owned = [parameter_name(name, p) for name, m in layers.items() for p, _ in m.named_parameters(recurse=False)]
    all_names = [name for name, _ in model.named_parameters(remove_duplicate=False)]
    if sorted(owned) != sorted(all_names) or set(owned) != param_names:
        return None
    return layers


def parameter_name(layer: str, parameter: str) -> str:
    """The name of ``layer``'s ``parameter`` in ``model.named_parameters()`` (the model itself is layer '')."""
    return f"{layer}.{parameter}" if layer else parameter


@contextlib.contextmanager
def tapped(layers: dict[str, nn.Linear], taps: dict[str, torch.Tensor] | None, inputs: dict[str, torch.Tensor],
           calls: dict[str, int]) -> Iterator[None]:
    """While the block runs, each layer's forward records its input in ``inputs``, counts its
    calls in ``calls``, and adds ``taps[name]`` to its output (nothing when ``taps`` is None)."""
    def hook_of(name):
        def hook(module, args, output):
            inputs[name] = args[0]
            calls[name] = calls.get(name, 0) + 1
            return output if taps is None else output + taps[name]
        return hook

    handles = [layer.register_forward_hook(hook_of(name)) for name, layer in layers.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _rows(t: torch.Tensor, lead: int) -> torch.Tensor:
    """``(*lead dims, T, features)``: a sample's rows of a layer's input or output."""
    return t.reshape(*t.shape[:lead], math.prod(t.shape[lead:-1]), t.shape[-1])


def linear_norms_sq(a: torch.Tensor, delta: torch.Tensor, bias: bool) -> torch.Tensor:
    """``||G_W||^2 (+ ||G_b||^2)`` of each sample, ``(K, B)``, from the layer's inputs ``a``
    ``(K, B, ..., in)`` and output gradients ``delta`` ``(K, B, ..., out)`` (module docstring)."""
    a, delta = _rows(a, 2), _rows(delta, 2)
    if a.shape[2] == 1:  # the Gram matrices of one row are its squared norm
        norms = a.square().sum((2, 3)) * delta.square().sum((2, 3))
    else:
        norms = ((a @ a.transpose(2, 3)) * (delta @ delta.transpose(2, 3))).sum((2, 3))
    if bias:
        norms = norms + delta.sum(2).square().sum(2)
    return norms


def linear_clipped_sum(a: torch.Tensor, delta: torch.Tensor, factor: torch.Tensor, bias: bool
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(sum_b c_b G_W,b, sum_b c_b G_b,b)`` of each of K clients, ``(K, out, in)`` and
    ``(K, out)`` (None without bias), for the per-sample factors ``c`` ``(K, B)``."""
    weighted = _rows(delta, 2) * factor[:, :, None, None].to(delta.dtype)
    k, out_dim, in_dim = weighted.shape[0], weighted.shape[-1], a.shape[-1]
    weight = weighted.reshape(k, -1, out_dim).transpose(1, 2) @ a.reshape(k, -1, in_dim)
    return weight, weighted.sum((1, 2)) if bias else None

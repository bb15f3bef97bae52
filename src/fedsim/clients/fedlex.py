"""FedLEx client side: scale each gradient elementwise by the guidance matrix.

Reference
---------
FedLEx, as specified in fedsim's ALGORITHMS.md; the guidance matrix is built by
:func:`fedsim.strategies.fedlex.guidance_matrix`. Call :func:`apply_guidance` between
``loss.backward()`` and ``optimizer.step()``: ``grad_p <- M_p * grad_p``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from fedsim.clients.hooks import ClientHook

__all__ = ["apply_guidance"]


def apply_guidance(
    parameters: torch.nn.Module | Iterable[tuple[str, torch.nn.Parameter]],
    guidance: Mapping[str, torch.Tensor],
) -> None:
    """Multiply every parameter's ``.grad`` in place by its guidance tensor.

    Parameters
    ----------
    parameters : torch.nn.Module or iterable of (str, torch.nn.Parameter)
        A model (its ``named_parameters()`` are used) or ``(name, parameter)`` pairs.
    guidance : mapping of str to torch.Tensor
        Guidance per parameter name, each the parameter's shape (extra entries, e.g. for
        buffers, are ignored).

    Raises
    ------
    ValueError
        If a parameter with a gradient has no guidance entry or one of another shape.
    """
    named = parameters.named_parameters() if isinstance(parameters, torch.nn.Module) else parameters
    for name, param in named:
        if param.grad is None:
            continue
        if name not in guidance:
            raise ValueError(f"apply_guidance: no guidance for parameter {name!r}")
        scale = guidance[name]
        if scale.shape != param.grad.shape:
            raise ValueError(f"apply_guidance: guidance for {name!r} has shape {tuple(scale.shape)}, "
                             f"gradient has {tuple(param.grad.shape)}")
        param.grad.mul_(scale.to(device=param.grad.device, dtype=param.grad.dtype))


class GuidanceMask(ClientHook):
    """FedLEx's client side as a hook: gradients times the guidance matrix before each step.

    The guidance covers the global model's parameters; the parameters a training wrapper
    adds to the client's model (QAT's learned step sizes) are the client's own and train
    unmasked."""

    def __init__(self, guidance: Mapping[str, torch.Tensor]) -> None:
        self.guidance = guidance

    def before_step(self, model: torch.nn.Module) -> None:
        apply_guidance(((n, p) for n, p in model.named_parameters() if n in self.guidance), self.guidance)

    def stacked_before_step(self, params: dict[str, torch.Tensor]) -> None:
        """The same mask on K clients' stacked gradients ``(K, *shape)``."""
        for name, param in params.items():
            if param.grad is not None and name in self.guidance:
                param.grad.mul_(self.guidance[name].to(device=param.grad.device, dtype=param.grad.dtype))

"""APFL's personal step: a personal model mixed with the global one by a learned weight.

"Adaptive Personalized Federated Learning", Deng, Kamani and Mahdavi, arXiv 2003.13461,
Algorithm 1 and its adaptive alpha (Section 3). Client ``i`` keeps a personal model ``v_i``
and a mixing weight ``alpha_i`` in [0, 1]; its personalised model is::

    vbar_i = alpha_i * v_i + (1 - alpha_i) * w

Each local step, with ``g = grad f_i(vbar_i)`` on the step's mini-batch and both updates from
the step's start values::

    v_i     <- v_i - lr * alpha_i * g                            (the gradient of f_i(vbar_i) in v_i)
    alpha_i <- clip(alpha_i - alpha_lr * <v_i - w, g>, 0, 1)     (its gradient in alpha_i)

``alpha_lr = 0`` keeps ``alpha_i`` fixed. In fedsim ``w`` is the global model the client
received, held fixed during the personal run (the paper moves the client's local copy ``w_i``
along the same steps); the client's global update is its aggregator's own.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fedsim.clients.hooks import ClientHook

__all__ = ["APFLStep", "StackedAPFLStep", "apfl_mix"]


def apfl_mix(personal: dict[str, torch.Tensor], global_params: dict[str, torch.Tensor],
             alpha: float) -> dict[str, torch.Tensor]:
    """``alpha * v + (1 - alpha) * w`` for every entry of ``global_params``."""
    return {name: alpha * personal[name] + (1 - alpha) * w for name, w in global_params.items()}


class APFLStep(ClientHook):
    """One APFL step of ``v`` and ``alpha`` (see the module docstring) on the model that holds
    ``vbar``: after ``backward`` it moves ``v`` and ``alpha``, writes the new ``vbar`` into the
    model and drops the gradients, so the optimizer leaves the model alone.

    Parameters
    ----------
    personal : dict[str, torch.Tensor]
        ``v``: the personal model's parameters by name (updated in place).
    global_params : dict[str, torch.Tensor]
        ``w``: the global model's parameters by name.
    alpha : float
        ``alpha``'s value at the start of the run (``self.alpha`` holds the latest).
    lr : float
        The client's learning rate.
    alpha_lr : float
        The step size of ``alpha``'s gradient step.

    Its stacked form (:meth:`stack`) holds every client's ``v``, ``w`` and ``alpha`` as rows
    and writes each client's row back to its own hook after every step.
    """

    def __init__(self, personal: dict[str, torch.Tensor], global_params: dict[str, torch.Tensor], alpha: float,
                 lr: float, alpha_lr: float) -> None:
        self.personal = personal
        self.global_params = global_params
        self.alpha = alpha
        self.lr = lr
        self.alpha_lr = alpha_lr

    @torch.no_grad()
    def before_step(self, model: nn.Module) -> None:
        params = {name: p for name, p in model.named_parameters() if name in self.global_params}
        grads = {name: p.grad for name, p in params.items() if p.grad is not None}
        alpha_grad = sum(float(((self.personal[n] - self.global_params[n]) * g).sum()) for n, g in grads.items())
        for name, g in grads.items():
            self.personal[name] -= self.lr * self.alpha * g
        self.alpha = min(max(self.alpha - self.alpha_lr * alpha_grad, 0.0), 1.0)
        for name, value in apfl_mix(self.personal, self.global_params, self.alpha).items():
            params[name].copy_(value)
            params[name].grad = None

    @classmethod
    def stack(cls, hooks: Sequence[APFLStep]) -> StackedAPFLStep:
        return StackedAPFLStep(hooks)


class StackedAPFLStep(APFLStep):
    """APFL's step for clients trained as one stack, rows in the order of ``hooks`` (whose
    ``personal`` and ``alpha`` it keeps current)."""

    def __init__(self, hooks: Sequence[APFLStep]) -> None:
        first = hooks[0]
        super().__init__({name: torch.stack([h.personal[name] for h in hooks]) for name in first.personal},
                         {name: torch.stack([h.global_params[name] for h in hooks]) for name in first.global_params},
                         0.0, first.lr, first.alpha_lr)
        self.alphas = torch.tensor([h.alpha for h in hooks], dtype=torch.float64)
        self.hooks = list(hooks)

    @torch.no_grad()
    def stacked_before_step(self, params: dict[str, torch.Tensor]) -> None:
        rows = len(next(iter(params.values())))  # the clients still training, the first rows
        grads = {name: p.grad for name, p in params.items() if name in self.global_params and p.grad is not None}
        alpha = self.alphas[:rows]
        alpha_grad = sum(((self.personal[n][:rows] - self.global_params[n][:rows]) * g).flatten(1).sum(1).double()
                         for n, g in grads.items())
        for name, g in grads.items():
            scale = (self.lr * alpha).to(g.dtype).view(-1, *[1] * (g.dim() - 1))
            self.personal[name][:rows] -= scale * g
        self.alphas[:rows] = (alpha - self.alpha_lr * alpha_grad).clamp(0.0, 1.0)
        for name in self.global_params:
            a = self.alphas[:rows].to(params[name].dtype).view(-1, *[1] * (params[name].dim() - 1))
            params[name].copy_(a * self.personal[name][:rows] + (1 - a) * self.global_params[name][:rows])
            params[name].grad = None
        for row, hook in enumerate(self.hooks[:rows]):
            hook.alpha = float(self.alphas[row])
            for name in hook.personal:
                hook.personal[name] = self.personal[name][row].clone()

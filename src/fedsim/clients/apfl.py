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

import torch
from torch import nn

from fedsim.clients.hooks import ClientHook

__all__ = ["APFLStep", "apfl_mix"]


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

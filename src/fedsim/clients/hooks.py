"""Per-algorithm client hooks: extra loss terms and gradient transforms.

A strategy switches hooks on through its config; the local loop calls every hook at
two points of each step: ``extra_loss`` is added to the objective, ``before_step``
runs after ``backward`` and before ``optimizer.step``.
"""

from __future__ import annotations

import torch
from torch import nn


class ClientHook:
    """Base hook: adds nothing and changes nothing."""

    def extra_loss(self, model: nn.Module, logits: torch.Tensor) -> torch.Tensor | None:
        return None

    def before_step(self, model: nn.Module) -> None:
        return None


class ProximalTerm(ClientHook):
    """FedProx's proximal term (Li et al., "Federated Optimization in Heterogeneous
    Networks", arXiv 1812.06127): ``mu / 2 * ||w - w_global||^2``.

    Parameters
    ----------
    mu : float
        Strength of the pull towards the global model.
    global_params : list[torch.Tensor]
        The global model's parameters, in ``model.parameters()`` order (detached copies).
    """

    def __init__(self, mu: float, global_params: list[torch.Tensor]) -> None:
        self.mu = mu
        self.global_params = global_params

    def extra_loss(self, model: nn.Module, logits: torch.Tensor) -> torch.Tensor | None:
        if self.mu == 0:
            return None
        sq = sum(((p - g) ** 2).sum() for p, g in zip(model.parameters(), self.global_params, strict=True))
        return 0.5 * self.mu * sq

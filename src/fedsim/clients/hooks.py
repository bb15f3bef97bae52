"""Per-algorithm client hooks: extra loss terms and gradient transforms.

A strategy switches hooks on through its config; the local loop calls every hook at
two points of each step: ``extra_loss`` is added to the objective, ``before_step``
runs after ``backward`` and before ``optimizer.step``.

Each hook also has a *stacked* form for :mod:`fedsim.clients.batched`, which trains K
clients at once with every parameter stacked to shape ``(K, *shape)``:
``stacked_extra_loss`` returns the K clients' terms as a ``(K,)`` tensor (``mask`` marks the
real rows of the padded ``(K, B)`` batch), ``stacked_before_step`` transforms the stacked
gradients. Both forms compute the same formula; a hook that overrides one form of a pair
but not the other cannot be vectorised (:func:`vectorises`), and its clients train one at
a time.
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

    def stacked_extra_loss(self, params: dict[str, torch.Tensor], logits: torch.Tensor,
                           mask: torch.Tensor) -> torch.Tensor | None:
        return None

    def stacked_before_step(self, params: dict[str, torch.Tensor]) -> None:
        return None


def vectorises(hook: ClientHook) -> bool:
    """Whether ``hook`` has a stacked form for each per-client form it overrides."""
    cls = type(hook)
    return all((getattr(cls, one) is getattr(ClientHook, one)) == (getattr(cls, stacked) is getattr(ClientHook, stacked))
               for one, stacked in (("extra_loss", "stacked_extra_loss"), ("before_step", "stacked_before_step")))


class ProximalTerm(ClientHook):
    """FedProx's proximal term (Li et al., "Federated Optimization in Heterogeneous
    Networks", arXiv 1812.06127): ``mu / 2 * ||w - w_global||^2``.

    Parameters
    ----------
    mu : float
        Strength of the pull towards the global model.
    global_params : dict[str, torch.Tensor]
        The global model's parameters by name (detached copies); stacked ``(K, *shape)``
        for the stacked form, one row per client's own start. Only these are pulled: the
        parameters a training wrapper adds (QAT's learned step sizes) are not the model's.
    """

    def __init__(self, mu: float, global_params: dict[str, torch.Tensor]) -> None:
        self.mu = mu
        self.global_params = global_params

    def extra_loss(self, model: nn.Module, logits: torch.Tensor) -> torch.Tensor | None:
        if self.mu == 0:
            return None
        params = dict(model.named_parameters())
        return 0.5 * self.mu * sum(((params[name] - g) ** 2).sum() for name, g in self.global_params.items())

    def stacked_extra_loss(self, params: dict[str, torch.Tensor], logits: torch.Tensor,
                           mask: torch.Tensor) -> torch.Tensor | None:
        if self.mu == 0:
            return None
        # the stacked trainer passes the rows of the clients still training, the first ones
        return 0.5 * self.mu * sum(((params[name] - g[: len(params[name])]) ** 2).flatten(1).sum(1)
                                   for name, g in self.global_params.items())

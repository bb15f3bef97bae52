"""FedProx: FedAvg whose clients add a proximal term.

"Federated Optimization in Heterogeneous Networks", Li et al., arXiv 1812.06127: the server
aggregates as FedAvg; each client minimises ``loss + mu / 2 * ||w - w_global||^2``
(:class:`ProximalTerm`, its client half).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from fedsim.algorithms.api import SyncStrategyBase
from fedsim.clients.features import ClientContext, ClientFeature
from fedsim.clients.hooks import ClientHook
from fedsim.strategies.base import FedsimStrategy

__all__ = ["FedProx", "FedProxConfig", "ProximalTerm"]


class FedProxConfig(SyncStrategyBase):
    """FedProx (Li et al. 2020): FedAvg with a proximal term mu/2 ||w - w_global||^2."""

    name: Literal["fedprox"] = "fedprox"
    mu: float = Field(0.01, ge=0)


class ProximalTerm(ClientHook):
    """FedProx's proximal term ``mu / 2 * ||w - w_global||^2``.

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


class ProximalClient(ClientFeature):
    """FedProx's client half: the proximal term towards the model the client starts from."""

    def key(self, ctx: ClientContext) -> Hashable:
        return ctx.cfg.strategy.mu

    def hooks(self, ctx: ClientContext, start: dict[str, torch.Tensor]) -> tuple[ClientHook, ...]:
        return (ProximalTerm(ctx.cfg.strategy.mu, start),) if ctx.cfg.strategy.mu > 0 else ()


class FedProx(FedsimStrategy):
    """FedAvg on the server; clients minimise ``loss + mu/2 ||w - w_global||^2``.

    Parameters
    ----------
    *args, **kwargs
        Flower FedAvg's arguments, ``min_successful`` and ``server_opt`` (as FedAvg).
    mu : float, default 0.01
        The proximal strength (>= 0). In a Flower app the ClientApp adds the term itself
        (:class:`ProximalTerm`).
    """

    name = "fedprox"
    Config = FedProxConfig
    description = "FedProx (Li et al. 2020): FedAvg with a proximal term mu/2 ||w - w_global||^2 in every client"
    client = ProximalClient()

"""FedNova: normalised averaging of updates made with unequal numbers of local steps.

Reference
---------
J. Wang, Q. Liu, H. Liang, G. Joshi, H. V. Poor, "Tackling the Objective Inconsistency
Problem in Heterogeneous Federated Optimization", NeurIPS 2020, arXiv 2007.07481.

Definition implemented
----------------------
Client ``i`` of the round's set ``S`` runs ``tau_i`` local SGD steps (``tau_i`` differs
with its data size under a fixed number of epochs) and replies with ``dy_i = y_i - x``.
With heavy-ball momentum ``rho`` its steps amount to ``a_i = ||a_i||_1 = (tau_i - rho (1 -
rho^tau_i) / (1 - rho)) / (1 - rho)`` plain ones (``tau_i`` without momentum;
:func:`fedsim.clients.local_steps.momentum_steps`). With ``p_i = n_i / sum_{j in S} n_j``
the server takes the normalised updates ``d_i = dy_i / a_i`` and steps by
``tau_eff = sum_i p_i a_i`` of them (the paper's choice of tau_eff for FedNova)::

    x <- x + tau_eff * sum_{i in S} p_i dy_i / a_i           (fednova_aggregate)

(the paper writes ``x - tau_eff eta sum p_i d_i`` with ``d_i`` the normalised gradient
``(x - y_i) / (eta a_i)``; the learning rate ``eta`` cancels). With equal ``a_i`` this is
FedAvg. The server optimizer then applies the result (plain, lr 1: the paper's update).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from flwr.app import Message

from fedsim.algorithms.api import SyncStrategyBase
from fedsim.clients.local_steps import momentum_steps
from fedsim.strategies.aggregate import as_weights, check_updates
from fedsim.strategies.base import FedsimStrategy
from fedsim.strategies.replies import ClientUpdate, Failure

__all__ = ["FedNova", "FedNovaConfig", "fednova_aggregate"]


class FedNovaConfig(SyncStrategyBase):
    """FedNova (Wang et al., arXiv 2007.07481): each client's update divided by its number of
    (momentum-weighted) local steps a_i, the average rescaled by tau_eff = sum p_i a_i."""

    name: Literal["fednova"] = "fednova"


def fednova_aggregate(updates: torch.Tensor, weights: torch.Tensor | Sequence[float],
                      local_steps: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """FedNova's aggregated update ``tau_eff * sum_i p_i dy_i / a_i``, ``tau_eff = sum_i p_i a_i``.

    Parameters
    ----------
    updates : torch.Tensor
        The clients' ``dy_i = y_i - x``, shape ``(N, D)``.
    weights : torch.Tensor or sequence of float
        Non-negative data sizes ``n_i`` (normalised here into ``p_i``).
    local_steps : torch.Tensor or sequence of float
        Each client's ``a_i`` (its local steps, momentum-weighted), > 0.

    Returns
    -------
    torch.Tensor
        Shape ``(D,)``.
    """
    check_updates(updates, "fednova_aggregate")
    p = as_weights(weights, updates.shape[0], "fednova_aggregate", device=updates.device)
    a = torch.as_tensor(local_steps, dtype=torch.float64, device=updates.device).reshape(-1)
    if a.shape != p.shape:
        raise ValueError(f"fednova_aggregate: {updates.shape[0]} updates but {a.numel()} step counts")
    if not bool((a > 0).all()):
        raise ValueError("fednova_aggregate: local step counts must be > 0")
    tau_eff = (p * a).sum()
    return (tau_eff * p / a).to(updates.dtype) @ updates


class FedNova(FedsimStrategy):
    """FedNova: each reply's ``steps`` metric (``tau_i``) and the clients' momentum give
    ``a_i``; ``num-examples`` (``weighted_by_key``) gives ``p_i``.

    In a Flower app each training reply's MetricRecord must hold ``steps``, the local SGD
    steps the client took (a reply without it is dropped), and the clients are taken to use
    plain SGD (``a_i = tau_i``).

    Parameters
    ----------
    *args, **kwargs
        Flower FedAvg's arguments, ``min_successful`` and ``server_opt``.
    """

    name = "fednova"
    Config = FedNovaConfig
    description = "FedNova (Wang et al. 2020): updates normalised by each client's local steps, rescaled by tau_eff"
    sgd_steps = "normalising by the number of (momentum) SGD steps"
    reads_round_replies = "normalises each reply by its own local steps"

    def screen(self, replies: list[Message]) -> tuple[list[ClientUpdate], list[Failure]]:
        accepted, failures = super().screen(replies)
        kept = [u for u in accepted if u.metrics.get("steps", 0) > 0]
        failures += [Failure(u.partition_id, "reply has no positive 'steps' metric")
                     for u in accepted if not u.metrics.get("steps", 0) > 0]
        return kept, failures

    def aggregate_updates(self, server_round: int, updates: list[ClientUpdate]) -> torch.Tensor:
        momentum = self.engine.exp.client.momentum if self.engine else 0.0
        steps = [momentum_steps(int(u.metrics["steps"]), momentum) for u in updates]
        return fednova_aggregate(torch.stack([u.update for u in updates]), [u.num_examples for u in updates], steps)

    def sum_coefficients(self, server_round: int, updates: list[ClientUpdate]) -> torch.Tensor:
        """``tau_eff p_i / a_i``: FedNova's aggregate is a weighted sum (secure aggregation)."""
        momentum = self.engine.exp.client.momentum if self.engine else 0.0
        a = torch.tensor([momentum_steps(int(u.metrics["steps"]), momentum) for u in updates], dtype=torch.float64)
        p = torch.tensor([u.num_examples for u in updates], dtype=torch.float64)
        p = p / p.sum()
        return (p * a).sum() * p / a

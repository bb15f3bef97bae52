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

import torch

from fedsim.clients.local_steps import momentum_steps
from fedsim.strategies.aggregate import as_weights, check_updates
from fedsim.strategies.base import FedsimStrategy
from fedsim.strategies.replies import ClientUpdate

__all__ = ["FedNova", "fednova_aggregate"]


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
    """Flower adapter of FedNova: each reply's ``steps`` metric (``tau_i``) and the clients'
    ``client.momentum`` give ``a_i``; ``num-examples`` gives ``p_i``."""

    def aggregate_updates(self, server_round: int, updates: list[ClientUpdate]) -> torch.Tensor:
        steps = [momentum_steps(int(u.metrics["steps"]), self.exp.client.momentum) for u in updates]
        return fednova_aggregate(torch.stack([u.update for u in updates]),
                                 [u.num_examples for u in updates], steps)

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
from fedsim.clients.train import local_steps
from fedsim.strategies.aggregate import as_weights, check_updates
from fedsim.strategies.base import FedsimStrategy
from fedsim.strategies.replies import ClientUpdate, Failure

__all__ = ["FedNova", "FedNovaConfig", "fednova_aggregate", "fednova_private_weights", "fednova_tau_eff"]


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


def fednova_private_weights(examples: Sequence[float], population: Sequence[float],
                            expected_clients: float) -> tuple[torch.Tensor, float]:
    """FedNova's weights under central DP, McMahan et al. 2018's fixed-denominator estimator
    (arXiv 1710.06963, ``f~_f``) with ``w_i = n_i / n_max``: ``p_i = n_i N / (m sum_k n_k)``,
    and the bound ``beta = n_max N / (m sum_k n_k)`` on every ``p_i``.

    The denominator ``m sum_k n_k / N`` (``m`` expected clients per round, ``sum_k n_k`` over
    all ``N`` clients) does not depend on who takes part, so a client added or removed changes
    no other client's weight, and ``sum_{i in S} p_i`` is 1 in expectation; with every client
    in every round (``m = N``) ``p_i = n_i / sum_k n_k``, the plain FedNova's.

    Parameters
    ----------
    examples : sequence of float
        The round's clients' ``n_i``, each capped at ``n_max`` (a reported count cannot raise
        a weight beyond the bound).
    population : sequence of float
        Every client's ``n_k`` (public statistics of the federation, as McMahan et al.'s
        total weight ``W``).
    expected_clients : float
        ``m``.

    Returns
    -------
    (torch.Tensor, float)
        ``p_i`` (float64) and ``beta``.
    """
    total = torch.as_tensor(population, dtype=torch.float64)
    n_max, scale = float(total.max()), len(total) / expected_clients
    n = torch.as_tensor(examples, dtype=torch.float64).clamp(max=n_max)
    total_sum = total.sum()
    return n / total_sum * scale, float(n_max / total_sum * scale)


def fednova_tau_eff(population: Sequence[float], steps: Sequence[float]) -> float:
    """``tau_eff = sum_k p_k a_k`` over every client, ``p_k = n_k / sum_j n_j``: FedNova's
    effective steps (Wang et al. 2020 define them over all clients) from public statistics of
    the federation, so that under central DP it is no function of the round's cohort."""
    n = torch.as_tensor(population, dtype=torch.float64)
    return float((n / n.sum() * torch.as_tensor(steps, dtype=torch.float64)).sum())


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

    def private_aggregate(self, server_round: int, updates: list[ClientUpdate]) -> torch.Tensor:
        """FedNova under central DP: the normalised updates ``d_i = dy_i / a_i`` clipped to
        ``C`` (``privacy.clip_norm``) on the server, summed with the fixed-denominator weights
        ``p_i`` of :func:`fednova_private_weights`, noised, then scaled by ``tau_eff``
        (:func:`fednova_tau_eff`, over all clients)::

            x <- x + sum_{i in S} tau_eff p_i clip(d_i, C) + N(0, (z S_C tau_eff beta)^2 I)

        One client moves the sum by at most ``beta C`` (``beta = max p_i = n_max N / (m
        sum_k n_k)``; ``S_C = C``, or ``2 C`` under fixed-size sampling), so the noise std per
        coordinate is ``z S_C beta`` on the normalised sum and ``tau_eff z S_C beta`` on the update
        (``tau_eff`` scales signal and noise alike: :meth:`ServerPrivacy.noisy_sum` with
        coefficients ``tau_eff p_i`` and bound ``tau_eff beta``). The example counts and steps of the population
        enter as public statistics of the federation (McMahan et al. 2018 take the total weight
        ``W`` as known): the weights and ``tau_eff`` depend on no round's cohort. With every
        client in every round this is the plain FedNova on clipped updates."""
        privacy = self.privacy
        momentum = self.engine.exp.client.momentum
        population = privacy.client_examples
        a = torch.tensor([momentum_steps(int(u.metrics["steps"]), momentum) for u in updates], dtype=torch.float64)
        p, beta = fednova_private_weights([u.num_examples for u in updates], population,
                                          privacy.sampling.expected_clients)
        tau_eff = fednova_tau_eff(population, [momentum_steps(local_steps(n, self.engine.exp.client), momentum)
                                               for n in population])
        return privacy.noisy_sum(server_round, torch.stack([u.update for u in updates]), tau_eff * p, tau_eff * beta,
                                 divisors=a)

    def sum_coefficients(self, server_round: int, updates: list[ClientUpdate]) -> torch.Tensor:
        """``tau_eff p_i / a_i``: FedNova's aggregate is a weighted sum (secure aggregation)."""
        momentum = self.engine.exp.client.momentum if self.engine else 0.0
        a = torch.tensor([momentum_steps(int(u.metrics["steps"]), momentum) for u in updates], dtype=torch.float64)
        p = torch.tensor([u.num_examples for u in updates], dtype=torch.float64)
        p = p / p.sum()
        return (p * a).sum() * p / a

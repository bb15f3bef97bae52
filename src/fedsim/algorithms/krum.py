"""Krum and Multi-Krum (Byzantine-robust aggregation).

P. Blanchard, E. M. El Mhamdi, R. Guerraoui, J. Stainer, "Machine Learning with Adversaries:
Byzantine Tolerant Gradient Descent", NeurIPS 2017. Krum picks the update with the smallest
sum of squared distances to its ``N - f - 2`` nearest other updates; Multi-Krum averages the
``m`` best-scored ones (``m = 1`` is Krum). Agrees with Flower's ``aggregate_krum``.

``num_byzantine`` (``f``) unset assumes the most Krum tolerates among the round's ``N``
usable updates, ``floor((N - 3) / 2)`` (the largest ``f`` with ``N > 2f + 2``). A round
whose usable updates cannot hold the configured ``f`` Byzantine ones and an honest one, or
fewer than Multi-Krum's ``m``, is skipped (logged), the global model unchanged: the rule's
guarantee does not hold there. ``fedsim validate`` refuses settings no round could meet.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Literal

import torch
from pydantic import Field

from fedsim.algorithms.api import SyncStrategyBase
from fedsim.config_checks import clients_per_round
from fedsim.strategies.aggregate import (
    check_updates,
    pairwise_sq_distances,
    weighted_mean,
)
from fedsim.strategies.base import FedsimStrategy
from fedsim.strategies.replies import ClientUpdate

if TYPE_CHECKING:
    from fedsim.config import ExperimentConfig

__all__ = ["Krum", "KrumConfig", "MultiKrum", "MultiKrumConfig", "krum", "krum_max_byzantine", "krum_scores",
           "multi_krum", "multi_krum_select"]


class KrumConfig(SyncStrategyBase):
    """Krum (Blanchard et al. 2017); ``num_byzantine`` None assumes the most Krum tolerates."""

    name: Literal["krum"] = "krum"
    num_byzantine: int | None = Field(None, ge=0)


class MultiKrumConfig(SyncStrategyBase):
    """Multi-Krum: the mean of the ``m`` best-scored updates (None: n - f)."""

    name: Literal["multikrum"] = "multikrum"
    num_byzantine: int | None = Field(None, ge=0)
    m: int | None = Field(None, ge=1)


def krum_max_byzantine(n: int) -> int:
    """The largest number ``f`` of Byzantine updates Krum's guarantee allows among ``n``:
    the largest ``f >= 0`` with ``n > 2f + 2`` (Blanchard et al. 2017), 0 when ``n < 3``."""
    return max(0, (n - 3) // 2)


def _check_num_byzantine(num_byzantine: int, n: int, where: str) -> None:
    if not 0 <= num_byzantine < n:
        raise ValueError(f"{where}: num_byzantine must be in [0, {n - 1}] for {n} updates, got {num_byzantine}")


def krum_scores(updates: torch.Tensor, num_byzantine: int) -> torch.Tensor:
    """Krum score of every update: sum of squared distances to its ``N - f - 2`` nearest others.

    ``score(i) = sum_{j in nn(i)} |x_i - x_j|^2`` where ``nn(i)`` are the ``N - f - 2``
    closest other updates (at least 1, as in Flower; Krum's guarantee needs ``N > 2f + 2``).

    Parameters
    ----------
    updates : torch.Tensor
        Stacked updates, shape ``(N, D)``.
    num_byzantine : int
        Assumed number ``f`` of Byzantine updates, ``0 <= f < N``.

    Returns
    -------
    torch.Tensor
        float64 scores, shape ``(N,)``.
    """
    check_updates(updates, "krum_scores")
    n = updates.shape[0]
    _check_num_byzantine(num_byzantine, n, "krum_scores")
    if n == 1:
        return torch.zeros(1, dtype=torch.float64, device=updates.device)
    num_closest = min(max(1, n - num_byzantine - 2), n - 1)
    dist = pairwise_sq_distances(updates)
    dist.fill_diagonal_(float("inf"))
    return dist.sort(dim=1).values[:, :num_closest].sum(dim=1)


def multi_krum_select(updates: torch.Tensor, num_byzantine: int, m: int = 1) -> list[int]:
    """Indices of the ``m`` updates with the lowest Krum scores (ties: lower index first)."""
    scores = krum_scores(updates, num_byzantine)
    n = scores.shape[0]
    if not 1 <= m <= n:
        raise ValueError(f"multi_krum: m must be in [1, {n}] for {n} updates, got {m}")
    return scores.argsort(stable=True)[:m].tolist()


def krum(updates: torch.Tensor, num_byzantine: int) -> torch.Tensor:
    """Krum: the single update with the lowest Krum score (see :func:`krum_scores`).

    Parameters
    ----------
    updates : torch.Tensor
        Stacked updates, shape ``(N, D)``.
    num_byzantine : int
        Assumed number ``f`` of Byzantine updates.

    Returns
    -------
    torch.Tensor
        A copy of the selected row, shape ``(D,)``.
    """
    (best,) = multi_krum_select(updates, num_byzantine, m=1)
    return updates[best].clone()


def multi_krum(updates: torch.Tensor, num_byzantine: int, m: int | None = None) -> torch.Tensor:
    """Multi-Krum: the plain mean of the ``m`` updates with the lowest Krum scores.

    Parameters
    ----------
    updates : torch.Tensor
        Stacked updates, shape ``(N, D)``.
    num_byzantine : int
        Assumed number ``f`` of Byzantine updates.
    m : int or None, default None
        Number of updates averaged; ``None`` means ``N - f``. ``m = 1`` is Krum. The mean is
        taken as a 0/1-weighted mean, without copying the selected rows.

    Returns
    -------
    torch.Tensor
        Shape ``(D,)``.
    """
    check_updates(updates, "multi_krum")
    n = updates.shape[0]
    _check_num_byzantine(num_byzantine, n, "multi_krum")
    chosen = multi_krum_select(updates, num_byzantine, m=n - num_byzantine if m is None else m)
    selection = torch.zeros(n, dtype=torch.float64)
    selection[chosen] = 1.0
    return weighted_mean(updates, selection)


def _fit_rules(cfg: ExperimentConfig) -> Iterator[str | None]:
    """``f`` and ``m`` must fit the replies a round can have."""
    k = clients_per_round(cfg)
    f = cfg.strategy.num_byzantine
    if f is not None and f >= k:
        yield (f"strategy.num_byzantine: {f} Byzantine updates among at most {k} replies a round "
               f"(partition.num_clients, participation); it must be below the replies")
    m = getattr(cfg.strategy, "m", None)
    if m is not None and m > k:
        yield f"strategy.m: averages {m} updates, but a round has at most {k} replies (partition.num_clients, participation)"


class Krum(FedsimStrategy):
    """Krum (:func:`krum`): the update closest to its ``N - f - 2`` nearest neighbours.

    Parameters
    ----------
    *args, **kwargs
        Flower FedAvg's arguments, ``min_successful`` and ``server_opt``.
    num_byzantine : int or None, default None
        Assumed number ``f`` of Byzantine replies (see the module docstring).
    """

    name = "krum"
    Config = KrumConfig
    description = "Krum (Blanchard et al. 2017): the update closest to its N - f - 2 nearest others"

    @classmethod
    def rules(cls, cfg: ExperimentConfig) -> Iterator[str | None]:
        return _fit_rules(cfg)

    def num_byzantine(self, server_round: int, n: int) -> int | None:
        """``f`` for ``n`` usable updates, or None (logged) when they cannot hold it."""
        configured = self.cfg.num_byzantine
        if configured is None:
            return krum_max_byzantine(n)
        if configured >= n:
            self.log(logging.WARNING, "%s: %d usable replies, not more than num_byzantine=%d; round %d skipped, "
                        "the global model is unchanged", type(self).__name__, n, configured, server_round)
            return None
        return configured

    def aggregate_updates(self, server_round: int, updates: list[ClientUpdate]) -> torch.Tensor | None:
        f = self.num_byzantine(server_round, len(updates))
        return None if f is None else krum(torch.stack([u.update for u in updates]), f)


class MultiKrum(Krum):
    """Multi-Krum (:func:`multi_krum`): the plain mean of the ``m`` best-scored updates.

    Parameters
    ----------
    *args, **kwargs
        Flower FedAvg's arguments, ``min_successful`` and ``server_opt``.
    num_byzantine : int or None, default None
        As :class:`Krum`'s.
    m : int or None, default None
        Number of updates averaged; ``None`` means ``N - f``.
    """

    name = "multikrum"
    Config = MultiKrumConfig
    description = "Multi-Krum (Blanchard et al. 2017): mean of the m updates with the best Krum scores"

    def aggregate_updates(self, server_round: int, updates: list[ClientUpdate]) -> torch.Tensor | None:
        n, m = len(updates), self.cfg.m
        f = self.num_byzantine(server_round, n)
        if f is None:
            return None
        if m is not None and m > n:
            self.log(logging.WARNING, "%s: %d usable replies, fewer than m=%d; round %d skipped, the global model is "
                        "unchanged", type(self).__name__, n, m, server_round)
            return None
        return multi_krum(torch.stack([u.update for u in updates]), f, m)

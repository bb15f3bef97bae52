"""Coordinate-wise trimmed mean (Byzantine-robust aggregation).

Yin et al., ICML 2018, arXiv:1803.01498: per coordinate, drop the ``floor(beta * N)``
smallest and largest values and average the rest (``scipy.stats.trim_mean``'s and Flower's
``aggregate_trimmed_avg`` rule). One vote per update.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from fedsim.algorithms.api import SyncStrategyBase
from fedsim.strategies.aggregate import check_updates, sorted_column_chunks
from fedsim.strategies.base import FedsimStrategy
from fedsim.strategies.replies import ClientUpdate

__all__ = ["TrimmedMean", "TrimmedMeanConfig", "trimmed_mean"]


class TrimmedMeanConfig(SyncStrategyBase):
    """Coordinate-wise trimmed mean: drop the ``beta`` fraction at each end (Yin et al. 2018)."""

    name: Literal["trimmed_mean"] = "trimmed_mean"
    beta: float = Field(0.1, ge=0, lt=0.5)


def trimmed_mean(updates: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """Coordinate-wise trimmed mean.

    Per coordinate, drop the ``k = floor(beta * N)`` smallest and the ``k`` largest values
    and average the remaining ``N - 2k`` (``scipy.stats.trim_mean``'s and Flower's rule).

    Parameters
    ----------
    updates : torch.Tensor
        Stacked updates, shape ``(N, D)``.
    beta : float, default 0.1
        Fraction trimmed from each end, in ``[0, 0.5)``.

    Returns
    -------
    torch.Tensor
        Shape ``(D,)``.
    """
    check_updates(updates, "trimmed_mean")
    if not 0.0 <= beta < 0.5:
        raise ValueError(f"trimmed_mean: beta must be in [0, 0.5), got {beta}")
    n, d = updates.shape
    k = int(beta * n)
    if k == 0:
        return updates.mean(dim=0)
    out = torch.empty(d, dtype=updates.dtype, device=updates.device)
    for cols, ordered in sorted_column_chunks(updates):
        out[cols] = ordered[:, k : n - k].mean(dim=1)
    return out


class TrimmedMean(FedsimStrategy):
    """Coordinate-wise trimmed mean of the updates (:func:`trimmed_mean`).

    Parameters
    ----------
    *args, **kwargs
        Flower FedAvg's arguments, ``min_successful`` and ``server_opt``.
    beta : float, default 0.1
        Fraction trimmed at each end, in ``[0, 0.5)``.
    """

    name = "trimmed_mean"
    Config = TrimmedMeanConfig
    description = "Coordinate-wise trimmed mean (Yin et al. 2018), beta trimmed at each end"

    def aggregate_updates(self, server_round: int, updates: list[ClientUpdate]) -> torch.Tensor:
        return trimmed_mean(torch.stack([u.update for u in updates]), self.cfg.beta)

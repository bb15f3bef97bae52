"""The Flag Aggregator as a Flower strategy."""

from __future__ import annotations

from logging import INFO
from typing import Any

import torch
from flwr.supercore import log

from fedsim.config import FlagConfig
from fedsim.flower.base import ScreenedFedAvg, StackedUpdates, check_settings
from fedsim.strategies.flag import flag_aggregate

__all__ = ["Flag"]


class Flag(ScreenedFedAvg):
    """Flag Aggregator: Byzantine-robust aggregation by robust subspace estimation.

    H. Almasi et al., "Flag Aggregator: Scalable Distributed Training under Failures and
    Augmented Losses using Convex Optimization", arXiv:2302.05865. With ``g_i`` the
    unit-normalised updates and ``Y`` (``D x r``) the subspace minimising
    ``sum_i sqrt(1 - |Y^T g_i|^2)`` (fitted by IRLS from the top-``r`` PCA)::

        delta = median_i(|Delta_i|) * Y Y^T mean_i(g_i)

    computed by :func:`fedsim.strategies.flag.flag_aggregate`, one vote per update.

    Parameters
    ----------
    *args, **kwargs
        The arguments of Flower's ``FedAvg`` (``fraction_train``, ``min_train_nodes``, ...),
        unchanged.
    r : int, default 8
        Subspace dimension (capped at the rank of the round's updates).
    lam : float, default 0.0
        Weight of the paper's pairwise-difference term.
    max_iter : int, default 10
        Maximum number of IRLS steps.
    tol : float, default 1e-6
        IRLS stops when a step lowers the objective by at most ``tol`` times its value.
    """

    def __init__(self, *args: Any, r: int = 8, lam: float = 0.0, max_iter: int = 10, tol: float = 1e-6,
                 **kwargs: Any) -> None:
        check_settings(FlagConfig, "Flag", r=r, lam=lam, max_iter=max_iter, tol=tol)
        super().__init__(*args, **kwargs)
        self.r, self.lam, self.max_iter, self.tol = r, lam, max_iter, tol

    def summary(self) -> None:
        log(INFO, "\t├──> Flag settings: r=%d, lam=%s, max_iter=%d, tol=%s", self.r, self.lam, self.max_iter,
            self.tol)
        super().summary()

    def aggregate_updates(self, server_round: int, stacked: StackedUpdates) -> torch.Tensor:
        return flag_aggregate(stacked.updates, r=self.r, lam=self.lam, max_iter=self.max_iter, tol=self.tol)

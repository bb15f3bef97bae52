"""fedsim's classical Byzantine-robust rules as Flower strategies: coordinate median, trimmed
mean, Krum and Multi-Krum.

Each aggregates the clients' updates with the pure function of
:mod:`fedsim.strategies.robust` (the one fedsim's engine uses), one vote per update: the
``weighted_by_key`` weights are used only for the metrics.
"""

from __future__ import annotations

from logging import INFO, WARNING
from typing import Any

import torch
from flwr.supercore import log

from fedsim.config import KrumConfig, MultiKrumConfig, TrimmedMeanConfig
from fedsim.flower.base import ScreenedFedAvg, StackedUpdates, check_settings
from fedsim.strategies.robust import coordinate_median, krum, krum_max_byzantine, multi_krum, trimmed_mean

__all__ = ["Krum", "Median", "MultiKrum", "TrimmedMean"]


class Median(ScreenedFedAvg):
    """Coordinate-wise median of the updates (:func:`fedsim.strategies.robust.coordinate_median`).

    D. Yin, Y. Chen, K. Ramchandran, P. Bartlett, "Byzantine-Robust Distributed Learning:
    Towards Optimal Statistical Rates", ICML 2018, arXiv:1803.01498:
    ``delta_k = median_i Delta_ik``, the two middle values averaged for an even count.

    Parameters
    ----------
    *args, **kwargs
        The arguments of Flower's ``FedAvg`` (``fraction_train``, ``min_train_nodes``, ...),
        unchanged.
    """

    def aggregate_updates(self, server_round: int, stacked: StackedUpdates) -> torch.Tensor:
        return coordinate_median(stacked.updates)


class TrimmedMean(ScreenedFedAvg):
    """Coordinate-wise trimmed mean of the updates (:func:`fedsim.strategies.robust.trimmed_mean`).

    Yin et al., ICML 2018, arXiv:1803.01498: per coordinate, drop the ``floor(beta * N)``
    smallest and largest values and average the rest.

    Parameters
    ----------
    *args, **kwargs
        The arguments of Flower's ``FedAvg``, unchanged.
    beta : float, default 0.1
        Fraction trimmed at each end, in ``[0, 0.5)``.
    """

    def __init__(self, *args: Any, beta: float = 0.1, **kwargs: Any) -> None:
        check_settings(TrimmedMeanConfig, "TrimmedMean", beta=beta)
        super().__init__(*args, **kwargs)
        self.beta = beta

    def summary(self) -> None:
        log(INFO, "\t├──> TrimmedMean settings: beta=%s", self.beta)
        super().summary()

    def aggregate_updates(self, server_round: int, stacked: StackedUpdates) -> torch.Tensor:
        return trimmed_mean(stacked.updates, self.beta)


def _num_byzantine(owner: str, configured: int | None, n: int) -> int | None:
    """``configured``, or Krum's largest tolerable ``f`` for ``n`` updates when it is None;
    None (logged) when ``n`` updates cannot hold ``configured`` Byzantine ones and an honest one."""
    if configured is None:
        return krum_max_byzantine(n)
    if configured >= n:
        log(WARNING, "%s: %d usable replies, not more than num_byzantine=%d; round skipped, "
            "the global model is unchanged", owner, n, configured)
        return None
    return configured


class Krum(ScreenedFedAvg):
    """Krum (:func:`fedsim.strategies.robust.krum`): the update with the smallest sum of squared
    distances to its ``N - f - 2`` nearest other updates.

    P. Blanchard, E. M. El Mhamdi, R. Guerraoui, J. Stainer, "Machine Learning with
    Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS 2017.

    Parameters
    ----------
    *args, **kwargs
        The arguments of Flower's ``FedAvg``, unchanged.
    num_byzantine : int or None, default None
        Assumed number ``f`` of Byzantine replies. ``None`` assumes the most Krum tolerates
        among the round's ``N`` usable replies, ``floor((N - 3) / 2)`` (the largest ``f`` with
        ``N > 2f + 2``; :func:`fedsim.strategies.robust.krum_max_byzantine`). A round with
        ``N <= f`` usable replies is skipped (logged), the global model unchanged.
    """

    def __init__(self, *args: Any, num_byzantine: int | None = None, **kwargs: Any) -> None:
        check_settings(KrumConfig, "Krum", num_byzantine=num_byzantine)
        super().__init__(*args, **kwargs)
        self.num_byzantine = num_byzantine

    def summary(self) -> None:
        log(INFO, "\t├──> Krum settings: num_byzantine=%s", self.num_byzantine)
        super().summary()

    def aggregate_updates(self, server_round: int, stacked: StackedUpdates) -> torch.Tensor | None:
        f = _num_byzantine("Krum", self.num_byzantine, len(stacked.node_ids))
        return None if f is None else krum(stacked.updates, f)


class MultiKrum(ScreenedFedAvg):
    """Multi-Krum (:func:`fedsim.strategies.robust.multi_krum`): the plain mean of the ``m``
    updates with the lowest Krum scores (Blanchard et al., NeurIPS 2017).

    Parameters
    ----------
    *args, **kwargs
        The arguments of Flower's ``FedAvg``, unchanged.
    num_byzantine : int or None, default None
        Assumed number ``f`` of Byzantine replies; ``None`` as in :class:`Krum`.
    m : int or None, default None
        Number of updates averaged; ``None`` means ``N - f``. A round with ``N <= f`` or
        ``N < m`` usable replies is skipped (logged), the global model unchanged.
    """

    def __init__(self, *args: Any, num_byzantine: int | None = None, m: int | None = None, **kwargs: Any) -> None:
        check_settings(MultiKrumConfig, "MultiKrum", num_byzantine=num_byzantine, m=m)
        super().__init__(*args, **kwargs)
        self.num_byzantine = num_byzantine
        self.m = m

    def summary(self) -> None:
        log(INFO, "\t├──> MultiKrum settings: num_byzantine=%s, m=%s", self.num_byzantine, self.m)
        super().summary()

    def aggregate_updates(self, server_round: int, stacked: StackedUpdates) -> torch.Tensor | None:
        n = len(stacked.node_ids)
        f = _num_byzantine("MultiKrum", self.num_byzantine, n)
        if f is None:
            return None
        if self.m is not None and self.m > n:
            log(WARNING, "MultiKrum: %d usable replies, fewer than m=%d; round skipped, "
                "the global model is unchanged", n, self.m)
            return None
        return multi_krum(stacked.updates, f, self.m)

"""FedBuff: buffered asynchronous aggregation.

Source: J. Nguyen, K. Malik, H. Zhan, A. Yousefpour, M. Rabbat, M. Malek, D. Huba,
"Federated Learning with Buffered Asynchronous Aggregation", AISTATS 2022, arXiv 2106.06639.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import torch
from pydantic import Field
from torch import Tensor

from fedsim.algorithms.api import AsyncStrategyBase
from fedsim.strategies.aggregate import apply_weighted_sum
from fedsim.strategies.asynchronous import ArrivalView, AsyncRule

if TYPE_CHECKING:
    from fedsim.strategies.replies import ClientUpdate

__all__ = ["FedBuff", "FedBuffConfig", "FedBuffRule", "fedbuff_aggregate", "staleness_scale"]


class FedBuffConfig(AsyncStrategyBase):
    """FedBuff (Nguyen et al., arXiv 2106.06639): aggregate every K arrivals."""

    name: Literal["fedbuff"] = "fedbuff"
    buffer_size: int = Field(10, ge=1)
    eta_g: float = Field(1.0, gt=0)


def staleness_scale(staleness: int) -> float:
    """FedBuff's staleness down-weighting ``1 / sqrt(1 + staleness)``, staleness >= 0."""
    if staleness < 0:
        raise ValueError(f"staleness_scale: staleness must be >= 0, got {staleness}")
    return 1.0 / math.sqrt(1.0 + staleness)


def fedbuff_aggregate(model: Tensor, updates: Tensor, stalenesses: Sequence[int],
                      eta_g: float = 1.0, noise: Tensor | None = None) -> Tensor:
    """``x + eta_g * ((1/K) * sum_k Delta_k / sqrt(1 + staleness_k) + n)`` over K buffered
    updates, ``n`` the mechanism's noise under central DP (:mod:`fedsim.privacy.buffered`).

    Parameters
    ----------
    model : Tensor, shape (D,)
        Current global model, flat.
    updates : Tensor, shape (K, D)
        Buffered client updates ``x_k - x_start``, one row each (K >= 1).
    stalenesses : sequence of int
        Staleness of each update when it arrived, >= 0.
    eta_g : float, default 1.0
        Server learning rate.
    noise : Tensor of shape (D,) or None, default None
        Added to the buffer's mean before ``eta_g`` scales it.

    Returns
    -------
    Tensor
        The new global model (a new tensor; ``model`` is not modified).
    """
    if len(stalenesses) != len(updates):
        raise ValueError(f"fedbuff_aggregate: {len(updates)} updates but {len(stalenesses)} stalenesses")
    scales = torch.tensor([staleness_scale(s) / len(updates) for s in stalenesses], dtype=updates.dtype)
    new_model = apply_weighted_sum(model, updates, scales, eta_g, "fedbuff_aggregate")
    return new_model if noise is None else new_model + eta_g * noise.to(new_model.dtype)


class FedBuff:
    """FedBuff server rule (Nguyen et al., AISTATS 2022, arXiv 2106.06639).

    Client updates ``Delta_k = x_k - x_start`` are buffered as they arrive, each tagged
    with its staleness ``version - base_version`` at arrival. When ``buffer_size`` (K) of
    them are in, the server applies

        x <- x + eta_g * (1/K) * sum_k Delta_k / sqrt(1 + staleness_k)

    and empties the buffer. Driving loop: ``add(...)``; ``if is_full: model = flush(model)``.

    Parameters
    ----------
    buffer_size : int, default 10
        K, the number of arrivals per server update (the paper's default is 10).
    eta_g : float, default 1.0
        Server learning rate.

    Attributes
    ----------
    version : int
        Number of server updates (flushes) so far.
    """

    def __init__(self, buffer_size: int = 10, eta_g: float = 1.0) -> None:
        if buffer_size < 1:
            raise ValueError(f"FedBuff: buffer_size must be >= 1, got {buffer_size}")
        if not eta_g > 0:
            raise ValueError(f"FedBuff: eta_g must be > 0, got {eta_g}")
        self.buffer_size = int(buffer_size)
        self.eta_g = float(eta_g)
        self.version = 0
        self._deltas: list[Tensor] = []
        self._stalenesses: list[int] = []

    def __len__(self) -> int:
        return len(self._deltas)

    @property
    def is_full(self) -> bool:
        """True once ``buffer_size`` updates are buffered."""
        return len(self._deltas) >= self.buffer_size

    def add(self, delta: Tensor, base_version: int) -> int:
        """Buffer one update from a client that started from ``base_version``; returns
        its staleness."""
        if not 0 <= base_version <= self.version:
            raise ValueError(f"FedBuff: base_version {base_version} is not in "
                             f"[0, current version {self.version}]")
        if self.is_full:
            raise ValueError(f"FedBuff: the buffer already holds {self.buffer_size} "
                             f"updates; flush before adding more")
        staleness = self.version - base_version
        self._deltas.append(delta)
        self._stalenesses.append(staleness)
        return staleness

    def flush(self, model: Tensor, noise: Tensor | None = None) -> Tensor:
        """Aggregate the buffered updates (plus ``noise`` on their mean) into ``model``,
        empty the buffer, bump :attr:`version` and return the new model. Raises if the
        buffer is empty."""
        if not self._deltas:
            raise ValueError("FedBuff.flush: the buffer is empty")
        new_model = fedbuff_aggregate(model, torch.stack(self._deltas), self._stalenesses,
                                      self.eta_g, noise)
        self.discard()
        self.version += 1
        return new_model

    def discard(self) -> None:
        """Empty the buffer without applying it (the model's version stays)."""
        self._deltas, self._stalenesses = [], []

    def __repr__(self) -> str:
        return (f"FedBuff(buffer_size={self.buffer_size}, eta_g={self.eta_g}, "
                f"version={self.version}, buffered={len(self)})")


class FedBuffRule(AsyncRule):
    """FedBuff in the asynchronous loop: buffer arrivals, apply their staleness-scaled mean
    every ``buffer_size``.

    Under ``privacy.mechanism: central`` (:mod:`fedsim.privacy.buffered`) each arrival is
    clipped to ``privacy.clip_norm`` and each buffer's mean gets Gaussian noise of std
    ``z C / K``: the staleness weights are at most 1 and the denominator is the fixed K, so
    a client's update moves the mean by at most ``C / K``. A buffer that would exceed
    ``privacy.max_epsilon`` is dropped unapplied and the run stops.
    """

    name = "fedbuff"
    Config = FedBuffConfig
    description = "FedBuff (Nguyen et al. 2022): staleness-scaled mean of every buffer_size arrivals"
    central_privacy = True

    def __init__(self, cfg: FedBuffConfig, shares) -> None:
        super().__init__(cfg, shares)
        self.server = FedBuff(cfg.buffer_size, cfg.eta_g)
        self.buffered: list[int] = []  # the clients of the buffered updates, in order

    def receive(self, model: Tensor, update: ClientUpdate, arrival: ArrivalView) -> Tensor:
        privacy = self.privacy
        self.server.add(update.update if privacy is None else privacy.clip(update.update), arrival.job.base_version)
        self.buffered.append(arrival.job.partition_id)
        if not self.server.is_full:
            return model
        clients, self.buffered = self.buffered, []
        if privacy is None:
            return self.server.flush(model)
        if not privacy.affordable(clients):
            self.server.discard()
            return model
        return self.server.flush(model, privacy.release(clients, self.server.version + 1, model.numel()))

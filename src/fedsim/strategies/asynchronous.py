"""The base of the asynchronous algorithms: a rule the asynchronous loop
(:mod:`fedsim.loops.asynchronous`) feeds with arrivals one at a time.

A rule receives each accepted arrival (:meth:`AsyncRule.receive`) and, if it aggregates by
windows of time, says when the next window ends (:meth:`AsyncRule.next_boundary`) and closes
it (:meth:`AsyncRule.close_window`). ``version`` counts the global model's updates, from
which the loop measures staleness.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Protocol

import numpy as np
from torch import Tensor

from fedsim.algorithms.api import Algorithm, AsyncStrategyBase

if TYPE_CHECKING:
    from fedsim.privacy.buffered import BufferPrivacy
    from fedsim.strategies.replies import ClientUpdate

__all__ = ["AsyncRule"]


class _Job(Protocol):
    partition_id: int
    base: Tensor
    base_version: int


class ArrivalView(Protocol):
    """What a rule reads of an arrival: the job (its client, the model it started from and
    that model's version) and how long the client took."""

    job: _Job
    duration: float


class AsyncRule(Algorithm):
    """Base of the asynchronous algorithms' server rules.

    Parameters
    ----------
    cfg : AsyncStrategyBase
        The algorithm's config section.
    shares : numpy.ndarray
        Each client's data share p_i (sums to 1).
    """

    Config: ClassVar[type[AsyncStrategyBase]]
    restarts_on_arrival: ClassVar[bool] = True
    central_privacy: ClassVar[bool] = False
    """Whether :meth:`receive` applies ``privacy.mechanism: central`` (:attr:`privacy`): clips
    each arrival and noises each aggregate so that a client's update moves it by at most
    ``clip_norm / K``, K the aggregate's fixed count (``fedsim validate`` refuses the rest)."""
    privacy: BufferPrivacy | None = None
    """The run's central mechanism and ledgers, set by the loop (None: no privacy)."""

    def __init__(self, cfg: AsyncStrategyBase, shares: np.ndarray) -> None:
        self.cfg = cfg
        self.shares = shares

    @property
    def version(self) -> int:
        return self.server.version

    def receive(self, model: Tensor, update: ClientUpdate, arrival: ArrivalView) -> Tensor:
        """Take one accepted update; return the (possibly new) global model."""
        raise NotImplementedError

    def next_boundary(self) -> float | None:
        """Time of the next window's end, or None for rules without windows."""
        return None

    def close_window(self, model: Tensor) -> Tensor:
        """Aggregate the window that ends now (windowed rules only)."""
        raise NotImplementedError(f"{type(self).__name__} has no windows")

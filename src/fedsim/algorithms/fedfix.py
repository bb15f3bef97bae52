"""FedFix: asynchronous federated learning with a fixed aggregation window.

Source: Y. Fraboni, R. Vidal, L. Kameni, M. Lorenzi, "A General Theory for Federated
Optimization with Asynchronous and Heterogeneous Clients Updates", JMLR 2023,
arXiv 2206.10189.

The server aggregates every ``window`` (Delta t) of virtual time, over the clients whose
update arrived in that window, then those clients restart from the new model.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from pydantic import Field
from torch import Tensor

from fedsim.algorithms.api import AsyncStrategyBase
from fedsim.config_checks import MAX_VIRTUAL_STEPS
from fedsim.strategies.aggregate import apply_weighted_sum
from fedsim.strategies.asynchronous import ArrivalView, AsyncRule

if TYPE_CHECKING:
    from fedsim.config import ExperimentConfig
    from fedsim.strategies.replies import ClientUpdate

__all__ = ["FedFix", "FedFixArrival", "FedFixConfig", "FedFixRule", "fedfix_aggregate", "fedfix_weights"]


class FedFixConfig(AsyncStrategyBase):
    """FedFix (Fraboni et al., arXiv 2206.10189): aggregate every fixed window of time."""

    name: Literal["fedfix"] = "fedfix"
    window: float = Field(0.5, gt=0, description="aggregation window, x slowest client's time")
    eta_g: float = Field(1.0, gt=0)

_CEIL_RTOL = 1e-9


@dataclass(frozen=True)
class FedFixArrival:
    """One client update that reached the server within the current window.

    Attributes
    ----------
    delta : Tensor
        Flat update ``Delta_i = x_i - x_start``: the client's result minus the (possibly
        stale) global model it started from.
    tau : float
        The client's time for this update (virtual seconds from dispatch to arrival), > 0.
    p : float
        The client's data share ``p_i = n_i / sum_j n_j`` over all clients, >= 0.
    """

    delta: Tensor
    tau: float
    p: float


def fedfix_weights(taus: Sequence[float] | Tensor, window: float,
                   p: Sequence[float] | Tensor) -> Tensor:
    """FedFix aggregation weights ``omega_i = ceil(tau_i / window) * p_i``.

    ``ceil(tau_i / window)`` is the number of windows a client with update time ``tau_i``
    needs (it restarts at aggregation times), so it contributes to one aggregation in
    ``ceil(tau_i / window)`` and the weight compensates exactly for that rarity. A ratio
    within a relative 1e-9 of an integer counts as that integer, so float noise such as
    ``1.1 / 0.1 = 11.000000000000002`` does not add a window.

    Parameters
    ----------
    taus : sequence of float or Tensor, shape (k,)
        Each arriving client's time per update, > 0.
    window : float
        The aggregation window Delta t, > 0.
    p : sequence of float or Tensor, shape (k,)
        Each arriving client's data share, >= 0.

    Returns
    -------
    Tensor
        Float64 weights, shape (k,).
    """
    if not window > 0:
        raise ValueError(f"fedfix_weights: window must be > 0, got {window}")
    taus = torch.as_tensor(taus, dtype=torch.float64)
    p = torch.as_tensor(p, dtype=torch.float64)
    if taus.shape != p.shape or taus.ndim != 1:
        raise ValueError(f"fedfix_weights: taus {tuple(taus.shape)} and p {tuple(p.shape)} "
                         f"must be 1-D of the same length")
    if not bool((taus > 0).all()):
        raise ValueError(f"fedfix_weights: every tau must be > 0, got {taus.tolist()}")
    if not bool((p >= 0).all()):
        raise ValueError(f"fedfix_weights: every p must be >= 0, got {p.tolist()}")
    windows = torch.ceil(taus / window * (1.0 - _CEIL_RTOL))
    return windows * p


def fedfix_aggregate(model: Tensor, updates: Tensor, weights: Tensor,
                     eta_g: float = 1.0) -> Tensor:
    """``x + eta_g * sum_i w_i * Delta_i`` (no normalisation by ``sum_i w_i``).

    Parameters
    ----------
    model : Tensor, shape (D,)
        Current global model, flat.
    updates : Tensor, shape (N, D)
        The window's updates ``Delta_i``, stacked one row per client (N >= 1).
    weights : Tensor, shape (N,)
        Their aggregation weights (from :func:`fedfix_weights`).
    eta_g : float, default 1.0
        Server learning rate.

    Returns
    -------
    Tensor
        The new global model (a new tensor; ``model`` is not modified).
    """
    return apply_weighted_sum(model, updates, weights, eta_g, "fedfix_aggregate")


class FedFix:
    """FedFix server rule (Fraboni et al., JMLR 2023, arXiv 2206.10189).

    Every ``window`` of virtual time the server applies

        x <- x + eta_g * sum_{i finished in the window} ceil(tau_i / window) * p_i * Delta_i

    with ``Delta_i`` the client's result minus the model it started from. The sum is not
    normalised by the weights present: normalising would re-introduce the bias. The k-th
    aggregation happens at ``k * window`` and takes the arrivals in ``((k-1) * window,
    k * window]`` (``EventQueue.pop_until(k * window)``); an update landing exactly on the
    boundary belongs to that window, which is what ``ceil`` counts.

    Why it is unbiased (derived here, and checked numerically in the tests): clients are
    dispatched at aggregation times, so a client with update time ``tau_i`` reports once
    every ``m_i = ceil(tau_i / window)`` aggregations; over a uniformly random phase (or
    averaged over its cycle) it is present in an aggregation with probability
    ``q_i = 1 / m_i``. Its expected aggregation weight is then ``q_i * m_i * p_i = p_i`` and

        E[sum_{i in S_n} omega_i Delta_i] = sum_i p_i Delta_i,

    the synchronous FedAvg update. In the paper's framework the asynchronous scheme
    optimises ``sum_i q_i f_i`` with ``q_i`` the client's expected aggregation weight, so
    ``q_i = p_i`` recovers the federated objective ``sum_i p_i f_i``; unweighted
    asynchronous averaging instead weights each client by its frequency ``1 / m_i`` and
    drifts toward the fast clients' optimum. Stale starting models add an error of order
    ``eta_g`` around that optimum. With random ``tau_i`` (jitter) the identity holds only
    approximately, for the weights' expectation over the cycle.

    Parameters
    ----------
    window : float
        The aggregation period Delta t in virtual seconds, > 0. The paper uses 0.2, 0.5
        or 0.8 of the slowest client's time per update.
    eta_g : float, default 1.0
        Server learning rate.

    Attributes
    ----------
    version : int
        Number of aggregations that changed the model (empty windows leave it as is).
    """

    def __init__(self, window: float, eta_g: float = 1.0) -> None:
        if not window > 0:
            raise ValueError(f"FedFix: window must be > 0, got {window}")
        if not eta_g > 0:
            raise ValueError(f"FedFix: eta_g must be > 0, got {eta_g}")
        self.window = float(window)
        self.eta_g = float(eta_g)
        self.version = 0

    def aggregate(self, model: Tensor, arrivals: Sequence[FedFixArrival]) -> Tensor:
        """Apply one window's arrivals to ``model`` and return the new global model."""
        if not arrivals:
            return model
        weights = fedfix_weights([a.tau for a in arrivals], self.window,
                                 [a.p for a in arrivals])
        updates = torch.stack([a.delta for a in arrivals])
        new_model = fedfix_aggregate(model, updates, weights, self.eta_g)
        self.version += 1
        return new_model

    def __repr__(self) -> str:
        return f"FedFix(window={self.window}, eta_g={self.eta_g}, version={self.version})"


class FedFixRule(AsyncRule):
    """FedFix in the asynchronous loop: aggregate each window's arrivals with weights
    ceil(tau_i / window) * p_i; the clients of the window restart at its end."""

    name = "fedfix"
    Config = FedFixConfig
    description = "FedFix (Fraboni et al. 2023): every fixed window, arrivals weighted ceil(tau_i / window) p_i"
    restarts_on_arrival = False

    @classmethod
    def rules(cls, cfg: ExperimentConfig) -> Iterator[str | None]:
        """A window is a server step: at most MAX_VIRTUAL_STEPS of them in the horizon."""
        horizon, window = cfg.strategy.horizon, cfg.strategy.window
        if horizon / window > MAX_VIRTUAL_STEPS:
            yield (f"strategy.window: {window:g} makes {horizon / window:.3g} steps in strategy.horizon {horizon:g}; "
                   f"at most {MAX_VIRTUAL_STEPS:,} (raise strategy.window, or lower strategy.horizon)")

    def __init__(self, cfg: FedFixConfig, shares: np.ndarray) -> None:
        super().__init__(cfg, shares)
        self.server = FedFix(cfg.window, cfg.eta_g)
        self.windows_closed = 0
        self._pending: list[FedFixArrival] = []

    def receive(self, model: Tensor, update: ClientUpdate, arrival: ArrivalView) -> Tensor:
        share = float(self.shares[arrival.job.partition_id])
        self._pending.append(FedFixArrival(update.update, arrival.duration, share))
        return model

    def next_boundary(self) -> float:
        return (self.windows_closed + 1) * self.server.window

    def close_window(self, model: Tensor) -> Tensor:
        """Aggregate the window's arrivals (an empty window leaves the model as it is)."""
        model = self.server.aggregate(model, self._pending)
        self._pending = []
        self.windows_closed += 1
        return model

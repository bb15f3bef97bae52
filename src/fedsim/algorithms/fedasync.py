"""FedAsync: apply every client result to the global model as soon as it arrives.

Source: C. Xie, S. Koyejo, I. Gupta, "Asynchronous Federated Optimization", 2019,
arXiv 1903.03934: x <- (1 - alpha_t) x + alpha_t x_i, alpha_t = alpha (1 + staleness)^-a.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field
from torch import Tensor

from fedsim.algorithms.api import AsyncStrategyBase
from fedsim.strategies.asynchronous import ArrivalView, AsyncRule

if TYPE_CHECKING:
    from fedsim.strategies.replies import ClientUpdate

__all__ = ["FedAsync", "FedAsyncConfig", "FedAsyncRule", "fedasync_mix", "polynomial_staleness"]


class FedAsyncConfig(AsyncStrategyBase):
    """FedAsync (Xie et al., arXiv 1903.03934): mix each arrival with alpha (1+s)^-a."""

    name: Literal["fedasync"] = "fedasync"
    alpha: float = Field(0.6, gt=0, le=1)
    a: float = Field(0.5, ge=0)


def polynomial_staleness(staleness: int, a: float = 0.5) -> float:
    """The paper's polynomial staleness function ``s_a(staleness) = (1 + staleness)^(-a)``.

    Parameters
    ----------
    staleness : int
        ``t - tau``: global versions produced since the client fetched its model, >= 0.
    a : float, default 0.5
        Decay exponent, >= 0 (0 turns staleness weighting off).
    """
    if staleness < 0:
        raise ValueError(f"polynomial_staleness: staleness must be >= 0, got {staleness}")
    if a < 0:
        raise ValueError(f"polynomial_staleness: a must be >= 0, got {a}")
    return float((1.0 + staleness) ** (-a))


def fedasync_mix(model: Tensor, client_model: Tensor, alpha_t: float) -> Tensor:
    """``x <- (1 - alpha_t) * x + alpha_t * x_new``, on flat tensors of the same shape."""
    if model.shape != client_model.shape:
        raise ValueError(f"fedasync_mix: client model of shape {tuple(client_model.shape)} "
                         f"does not match the global model's {tuple(model.shape)}")
    if not 0.0 <= alpha_t <= 1.0:
        raise ValueError(f"fedasync_mix: alpha_t must be in [0, 1], got {alpha_t}")
    return model + alpha_t * (client_model - model)


class FedAsync:
    """FedAsync server rule (Xie, Koyejo, Gupta 2019, arXiv 1903.03934).

    Each arrival is mixed into the global model at once:

        x <- (1 - alpha_t) * x + alpha_t * x_i,   alpha_t = alpha * (1 + staleness)^(-a)

    where ``x_i`` is the client's trained model and ``staleness = version - base_version``,
    the number of global updates since the client fetched its starting model. Only the
    polynomial staleness function is provided (the paper also has constant and hinge).

    Parameters
    ----------
    alpha : float, default 0.6
        Mixing hyperparameter in (0, 1]; the paper sweeps 0.4, 0.6, 0.8, 0.9.
    a : float, default 0.5
        Polynomial decay exponent, >= 0; the paper's polynomial runs use 0.5.

    Attributes
    ----------
    version : int
        Number of updates applied to the global model.
    """

    def __init__(self, alpha: float = 0.6, a: float = 0.5) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"FedAsync: alpha must be in (0, 1], got {alpha}")
        if a < 0:
            raise ValueError(f"FedAsync: a must be >= 0, got {a}")
        self.alpha = float(alpha)
        self.a = float(a)
        self.version = 0

    def staleness(self, base_version: int) -> int:
        """Global versions since ``base_version`` (the version the client started from)."""
        if not 0 <= base_version <= self.version:
            raise ValueError(f"FedAsync: base_version {base_version} is not in "
                             f"[0, current version {self.version}]")
        return self.version - base_version

    def mixing_weight(self, base_version: int) -> float:
        """``alpha_t = alpha * (1 + staleness)^(-a)`` for a client that started from
        ``base_version``."""
        return self.alpha * polynomial_staleness(self.staleness(base_version), self.a)

    def apply(self, model: Tensor, client_model: Tensor, base_version: int) -> Tensor:
        """Mix one arrival into ``model``, bump :attr:`version`, return the new model."""
        new_model = fedasync_mix(model, client_model, self.mixing_weight(base_version))
        self.version += 1
        return new_model

    def __repr__(self) -> str:
        return f"FedAsync(alpha={self.alpha}, a={self.a}, version={self.version})"


class FedAsyncRule(AsyncRule):
    """FedAsync in the asynchronous loop: every arrival is mixed in at once."""

    name = "fedasync"
    Config = FedAsyncConfig
    description = "FedAsync (Xie et al. 2019): each arrival mixed in with alpha (1 + staleness)^-a"

    def __init__(self, cfg: FedAsyncConfig, shares) -> None:
        super().__init__(cfg, shares)
        self.server = FedAsync(cfg.alpha, cfg.a)

    def receive(self, model: Tensor, update: ClientUpdate, arrival: ArrivalView) -> Tensor:
        return self.server.apply(model, arrival.job.base + update.update, arrival.job.base_version)

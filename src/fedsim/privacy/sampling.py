"""How a run's participation model samples clients, as the accountant sees it.

Amplification by sampling is claimed only where an accountant covers the participation
model actually used (:mod:`fedsim.strategies.participation`): ``bernoulli`` with one
probability for every client (``p_low == p_high``, not tied to labels) is Poisson sampling;
``uniform`` with ``k < N`` is fixed-size sampling without replacement. Markov chains, cyclic
groups and unequal probabilities are accounted with no amplification, and so is an algorithm
whose aggregate depends on who took part in earlier rounds (FedAU's online weights): the
amplification theorems hide a round's participation, which such an aggregate would reveal.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

from fedsim.algorithms import registry
from fedsim.config_checks import clients_per_round

if TYPE_CHECKING:
    from fedsim.config import ExperimentConfig

__all__ = ["ClientSampling", "client_sampling"]


@dataclass(frozen=True)
class ClientSampling:
    """The accountant's view of client participation.

    Attributes
    ----------
    kind : {"none", "poisson", "fixed"}
    probability : float
        Poisson: each client's probability.
    sample_size, population : int
        Fixed: ``k`` of ``N``.
    expected_clients : float
        Clients per round on average: the fixed denominator ``m`` of the central mean.
    note : str or None
        Why there is no amplification, when there is none though clients are sampled.
    """

    kind: Literal["none", "poisson", "fixed"]
    probability: float
    sample_size: int
    population: int
    expected_clients: float
    note: str | None = None


def client_sampling(cfg: ExperimentConfig) -> ClientSampling:
    """The sampling of ``cfg``'s clients (synchronous strategies), with no amplification where
    the algorithm's aggregate reveals who took part (its ``participation_revealed``) under
    ``privacy.mechanism: central``."""
    sampling = _participation_sampling(cfg)
    revealed = registry.get(cfg.strategy.name).participation_revealed(cfg)
    if sampling.kind == "none" or revealed is None or cfg.privacy.mechanism != "central":
        return sampling
    return replace(sampling, kind="none", probability=1.0, note=f"{revealed}; no amplification by sampling")


def _participation_sampling(cfg: ExperimentConfig) -> ClientSampling:
    part, n = cfg.participation, cfg.partition.num_clients
    if part.model == "uniform":
        k = clients_per_round(cfg)
        if k == n:
            return ClientSampling("none", 1.0, n, n, float(n))
        return ClientSampling("fixed", k / n, k, n, float(k))
    if part.model == "bernoulli" and not part.tied_to_labels and part.p_low == part.p_high:
        return ClientSampling("poisson", part.p_low, 0, n, part.p_low * n)
    if part.model == "cyclic":
        return ClientSampling("none", 1.0, 0, n, n / part.num_groups,
                              "participation.model cyclic: no accountant covers cyclic groups; no amplification")
    mean = part.p_mean if part.tied_to_labels else (part.p_low + part.p_high) / 2
    why = "unequal probabilities" if part.model == "bernoulli" else "Markov chains"
    return ClientSampling("none", 1.0, 0, n, mean * n,
                          f"participation.model {part.model}: no accountant covers {why}; no amplification")

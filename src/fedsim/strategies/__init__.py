"""Server algorithms: pure aggregation math plus thin Flower Strategy adapters.

``build_strategy(exp, spec, node_of, label_mix)`` returns the synchronous strategy named by
``strategy.name`` with the participation model of ``participation:``. The asynchronous and
gossip families run in their own loops (``fedsim.sim.async_loop``, ``fedsim.sim.gossip_loop``).
"""

from __future__ import annotations

import numpy as np

from fedsim.config import ExperimentConfig
from fedsim.params import ParamSpec
from fedsim.strategies.base import FedsimStrategy
from fedsim.strategies.fedau import FedAU
from fedsim.strategies.fedavg import FedAvg, FedProx
from fedsim.strategies.fedld import FedLD
from fedsim.strategies.fedlex import FedLEx
from fedsim.strategies.fednova import FedNova
from fedsim.strategies.flag import FlagStrategy
from fedsim.strategies.participation import (
    BernoulliParticipation,
    CyclicParticipation,
    MarkovParticipation,
    UniformSampler,
)
from fedsim.strategies.robust import Krum, Median, MultiKrum, TrimmedMean
from fedsim.strategies.scaffold import Scaffold

STRATEGIES: dict[str, type[FedsimStrategy]] = {
    "fedavg": FedAvg, "fedprox": FedProx, "scaffold": Scaffold, "fednova": FedNova, "median": Median, "trimmed_mean": TrimmedMean, "krum": Krum,
    "multikrum": MultiKrum, "flag": FlagStrategy, "fedau": FedAU, "fedld": FedLD, "fedlex": FedLEx,
}


def build_sampler(exp: ExperimentConfig, label_mix: np.ndarray | None = None):
    """The participation model over partition ids (``participation:`` in the config).

    ``label_mix`` (clients x classes label proportions) is needed when the Bernoulli
    probabilities are tied to each client's labels.
    """
    part, n, seed = exp.participation, exp.partition.num_clients, exp.seed
    if part.model == "uniform":
        return UniformSampler(n, fraction=exp.strategy.fraction_train, seed=seed)
    if part.model == "cyclic":
        return CyclicParticipation(n, part.num_groups, seed=seed)
    if part.tied_to_labels:
        if label_mix is None:
            raise ValueError("participation.tied_to_labels needs the clients' label mix")
        bernoulli = BernoulliParticipation.from_label_distribution(
            label_mix, mean_probability=part.p_mean, min_probability=part.p_low,
            concentration=part.label_concentration, seed=seed)
    else:
        bernoulli = BernoulliParticipation.from_uniform(n, low=part.p_low, high=part.p_high, seed=seed)
    if part.model == "bernoulli":
        return bernoulli
    return MarkovParticipation.from_probabilities(bernoulli.probabilities(), p_off_to_on=part.p_off_to_on,
                                                  seed=seed)


def build_strategy(exp: ExperimentConfig, spec: ParamSpec, node_of: dict[int, int],
                   label_mix: np.ndarray | None = None) -> FedsimStrategy:
    """The configured synchronous strategy, ready to drive."""
    return STRATEGIES[exp.strategy.name](exp, spec, node_of, build_sampler(exp, label_mix))

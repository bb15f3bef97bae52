"""Server algorithms: pure aggregation math plus thin Flower Strategy adapters.

``build_strategy(cfg, spec, node_of)`` returns the strategy named by ``strategy.name``.
"""

from __future__ import annotations

from fedsim.config import ExperimentConfig
from fedsim.params import ParamSpec
from fedsim.strategies.base import FedsimStrategy
from fedsim.strategies.fedavg import FedAvg, FedProx
from fedsim.strategies.participation import UniformSampler

STRATEGIES: dict[str, type[FedsimStrategy]] = {"fedavg": FedAvg, "fedprox": FedProx}


def build_sampler(cfg: ExperimentConfig):
    """The participation model over partition ids (uniform sampling of a fraction)."""
    return UniformSampler(cfg.partition.num_clients, fraction=cfg.strategy.fraction_train,
                          seed=cfg.seed)


def build_strategy(cfg: ExperimentConfig, spec: ParamSpec, node_of: dict[int, int]) -> FedsimStrategy:
    """The configured strategy, ready to drive (config validation guarantees the name)."""
    cls = STRATEGIES[cfg.strategy.name]
    return cls(cfg.strategy, spec, build_sampler(cfg), node_of, cfg.quant)

"""FedAvg and FedProx: the synchronous baselines.

FedAvg ("Communication-Efficient Learning of Deep Networks from Decentralized Data",
McMahan et al., arXiv 1602.05629): the example-weighted mean of client updates,
``delta = sum_i n_i Delta_i / sum_i n_i``, applied by the server optimizer (plain SGD
with lr 1 is FedAvg; momentum is FedAvgM; adam is FedAdam).

FedProx ("Federated Optimization in Heterogeneous Networks", Li et al., arXiv 1812.06127):
the same aggregation; each client adds ``mu / 2 * ||w - w_global||^2`` to its loss
(:class:`fedsim.clients.hooks.ProximalTerm`), switched on by the ``proximal-mu`` entry
this strategy puts into every training message.
"""

from __future__ import annotations

from fedsim.config import ExperimentConfig
from fedsim.params import ParamSpec
from fedsim.strategies.base import FedsimStrategy


class FedAvg(FedsimStrategy):
    """Federated averaging: :meth:`FedsimStrategy.aggregate_updates` as it is."""


class FedProx(FedAvg):
    """FedAvg whose clients minimise ``loss + mu/2 ||w - w_global||^2``.

    Parameters
    ----------
    exp : ExperimentConfig
        ``exp.strategy.mu`` (float, default 0.01) is the proximal strength.
    """

    def __init__(self, exp: ExperimentConfig, spec: ParamSpec, node_of: dict[int, int], sampler) -> None:
        super().__init__(exp, spec, node_of, sampler, client_config={"proximal-mu": exp.strategy.mu})

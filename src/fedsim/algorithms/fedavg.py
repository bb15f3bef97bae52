"""FedAvg: the synchronous baseline.

"Communication-Efficient Learning of Deep Networks from Decentralized Data", McMahan et al.,
arXiv 1602.05629: the example-weighted mean of client updates,
``delta = sum_i n_i Delta_i / sum_i n_i``, applied by the server optimizer (plain SGD with
lr 1 is FedAvg; momentum is FedAvgM; adam, adagrad and yogi are FedAdam, FedAdagrad and
FedYogi, Reddi et al., arXiv 2003.00295).
"""

from __future__ import annotations

from typing import Literal

from fedsim.algorithms.api import SyncStrategyBase
from fedsim.strategies.base import FedsimStrategy

__all__ = ["FedAvg", "FedAvgConfig"]


class FedAvgConfig(SyncStrategyBase):
    """FedAvg (McMahan et al. 2017), example-weighted mean of client updates."""

    name: Literal["fedavg"] = "fedavg"


class FedAvg(FedsimStrategy):
    """Federated averaging: :meth:`FedsimStrategy.aggregate_updates` as it is.

    Parameters
    ----------
    *args, **kwargs
        Flower FedAvg's arguments, and ``min_successful`` (int, default 1) and ``server_opt``
        (a :class:`~fedsim.algorithms.api.ServerOptConfig` or its mapping, default plain SGD
        with lr 1).
    """

    name = "fedavg"
    Config = FedAvgConfig
    description = "FedAvg (McMahan et al. 2017): example-weighted mean of updates; server optimizers make FedAvgM/FedAdam"

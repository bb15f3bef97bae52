"""FedAU as a Flower strategy: participation tracked per Flower node id."""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.supercore import log

from fedsim.config import FedAUConfig
from fedsim.flower.base import ScreenedFedAvg, StackedUpdates, check_settings
from fedsim.strategies.fedau import FedAUWeights, fedau_aggregate

__all__ = ["FedAU"]


class FedAU(ScreenedFedAvg):
    """FedAU: FedAvg with aggregation weights estimated online from each node's participation.

    S. Wang, M. Ji, "A Lightweight Method for Tackling Unknown Participation Statistics in
    Federated Averaging", arXiv:2306.03401::

        delta = (1/N) * sum_{i in S_t} omega_i * Delta_i

    ``omega_i`` is the mean of node ``i``'s past participation gaps, each capped at ``K``
    (1 before its first closed gap), taken before this round's gap is added
    (:class:`fedsim.strategies.fedau.FedAUWeights`); the sum is
    :func:`fedsim.strategies.fedau.fedau_aggregate`.

    In a Flower app there are no partition ids: participation is tracked per Flower node
    id (the ids ``grid.get_node_ids()`` gives), and a node participates in a round when its
    training reply is accepted. ``N`` is the number of nodes the grid reports in that round
    (all connected nodes, sampled or not), not the number of replies. A node that connects
    later is tracked from the round it first appears in, with no history.

    Parameters
    ----------
    *args, **kwargs
        The arguments of Flower's ``FedAvg`` (``fraction_train``, ``min_train_nodes``, ...),
        unchanged; ``weighted_by_key`` only weighs the metrics.
    K : int, default 50
        Cut-off: an open gap is recorded (as ``K``) once it reaches ``K`` rounds.
    """

    def __init__(self, *args: Any, K: int = 50, **kwargs: Any) -> None:
        check_settings(FedAUConfig, "FedAU", K=K)
        super().__init__(*args, **kwargs)
        self.K = K
        self.participation: FedAUWeights | None = None
        self.node_index: dict[int, int] = {}
        self.num_nodes = 0

    def summary(self) -> None:
        log(INFO, "\t├──> FedAU settings: K=%d, participation tracked per node id", self.K)
        super().summary()

    def _track(self, node_ids: Iterable[int]) -> None:
        """Give every node not seen before the next participation index."""
        new = sorted(set(node_ids) - set(self.node_index))
        for node in new:
            self.node_index[node] = len(self.node_index)
        if self.participation is None:
            self.participation = FedAUWeights(len(self.node_index), K=self.K)
        else:
            self.participation.add_clients(len(self.node_index) - self.participation.num_clients)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        messages = super().configure_train(server_round, arrays, config, grid)
        node_ids = list(grid.get_node_ids())
        self._track(node_ids)
        self.num_nodes = len(node_ids)
        return messages

    def aggregate_updates(self, server_round: int, stacked: StackedUpdates) -> torch.Tensor:
        self._track(stacked.node_ids)
        indices = [self.node_index[node] for node in stacked.node_ids]
        omega = self.participation.observe(server_round, indices)
        weights = torch.tensor([omega[i] for i in indices], dtype=torch.float64)
        # a node that replied and then left the grid still counts among the N nodes
        return fedau_aggregate(stacked.updates, weights, num_clients=max(self.num_nodes, len(indices)))

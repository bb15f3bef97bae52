"""FedLEx as a Flower strategy: an exploration phase builds a guidance matrix that masks the
clients' gradients afterwards."""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import sample_nodes
from flwr.supercore import log

from fedsim.config import FedLExConfig, ServerOptConfig
from fedsim.flower.base import ScreenedFedAvg, StackedUpdates, check_settings
from fedsim.strategies.aggregate import weighted_mean
from fedsim.strategies.fedlex import guidance_matrix
from fedsim.strategies.server_opt import ServerOptimizer

__all__ = ["GUIDANCE_KEY", "FedLEx"]

GUIDANCE_KEY = "guidance"
"""The ArrayRecord of a training message that carries the guidance matrix."""


class FedLEx(ScreenedFedAvg):
    """FedLEx: scouts explore, their drift becomes a guidance matrix that masks every
    client's gradients; the server applies FedAvg with momentum.

    FedLEx as specified in fedsim's ALGORITHMS.md (:mod:`fedsim.strategies.fedlex`). Rounds
    ``1 .. explore_rounds``: only ``scouts`` nodes, drawn once at random from the connected
    ones (Python's ``random``, as Flower's own sampling), train. At the end of round
    ``explore_rounds`` the server computes, per array, the min-max normalised mean squared
    drift of those scouts' models from the round's global model
    (:func:`fedsim.strategies.fedlex.guidance_matrix`). From then on the nodes are sampled as
    by FedAvg and every training message carries the guidance as the ArrayRecord
    ``"guidance"`` (one entry per floating-point array, keyed like the model's arrays); the
    ClientApp multiplies its gradients by it between ``loss.backward()`` and
    ``optimizer.step()``::

        if "guidance" in msg.content:
            apply_guidance(model, msg.content["guidance"].to_torch_state_dict())

    (``fedsim.flower.apply_guidance``; the model's arrays must be sent as its
    ``state_dict``, so that the names match its parameters). Every round's weighted mean
    of the updates is applied with server momentum (FedAvgM):
    ``m <- server_momentum * m + delta; w <- w + server_learning_rate * m``.

    Parameters
    ----------
    *args, **kwargs
        The arguments of Flower's ``FedAvg`` (``fraction_train``, ``min_train_nodes``, ...),
        unchanged.
    explore_rounds : int, default 2
        Rounds of the exploration phase.
    scouts : int, default 5
        Number of scout nodes (at most the number connected).
    server_learning_rate : float, default 1.0
        Server learning rate (> 0).
    server_momentum : float, default 0.9
        Server momentum, in ``[0, 1)`` (the paper's 0.9).
    """

    def __init__(self, *args: Any, explore_rounds: int = 2, scouts: int = 5, server_learning_rate: float = 1.0,
                 server_momentum: float = 0.9, **kwargs: Any) -> None:
        check_settings(FedLExConfig, "FedLEx", explore_rounds=explore_rounds, scouts=scouts)
        if not server_learning_rate > 0:
            raise ValueError(f"FedLEx: server_learning_rate must be > 0, got {server_learning_rate!r}")
        if not 0 <= server_momentum < 1:
            raise ValueError(f"FedLEx: server_momentum must be in [0, 1), got {server_momentum!r}")
        super().__init__(*args, **kwargs)
        self.explore_rounds, self.scouts = explore_rounds, scouts
        self.server_learning_rate, self.server_momentum = server_learning_rate, server_momentum
        self.server_opt = ServerOptimizer(ServerOptConfig(name="momentum", lr=server_learning_rate,
                                                          momentum=server_momentum))
        self.scout_ids: list[int] | None = None
        self.guidance: dict[str, torch.Tensor] | None = None

    def summary(self) -> None:
        log(INFO, "\t├──> FedLEx settings: explore_rounds=%d, scouts=%d, server_learning_rate=%s, "
            "server_momentum=%s", self.explore_rounds, self.scouts, self.server_learning_rate, self.server_momentum)
        super().summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        if server_round > self.explore_rounds or self.fraction_train == 0.0:
            messages = list(super().configure_train(server_round, arrays, config, grid))
            if self.guidance is not None:
                guidance = ArrayRecord({name: value.contiguous() for name, value in self.guidance.items()})
                for message in messages:
                    message.content[GUIDANCE_KEY] = guidance
            return messages
        self._global = arrays
        if self.scout_ids is None:
            connected = len(list(grid.get_node_ids()))
            count = min(self.scouts, max(connected, self.min_available_nodes))
            self.scout_ids = sorted(sample_nodes(grid, self.min_available_nodes, count)[0])
        log(INFO, "configure_train: exploration round %d of %d, %d scouts", server_round, self.explore_rounds,
            len(self.scout_ids))
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._construct_messages(record, self.scout_ids, MessageType.TRAIN)

    def aggregate_updates(self, server_round: int, stacked: StackedUpdates) -> torch.Tensor:
        if server_round == self.explore_rounds:
            spec = stacked.spec
            scouts = [spec.unflatten(stacked.model + update) for update in stacked.updates]
            self.guidance = guidance_matrix(spec.unflatten(stacked.model), scouts)
            log(INFO, "FedLEx: guidance matrix built from %d scouts", len(scouts))
        return weighted_mean(stacked.updates, stacked.weights)

    def apply_update(self, model: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        return self.server_opt.step(model, update)

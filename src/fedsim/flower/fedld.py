"""FedLD as a Flower strategy, and the regulariser its ClientApp adds to the loss."""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.supercore import log

from fedsim.config import FedLDConfig
from fedsim.flower.base import ScreenedFedAvg, StackedUpdates, check_settings
from fedsim.strategies.fedld import fedld_aggregate

__all__ = ["BETA_KEY", "FedLD"]

BETA_KEY = "fedld-beta"
"""The training ConfigRecord entry that carries ``beta`` to the clients."""


class FedLD(ScreenedFedAvg):
    """FedLD: per-layer principal directions of the updates, majority-sign aligned,
    norm-preserving; clients add a margin regulariser to their loss.

    S. Zeng, P. Guo, S. Wang, J. Wang, Y. Zhou, L. Qu, "Tackling Data Heterogeneity in
    Federated Learning via Loss Decomposition", MICCAI 2024. Server, per layer: keep the top
    ``ceil(keep * rank)`` right singular directions of the stacked updates, rebuild each
    update from them, rescale it to its own norm, and take the ``weighted_by_key``-weighted
    mean (:func:`fedsim.strategies.fedld.fedld_aggregate`).

    Client: every training message's config carries ``"fedld-beta"``; the ClientApp adds
    ``fedsim.flower.fedld_regulariser(logits, beta)``, ``beta * log(1 + ||softmax(logits)||_F^2)``
    over the batch, to its loss::

        beta = msg.content["config"]["fedld-beta"]
        loss = F.cross_entropy(logits, y) + fedld_regulariser(logits, beta)

    Parameters
    ----------
    *args, **kwargs
        The arguments of Flower's ``FedAvg`` (``fraction_train``, ``min_train_nodes``, ...),
        unchanged.
    keep : float, default 0.8
        Fraction of each layer's numerical rank kept, in ``(0, 1]``.
    beta : float, default 0.03
        Weight of the clients' regulariser, sent to them as ``"fedld-beta"``.
    """

    def __init__(self, *args: Any, keep: float = 0.8, beta: float = 0.03, **kwargs: Any) -> None:
        check_settings(FedLDConfig, "FedLD", keep=keep, beta=beta)
        super().__init__(*args, **kwargs)
        self.keep, self.beta = keep, beta

    def summary(self) -> None:
        log(INFO, "\t├──> FedLD settings: keep=%s, beta=%s (sent as %r)", self.keep, self.beta, BETA_KEY)
        super().summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        config[BETA_KEY] = self.beta
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_updates(self, server_round: int, stacked: StackedUpdates) -> torch.Tensor:
        layers = stacked.spec.split_layers(stacked.updates)
        return stacked.spec.join_layers(fedld_aggregate(layers, stacked.weights, keep=self.keep))

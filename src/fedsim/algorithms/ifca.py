"""IFCA: clustered federated learning with K models and cluster identities the clients estimate.

Reference
---------
A. Ghosh, J. Chung, D. Yin, K. Ramchandran, "An Efficient Framework for Clustered Federated
Learning", NeurIPS 2020, arXiv 2006.04088, Algorithm 2 (model averaging).

The server keeps ``K`` models ``theta_1 .. theta_K`` and sends all of them. Each sampled client
``i`` estimates its cluster identity as the model of lowest loss on its own data::

    j_i = argmin_j F_i(theta_j)                   (ifca_choice; ties: the lowest j)

trains ``theta_{j_i}`` as FedAvg's clients train, and replies with its update and ``j_i``. The
server averages each cluster's updates, weighted by examples (FedAvg within the cluster)::

    theta_j <- theta_j + lr * sum_{i: j_i = j} n_i Delta_i / sum_{i: j_i = j} n_i   (ifca_average)

A cluster nobody chose stays as it is. ``F_i`` is the mean cross-entropy on the client's train
split in eval mode. ``theta_1`` is the run's initial model; ``theta_j`` (j > 1) is the initial
model with the entries of each tensor shuffled under a seed of the run: a fresh draw of the
same i.i.d. initialisation (the paper initialises the K models at random).

In fedsim the global model (its ``arrays``, centralised evaluation and ``client_accuracy_*``)
is ``theta_1``; every client's own score is its cluster's model, ``personal_accuracy_*`` (the
client picks, as in training, the model of lowest loss on its train split). Rows report how
many clients chose each cluster (``cluster_sizes``). The other models travel as the ArrayRecord
``"ifca-clusters"`` (one ``(K - 1, D)`` float32 array ``"models"``), counted on the downlink;
a reply carries its choice as the metric ``"cluster"`` (a reply without one in ``0..K-1`` is
dropped). The server's step is ``server_opt`` sgd with its ``lr``.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Iterator
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from pydantic import Field

from fedsim.algorithms.api import SyncStrategyBase
from fedsim.clients.features import ClientContext, ClientFeature
from fedsim.seeding import derive_seed
from fedsim.strategies.aggregate import weighted_mean
from fedsim.strategies.base import FedsimStrategy
from fedsim.strategies.replies import ClientUpdate, Failure

if TYPE_CHECKING:
    from fedsim.config import ExperimentConfig
    from fedsim.params import ParamSpec

__all__ = ["CLUSTERS_RECORD", "Ifca", "IfcaConfig", "ifca_average", "ifca_choice", "shuffled_init"]

CLUSTERS_RECORD = "ifca-clusters"
"""The training and evaluation messages' record of the cluster models beyond the first."""


class IfcaConfig(SyncStrategyBase):
    """IFCA (Ghosh et al. 2020): K cluster models, each client trains the one of lowest loss."""

    name: Literal["ifca"] = "ifca"
    clusters: int = Field(2, ge=1, description="K, the number of cluster models")


def ifca_choice(losses: Iterable[float]) -> int:
    """The cluster of lowest loss (the first of equal ones)."""
    losses = list(losses)
    return min(range(len(losses)), key=losses.__getitem__)


def ifca_average(models: torch.Tensor, updates: torch.Tensor, weights: torch.Tensor, clusters: torch.Tensor,
                 lr: float = 1.0) -> torch.Tensor:
    """The new cluster models: each one moved by ``lr`` times the example-weighted mean of the
    updates of its clients (see the module docstring).

    Parameters
    ----------
    models : torch.Tensor
        ``(K, D)``, the cluster models.
    updates : torch.Tensor
        ``(n, D)``, the clients' updates from the model they chose.
    weights : torch.Tensor
        ``(n,)``, their examples.
    clusters : torch.Tensor
        ``(n,)`` integers, their chosen clusters.
    lr : float
        The server's step size.
    """
    new = models.clone()
    for j in clusters.unique().tolist():
        members = clusters == j
        new[j] = models[j] + lr * weighted_mean(updates[members], weights[members]).to(models.dtype)
    return new


def shuffled_init(initial: torch.Tensor, spec: ParamSpec, generator: torch.Generator) -> torch.Tensor:
    """``initial`` with the entries of each tensor of ``spec`` permuted at random."""
    parts = torch.split(initial, spec.sizes)
    return torch.cat([part[torch.randperm(len(part), generator=generator)] for part in parts])


def _encode(models: torch.Tensor) -> ArrayRecord:
    return ArrayRecord({"models": Array(np.ascontiguousarray(models.numpy().astype(np.float32)))})


def _cluster_models(ctx: ClientContext, start: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """The K cluster models of a message as full state dicts (the first is its arrays)."""
    rows = torch.from_numpy(ctx.content[CLUSTERS_RECORD]["models"].numpy())
    return [start, *({**start, **ctx.spec.unflatten(row)} for row in rows)]


class IfcaClient(ClientFeature):
    """IFCA's client half: trains (and is evaluated with) the cluster model of lowest loss on
    its train split, and names its choice in the reply."""

    def key(self, ctx: ClientContext) -> Hashable:
        return None

    def start(self, ctx: ClientContext, start: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        models = _cluster_models(ctx, start)
        choice = ifca_choice(ctx.train_loss(model) for model in models)
        ctx.scratch["ifca"] = choice
        return models[choice]

    def finish(self, ctx: ClientContext, update: torch.Tensor, steps: int) -> dict[str, MetricRecord]:
        return {"ifca": MetricRecord({"cluster": ctx.scratch["ifca"]})}

    def personal_model(self, ctx: ClientContext, global_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        models = _cluster_models(ctx, global_state)
        return models[ifca_choice(ctx.train_loss(model) for model in models)]


class Ifca(FedsimStrategy):
    """IFCA (see the module docstring).

    Parameters
    ----------
    *args, **kwargs
        Flower FedAvg's arguments, ``min_successful`` and ``server_opt`` (sgd).
    clusters : int, default 2
        K, the number of cluster models. In a Flower app the ClientApp picks the model of
        lowest loss among its arrays and the rows of ``"ifca-clusters"`` and replies with the
        metric ``"cluster"``.
    """

    name = "ifca"
    Config = IfcaConfig
    description = "IFCA (Ghosh et al. 2020): K cluster models, each client trains the one of lowest loss on its data"
    client = IfcaClient()
    reads_round_replies = "averages each cluster's replies of the round"

    @classmethod
    def rules(cls, cfg: ExperimentConfig) -> Iterator[str | None]:
        if cfg.strategy.server_opt.name != "sgd":
            yield (f"strategy.server_opt.name: {cfg.strategy.server_opt.name!r} keeps one state for one model; "
                   f"strategy.name 'ifca' steps its {cfg.strategy.clusters} cluster models with sgd")
        if cfg.personalization.method != "none":
            yield (f"personalization.method: {cfg.personalization.method!r} cannot combine with strategy.name 'ifca', "
                   "whose clients are evaluated with their cluster's model")
        if cfg.quant.downlink.codec != "identity":
            yield (f"quant.downlink.codec: {cfg.quant.downlink.codec!r} compresses one model; strategy.name 'ifca' "
                   "sends its cluster models in float32")
        if cfg.hierarchy is not None:
            yield ("hierarchy: the cloud averages one model per gateway; strategy.name 'ifca' keeps "
                   f"{cfg.strategy.clusters} cluster models at each")

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.models: torch.Tensor | None = None

    def _clusters_record(self) -> ArrayRecord:
        if self.models is None:  # round 1: theta_1 is the initial model, the others shuffled draws of it
            generator = torch.Generator().manual_seed(derive_seed(self.seed, "ifca"))
            self.models = torch.stack([self._global, *(shuffled_init(self._global, self.spec, generator)
                                                       for _ in range(self.cfg.clusters - 1))])
        return _encode(self.models[1:])

    def extra_content(self, server_round: int) -> dict[str, ArrayRecord]:
        return {CLUSTERS_RECORD: self._clusters_record()}

    def prepare_messages(self, server_round: int, messages: list[Message], clients: list[int]) -> None:
        self.report.bytes_down += len(messages) * (self.cfg.clusters - 1) * self.spec.dim * 4

    def screen(self, replies: list[Message]) -> tuple[list[ClientUpdate], list[Failure]]:
        """Replies need the metric ``cluster`` in ``0..K-1``."""
        accepted, failures = super().screen(replies)
        kept = []
        for update in accepted:
            cluster = update.metrics.get("cluster")
            if cluster is None or cluster != int(cluster) or not 0 <= cluster < self.cfg.clusters:
                failures.append(Failure(update.partition_id, f"ifca: the reply names no cluster in "
                                                             f"0..{self.cfg.clusters - 1} ({cluster})"))
            else:
                kept.append(update)
        return kept, sorted(failures, key=lambda f: f.partition_id)

    def observe(self, server_round: int, accepted: list[ClientUpdate]) -> None:
        chosen = [int(u.metrics["cluster"]) for u in accepted]
        self.report.row = {"cluster_sizes": [chosen.count(j) for j in range(self.cfg.clusters)]}

    def aggregate_updates(self, server_round: int, updates: list[ClientUpdate]) -> torch.Tensor:
        """Every cluster's average; the returned update moves ``theta_1``, the global model."""
        clusters = torch.tensor([int(u.metrics["cluster"]) for u in updates])
        lr = self.cfg.server_opt.lr
        new = ifca_average(self.models, torch.stack([u.update for u in updates]),
                           torch.tensor([u.num_examples for u in updates], dtype=torch.float64), clusters, lr)
        self.models[1:] = new[1:]
        return ((new[0] - self.models[0]) / lr).to(self._global.dtype)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super().aggregate_train(server_round, replies)
        self.models[0] = self._global.to(self.models.dtype)
        return arrays, metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        if messages:
            record = _encode(self.models[1:])
            for message in messages:
                message.content[CLUSTERS_RECORD] = record
        return messages

    def state_dict(self) -> dict:
        return {**super().state_dict(), "ifca_models": self.models}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.models = state["ifca_models"]

"""FedKA, federated knowledge alignment for domain generalization: Sun, Chong & Ochiai,
"Feature Distribution Matching for Federated Domain Generalization" (ACML 2022, arXiv
2203.11635), as ``strategy.name: fedka`` on ``partition.scheme: domains`` (each client holds
part of a source domain; the server holds the target domain's unlabelled inputs).

Each round ``t`` with global model ``w``:

1. **global workspace** (``matching``): the server computes ``Z = f_w(X_ws)``, the global
   model's features (the output of its feature extractor, before the classifier head) of
   ``workspace_size`` target inputs, and sends it with the model;
2. **feature distribution matching**: client ``i`` minimises
   ``CE(w_i; D_i) + mmd_weight * MK-MMD^2(f_{w_i}(x_batch), Z)`` (:func:`fedsim.fedka.mmd.mk_mmd`
   with ``kernel_scales``), pulling its source features towards the global workspace;
3. the server averages the updates (FedAvg, example-weighted): ``w' = w + sum_i p_i Delta_i``;
4. **federated voting** (``voting``, from round ``vote_from``): every client model ``w + Delta_i`` labels the target
   inputs; the labels at least ``vote_threshold`` of the clients agree on
   (:func:`fedsim.fedka.voting.federated_vote`) fine-tune ``w'`` for ``finetune_steps`` SGD steps
   (``finetune_lr``, batches of ``finetune_batch`` drawn from (seed, round)); the update
   sent to the server optimizer is ``w'' - w``.

``f`` is the feature extractor, as in the paper: the model's representation before its
classifier head, ``model.features(x)`` (the client hook reads the batch's embeddings, see
:attr:`fedsim.clients.hooks.ClientHook.reads_embeddings`). Where the paper leaves a detail open,
fedsim chooses: the workspace is a fixed seeded subset of the target inputs; voting uses the client models the round's replies
already carry (no extra message). ``matching: false`` and ``voting: false`` are the ablations;
both false is FedAvg.

FedKA needs the target domain, so it runs in fedsim's engine (not as a plain Flower app's
strategy, whose server holds no data).
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Iterator
from typing import Literal

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from pydantic import Field, model_validator
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from fedsim.algorithms.api import SyncStrategyBase
from fedsim.clients.features import ClientContext, ClientFeature
from fedsim.clients.hooks import ClientHook
from fedsim.config import ExperimentConfig
from fedsim.fedka.mmd import DEFAULT_SCALES, mk_mmd
from fedsim.fedka.voting import federated_vote
from fedsim.params import ParamSpec
from fedsim.seeding import derive_seed
from fedsim.sim.components import federated_data, make_model
from fedsim.strategies.base import FedsimStrategy
from fedsim.strategies.replies import ClientUpdate

log = logging.getLogger(__name__)

__all__ = ["FedKA", "FedKAConfig", "FeatureMatching", "WorkspaceMatching"]

WORKSPACE = "fedka-workspace"
"""The ArrayRecord of a training message that carries the global workspace ``Z``."""


class _FeatureExtractor(nn.Module):
    """``model.features`` as a module's forward, for ``functional_call``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.features(x)


class FedKAConfig(SyncStrategyBase):
    """FedKA (Sun et al., arXiv 2203.11635); see :mod:`fedsim.fedka.algorithm`.

    Parameters
    ----------
    matching : bool, default True
        Clients add ``mmd_weight * MK-MMD^2`` against the global workspace.
    mmd_weight : float, default 1.0
    kernel_scales : list of float, default [0.25, 0.5, 1, 2, 4]
        Bandwidths of the Gaussian kernels, in units of the mean squared pairwise distance.
    workspace_size : int, default 128
        Target inputs whose global features (before the classifier head) form the workspace.
    voting : bool, default True
        The server fine-tunes on the target pseudo-labels the clients vote for.
    vote_threshold : float, default 1.0
        Fraction of the clients that must agree on a sample's label (fedsim's default,
        unanimity: on the digits a bare majority of single-domain models, biased towards a
        few classes, drove the fine-tuned model into one class within rounds).
    finetune_steps, finetune_lr, finetune_batch : int, float, int, default 10, 0.05, 32
    vote_from : int, default 5
        The first round that votes: before it the clients' models label the target about at random.
    """

    name: Literal["fedka"] = "fedka"
    matching: bool = True
    mmd_weight: float = Field(1.0, gt=0, description="matching: weight of the MK-MMD term")
    kernel_scales: list[float] = Field(default_factory=lambda: list(DEFAULT_SCALES), min_length=1,
                                       description="matching: kernel bandwidths / mean squared distance")
    workspace_size: int = Field(128, ge=2, description="matching: target inputs of the global workspace")
    voting: bool = True
    vote_threshold: float = Field(1.0, gt=0, le=1, description="voting: fraction of clients that must agree")
    finetune_steps: int = Field(10, ge=1, description="voting: server SGD steps on the pseudo-labels")
    finetune_lr: float = Field(0.05, gt=0, description="voting: their learning rate")
    finetune_batch: int = Field(32, ge=1, description="voting: their batch size")
    vote_from: int = Field(5, ge=1, description="voting: the first round that votes (earlier models guess)")

    @model_validator(mode="after")
    def _switched_off_reads_nothing(self) -> FedKAConfig:
        fields = type(self).model_fields
        for switch, keys in (("matching", ("mmd_weight", "kernel_scales", "workspace_size")),
                             ("voting", ("vote_threshold", "finetune_steps", "finetune_lr", "finetune_batch", "vote_from"))):
            if not getattr(self, switch):
                for key in keys:
                    if getattr(self, key) != fields[key].get_default(call_default_factory=True):
                        raise ValueError(f"{key}: {getattr(self, key)!r} is not read with {switch} false; "
                                         "leave it unset")
        if any(s <= 0 for s in self.kernel_scales):
            raise ValueError(f"kernel_scales: {self.kernel_scales}; bandwidths are positive")
        return self


class WorkspaceMatching(ClientHook):
    """``mmd_weight * MK-MMD^2(f(x_batch), Z)``: the batch's features (the model's embeddings,
    before its head) against the global workspace ``Z``."""

    reads_embeddings = True

    def __init__(self, workspace: torch.Tensor, weight: float, scales: list[float]) -> None:
        self.workspace, self.weight, self.scales = workspace, weight, scales

    def extra_loss(self, model: nn.Module, logits: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor | None:
        return self.weight * mk_mmd(embeddings, self.workspace.to(embeddings.dtype), self.scales)

    def stacked_extra_loss(self, params: dict[str, torch.Tensor], logits: torch.Tensor,
                           mask: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor | None:
        z = self.workspace.to(embeddings.dtype)
        return torch.stack([self.weight * mk_mmd(rows[keep.bool()], z, self.scales)
                            for rows, keep in zip(embeddings, mask, strict=True)])


class FeatureMatching(ClientFeature):
    """FedKA's client half: the MK-MMD term against the workspace the round's message carries."""

    def key(self, ctx: ClientContext) -> Hashable:
        return ctx.server_round  # one workspace per round

    def hooks(self, ctx: ClientContext, start: dict[str, torch.Tensor]) -> tuple[ClientHook, ...]:
        st = ctx.cfg.strategy
        if not st.matching:
            return ()
        z = torch.from_numpy(np.array(ctx.content[WORKSPACE]["z"].numpy()))
        return (WorkspaceMatching(z, st.mmd_weight, st.kernel_scales),)


class FedKA(FedsimStrategy):
    """FedKA: FedAvg with client-side MK-MMD matching to a global workspace and server-side
    fine-tuning on voted target pseudo-labels (see :mod:`fedsim.fedka.algorithm`).

    Parameters
    ----------
    *args, **kwargs
        Flower FedAvg's arguments, ``min_successful``, ``server_opt`` and the keys of
        :class:`FedKAConfig`.
    """

    name = "fedka"
    Config = FedKAConfig
    description = "FedKA (Sun et al. 2022): MK-MMD matching to a global workspace + federated voting on a target domain"
    client = FeatureMatching()
    requires = {"partition": {"scheme": "domains", "domains": ["identity", "rotate"], "target_domain": "rotate"}}

    @classmethod
    def rules(cls, cfg: ExperimentConfig) -> Iterator[str | None]:
        if cfg.partition.scheme != "domains":
            yield (f"partition.scheme: {cfg.partition.scheme!r}; strategy.name 'fedka' needs a held-out target "
                   "domain (partition.scheme: domains)")

    @classmethod
    def from_experiment(cls, exp: ExperimentConfig, spec: ParamSpec, node_of: dict[int, int], sampler) -> FedKA:
        strategy = super().from_experiment(exp, spec, node_of, sampler)
        data = federated_data(exp)
        target = data.unlabelled[0]
        strategy.target_x = torch.from_numpy(data.train.x[target])
        strategy.num_classes = data.train.num_classes
        strategy.net = make_model(exp.model, data.train, exp.seed)
        order = np.random.default_rng(derive_seed(exp.seed, "fedka-workspace")).permutation(len(target))
        strategy.workspace_x = strategy.target_x[np.sort(order[: exp.strategy.workspace_size])]
        return strategy

    def _outputs(self, vector: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        params = {name: value.to(torch.float32) for name, value in self.spec.unflatten(vector).items()}
        return functional_call(self.net, params, (x,))

    def _features(self, vector: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The features (before the classifier head) of the model at the flat ``vector``."""
        params = {f"model.{name}": value.to(torch.float32) for name, value in self.spec.unflatten(vector).items()}
        return functional_call(_FeatureExtractor(self.net), params, (x,))

    def extra_content(self, server_round: int) -> dict[str, ArrayRecord]:
        if not self.cfg.matching:
            return {}
        self._require_engine()
        self.net.eval()
        with torch.no_grad():
            z = self._features(self._global, self.workspace_x)
        return {WORKSPACE: ArrayRecord({"z": Array(z.numpy())})}

    def aggregate_updates(self, server_round: int, updates: list[ClientUpdate]) -> torch.Tensor | None:
        mean = super().aggregate_updates(server_round, updates)
        if not self.cfg.voting or server_round < self.cfg.vote_from:
            return mean
        self._require_engine()
        self.net.eval()
        with torch.no_grad():
            votes = torch.stack([self._outputs(self._global + u.update.to(self._global.dtype), self.target_x)
                                 .argmax(dim=1) for u in updates])
        labels, agreed = federated_vote(votes, self.num_classes, self.cfg.vote_threshold)
        log.debug("round %d: %d of %d target inputs voted", server_round, int(agreed.sum()), len(agreed))
        start = self._global + mean.to(self._global.dtype)
        if not agreed.any():
            return mean
        tuned = self._finetune(start, self.target_x[agreed], labels[agreed], server_round)
        return tuned - self._global

    def _finetune(self, start: torch.Tensor, x: torch.Tensor, y: torch.Tensor, server_round: int) -> torch.Tensor:
        """``finetune_steps`` SGD steps on ``(x, y)`` from the flat ``start``; batches drawn from (seed, round)."""
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "fedka-finetune", server_round))
        vector = start.clone().requires_grad_(True)
        self.net.train()
        for _ in range(self.cfg.finetune_steps):
            batch = torch.randint(len(y), (min(self.cfg.finetune_batch, len(y)),), generator=generator)
            loss = F.cross_entropy(self._outputs(vector, x[batch]), y[batch])
            (grad,) = torch.autograd.grad(loss, vector)
            vector = (vector - self.cfg.finetune_lr * grad * self._parameters.to(grad.dtype)).detach().requires_grad_(True)
        return vector.detach()

    def _require_engine(self) -> None:
        if self.engine is None:
            raise RuntimeError("FedKA needs the target domain's inputs: run it in fedsim's engine "
                               "(partition.scheme: domains), not as a plain Flower app's strategy")

"""The client half of differential privacy, as a client feature (entry-point group
``fedsim.client_features``), and what cannot combine with it (``fedsim validate``).

- ``local``: each client clips its update to ``clip_norm`` and adds N(0, (z C)^2 I) before
  it leaves (:meth:`PrivacyFeature.sent_update`);
- ``sample``: DP-SGD in the stacked engine (:class:`fedsim.privacy.dp_sgd.DPSGDStep`);
- ``central``: nothing on the client; the server clips and noises
  (:mod:`fedsim.privacy.server`), in each algorithm's own form
  (:meth:`fedsim.strategies.base.FedsimStrategy.private_aggregate`: DP-FedAvg's mean,
  SCAFFOLD's joint model and control sums, FedNova's normalised updates, FedAU's weights).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch

from fedsim.algorithms import registry
from fedsim.clients.batched import MAX_STACKED_VALUES
from fedsim.clients.features import ClientContext, ClientFeature
from fedsim.clients.hooks import ClientHook
from fedsim.config_checks import model_layers
from fedsim.privacy.dp_sgd import DPSGDStep
from fedsim.privacy.mechanisms import clip_rows
from fedsim.privacy.noise import gaussian_noise
from fedsim.privacy.sampling import client_sampling
from fedsim.privacy.server import NOISE_KEY

if TYPE_CHECKING:
    from fedsim.config import ExperimentConfig

__all__ = ["PrivacyFeature"]


class PrivacyFeature(ClientFeature):
    """``privacy.mechanism`` local or sample on the clients; the rules of every mechanism."""

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.settings, self.seed, self.batch_size = cfg.privacy, cfg.seed, cfg.client.batch_size
        self.stacked_only = self.settings.mechanism == "sample"

    @staticmethod
    def applies(cfg: ExperimentConfig) -> bool:
        return cfg.privacy.mechanism != "none"

    @classmethod
    def rules(cls, cfg: ExperimentConfig) -> Iterator[str | None]:
        mechanism = cfg.privacy.mechanism
        if cfg.strategy.family == "async" and mechanism == "central":
            yield from _buffered_rules(cfg)
            return
        if cfg.strategy.family != "sync":
            yield (f"privacy.mechanism: {mechanism} is accounted round by round by the synchronous loop; "
                   f"strategy.name {cfg.strategy.name!r} is {cfg.strategy.family}")
            return
        if cfg.hierarchy is not None:
            yield (f"privacy.mechanism: {mechanism} is accounted round by round by the synchronous loop; hierarchy "
                   "runs its own two-tier loop, which does not account it")
            return
        yield from {"central": _central_rules, "local": _local_rules, "sample": _sample_rules}[mechanism](cfg)

    # ------------------------------------------------------------------- local
    def sent_update(self, ctx: ClientContext, update: torch.Tensor) -> torch.Tensor:
        if self.settings.mechanism != "local":
            return update
        clipped, _ = clip_rows(update[None].double(), self.settings.clip_norm)
        std = float(ctx.config[NOISE_KEY]) * self.settings.clip_norm
        noise = gaussian_noise(update.numel(), std, "privacy", self.seed, "local", ctx.server_round, ctx.partition_id)
        return (clipped[0] + noise).to(update.dtype)

    # ------------------------------------------------------------------ sample
    def hooks(self, ctx: ClientContext, start: dict[str, torch.Tensor]) -> tuple[ClientHook, ...]:
        return self.stacked_hooks([ctx], start)

    def stacked_hooks(self, ctxs: Sequence[ClientContext], start: dict[str, torch.Tensor]) -> tuple[ClientHook, ...]:
        if self.settings.mechanism != "sample":
            return ()
        noise_multiplier = float(ctxs[0].config[NOISE_KEY])
        keys = [("privacy", self.seed, "dp-sgd", ctx.server_round, ctx.partition_id) for ctx in ctxs]
        return (DPSGDStep(self.settings.clip_norm, noise_multiplier, self.batch_size, keys, MAX_STACKED_VALUES),)


def _central_rules(cfg: ExperimentConfig) -> Iterator[str | None]:
    from fedsim.strategies.base import FedsimStrategy

    name, algorithm = cfg.strategy.name, registry.get(cfg.strategy.name)
    if not algorithm.privatises_aggregate():
        if algorithm.defined_by("aggregate_updates") is not FedsimStrategy:
            yield (f"privacy.mechanism: central noises a weighted sum of clipped updates (sensitivity clip_norm "
                   f"times the largest weight); strategy.name {name!r} aggregates its own way, whose sensitivity "
                   "that noise does not bound (a median, trimmed mean or selected update moves by up to 2 clip_norm "
                   "whatever the cohort)")
        elif algorithm.defined_by("observe") is not FedsimStrategy:
            yield (f"privacy.mechanism: central releases only the noisy aggregate; strategy.name {name!r} reads each "
                   "raw update on the server (observe)")
        else:
            yield (f"privacy.mechanism: central noises the updates only; strategy.name {name!r} sends more from "
                   "each client (its client records), which would leave unclipped and un-noised")
        return
    if cfg.secagg.enabled and algorithm.defined_by("private_aggregate") is not FedsimStrategy:
        yield (f"secagg.enabled: with privacy.mechanism central the clients add shares of DP-FedAvg's noise to "
               f"updates weighted 1/m; strategy.name {name!r} noises its own weighted sum "
               "(private_aggregate), which distributed DP does not split over the clients")
    feedback = cfg.quant.uplink.error_feedback
    if feedback in ("ef21", "econtrol"):
        yield (f"quant.uplink.error_feedback: {feedback} aggregates every client's stale estimate; privacy.mechanism "
               "central noises the round's clipped updates (use none or ef)")
    sampling = client_sampling(cfg)
    if sampling.kind == "fixed" and cfg.privacy.accountant != "rdp":
        yield (f"privacy.accountant: {cfg.privacy.accountant} covers Poisson sampling; participation.model uniform "
               f"samples {sampling.sample_size} of {sampling.population} clients without replacement, which rdp "
               "accounts (use privacy.accountant rdp, or participation.model bernoulli with p_low = p_high)")


def _buffered_rules(cfg: ExperimentConfig) -> Iterator[str | None]:
    """Central DP in the asynchronous loop: per buffer (:mod:`fedsim.privacy.buffered`)."""
    name, settings = cfg.strategy.name, cfg.privacy
    if not registry.get(name).central_privacy:
        buffered = ", ".join(n for n in registry.names() if getattr(registry.get(n), "central_privacy", False))
        yield (f"privacy.mechanism: central noises a fixed-size buffer's mean of clipped updates (sensitivity "
               f"clip_norm / K); strategy.name {name!r} applies its updates otherwise, which that noise does not "
               f"bound (central works asynchronously with: {buffered})")
        return
    if settings.clipping == "adaptive":
        yield (f"privacy.clipping: adaptive tracks a noisy count per synchronous round; strategy.name {name!r} "
               "releases buffers, whose count it does not account (use clipping fixed)")
    if settings.target_epsilon is not None:
        yield (f"privacy.target_epsilon: calibration needs the run's releases before it starts; strategy.name "
               f"{name!r} charges a client for each buffer it lands in, known only as the run goes "
               "(give privacy.noise_multiplier, and privacy.max_epsilon to stop at a budget)")


def _local_rules(cfg: ExperimentConfig) -> Iterator[str | None]:
    name, algorithm = cfg.strategy.name, registry.get(cfg.strategy.name)
    if algorithm.sends_client_records():
        yield (f"privacy.mechanism: local noises the update each client sends; strategy.name {name!r} sends more "
               "from each client (its client records), which would leave unclipped and un-noised")
    if cfg.privacy.accountant != type(cfg.privacy).model_fields["accountant"].default:
        yield (f"privacy.accountant: {cfg.privacy.accountant} is not read with privacy.mechanism local, whose "
               "Gaussian releases compose exactly (analytic Gaussian mechanism); leave it unset")


def _sample_rules(cfg: ExperimentConfig) -> Iterator[str | None]:
    from fedsim.clients.training_features import stacked_reason

    name, algorithm = cfg.strategy.name, registry.get(cfg.strategy.name)
    if cfg.sim.backend != "batched" and cfg.sim.clients_per_node == 1:
        yield (f"privacy.mechanism: sample computes per-sample gradients in the stacked engine; sim.backend "
               f"{cfg.sim.backend!r} trains clients one at a time (use batched, or sim.clients_per_node > 1)")
    norms = [f"{layer} ({kind})" for layer, kind in model_layers(cfg).items() if "BatchNorm" in kind]
    if norms:
        yield (f"privacy.mechanism: sample clips each sample's gradient; model.name {cfg.model.name!r} has "
               f"BatchNorm ({norms[0]}), which mixes the samples of a batch")
    if algorithm.client is not None and type(algorithm.client).hooks is not ClientFeature.hooks:
        yield (f"privacy.mechanism: sample privatises the loss's gradient; strategy.name {name!r} adds client "
               "terms of its own to training, which DP-SGD does not clip")
    if cfg.personalization.method != "none":
        yield (f"personalization.method: {cfg.personalization.method!r} trains personal layers or models beside "
               "the global update; privacy.mechanism sample covers the global update's training only")
    reason = stacked_reason(cfg)
    if reason is not None:
        yield f"privacy.mechanism: sample needs the clients trained stacked; {reason}"

"""The combination contract of an experiment: what cannot combine, and what does not apply.

Each section of :mod:`fedsim.config` checks its own keys. The rules here look across
sections, and :class:`fedsim.config.ExperimentConfig` applies them when it validates: a
configuration they pass runs, so ``fedsim validate`` refuses what ``fedsim run`` would
otherwise stop on, or silently ignore. Each rule returns ``None`` or one line that names
both keys and why they do not go together, e.g. ``quant.uplink.error_feedback: 'ef21'
needs the server estimates of the synchronous strategies; strategy.name is 'fedbuff'``.

An option that does not apply to the chosen strategy family is refused when it differs
from its default, so a resolved ``config.yaml`` (every key written out) validates again.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from fedsim.algorithms import registry

if TYPE_CHECKING:
    from fedsim.config import ExperimentConfig

# Classes of the datasets whose class count is fixed (synthetic: data.synthetic.num_classes)
KNOWN_NUM_CLASSES = {"digits": 10, "mnist": 10, "cifar10": 10}

UPDATE_ATTACKS = ("sign_flip", "scaled", "gaussian", "alie", "ipm")
"""Attacks that replace Byzantine rows of a round's updates on the server (the synchronous
strategies' aggregation step); label_flip acts in the client's training and applies anywhere."""

def combination_problems(cfg: ExperimentConfig) -> list[str]:
    """Every rule's complaint about ``cfg``, one line each (empty: the config can run)."""
    return [problem for rule in RULES for problem in rule(cfg) if problem]


def _family(cfg: ExperimentConfig) -> str:
    return cfg.strategy.family


def _strategy(cfg: ExperimentConfig) -> str:
    return f"strategy.name is {cfg.strategy.name!r}"


def clients_per_round(cfg: ExperimentConfig) -> int:
    """The most replies a synchronous round can have: the uniform sampler's ``k``, a
    cyclic group's size, else every client (Bernoulli and Markov participation)."""
    n, part = cfg.partition.num_clients, cfg.participation
    if part.model == "uniform":
        return max(1, int(cfg.strategy.fraction_train * n))
    if part.model == "cyclic":
        return math.ceil(n / part.num_groups)
    return n


# ---------------------------------------------------------------- family restrictions
def _sync_only(cfg: ExperimentConfig) -> Iterator[str | None]:
    """Options the asynchronous and gossip loops do not implement, or that mean nothing there."""
    if _family(cfg) == "sync":
        return
    why = f"applies to the synchronous strategies; {_strategy(cfg)}"
    uplink, downlink = cfg.quant.uplink, cfg.quant.downlink
    if uplink.error_feedback in ("ef21", "econtrol"):
        yield (f"quant.uplink.error_feedback: {uplink.error_feedback!r} needs the server estimates of the "
               f"synchronous strategies; {_strategy(cfg)} (use none or ef)")
    if downlink.codec != "identity":
        yield f"quant.downlink.codec: a compressed downlink {why}"
    if cfg.attack.name in UPDATE_ATTACKS:
        yield (f"attack.name: {cfg.attack.name!r} replaces updates in the synchronous aggregation step; "
               f"{_strategy(cfg)} (label_flip works here)")
    if cfg.participation != type(cfg.participation)():
        yield f"participation: the participation model {why}; leave the section out"


def _async_options(cfg: ExperimentConfig) -> Iterator[str | None]:
    """The asynchronous loops run on virtual time: ``strategy.horizon`` and ``strategy.eval_every``."""
    if _family(cfg) != "async":
        return
    if cfg.rounds != type(cfg).model_fields["rounds"].default:
        yield (f"rounds: the asynchronous strategies run for strategy.horizon of virtual time, not rounds; "
               f"{_strategy(cfg)}")
    if cfg.eval.every != type(cfg.eval).model_fields["every"].default:
        yield (f"eval.every: the asynchronous strategies evaluate every strategy.eval_every of virtual time; "
               f"{_strategy(cfg)}")
    if cfg.quant.qat is not None and cfg.quant.qat.start_fraction > 0:
        yield (f"quant.qat.start_fraction: a fraction of the rounds; {_strategy(cfg)} has no rounds "
               f"(QAT is on from the start)")
    if cfg.faults.rounds is not None:
        yield f"faults.rounds: {_strategy(cfg)} has no rounds; leave it out to apply the faults throughout"


def _async_only(cfg: ExperimentConfig) -> Iterator[str | None]:
    """The clock and the concurrency of the asynchronous loops."""
    if _family(cfg) == "async":
        return
    if cfg.sim.clock != "virtual":
        yield f"sim.clock: the asynchronous strategies' clock; {_strategy(cfg)} runs in rounds"
    if cfg.sim.concurrency is not None:
        yield f"sim.concurrency: clients training at once in the asynchronous strategies; {_strategy(cfg)}"


# ------------------------------------------------------------- synchronous strategies
def _participation(cfg: ExperimentConfig) -> Iterator[str | None]:
    if _family(cfg) != "sync":
        return
    part, n = cfg.participation, cfg.partition.num_clients
    if part.model != "uniform" and cfg.strategy.fraction_train != 1.0:
        yield (f"strategy.fraction_train: samples clients under uniform participation; participation.model is "
               f"{part.model!r}, which chooses them itself")
    if part.model == "cyclic" and part.num_groups > n:
        yield f"participation.num_groups: {part.num_groups} groups of {n} clients (partition.num_clients); at most {n}"
    if cfg.strategy.min_successful > (k := clients_per_round(cfg)):
        yield (f"strategy.min_successful: {cfg.strategy.min_successful} replies needed, but a round asks at most {k} "
               f"clients (partition.num_clients, participation); every round would be skipped")


def _algorithm(cfg: ExperimentConfig) -> Iterator[str | None]:
    """What the chosen algorithm declares: the client steps its math reads, whether it
    reads the round's own replies, and its own rules."""
    algorithm = registry.get(cfg.strategy.name)
    if algorithm.sgd_steps and cfg.client.optimizer != "sgd":
        yield (f"strategy.name: {algorithm.name} assumes SGD client steps ({algorithm.sgd_steps}); "
               f"client.optimizer: {cfg.client.optimizer} cannot combine with it; use sgd")
    feedback = cfg.quant.uplink.error_feedback
    if algorithm.reads_round_replies and feedback in ("ef21", "econtrol"):
        yield (f"strategy.name: {algorithm.name} {algorithm.reads_round_replies}; quant.uplink.error_feedback: "
               f"{feedback} aggregates every client's stale estimate (EF21-PP) instead; use none or ef")
    yield from algorithm.rules(cfg)


# ------------------------------------------------------------------------- the rest
def _model(cfg: ExperimentConfig) -> Iterator[str | None]:
    if cfg.model.name != "mlp" and cfg.model.hidden != type(cfg.model)().hidden:
        yield f"model.hidden: the hidden widths of the MLP; model.name is {cfg.model.name!r}"


def _faults(cfg: ExperimentConfig) -> Iterator[str | None]:
    n = cfg.partition.num_clients
    for key in ("crash", "slow", "nan", "wrong_shape"):
        bad = [i for i in getattr(cfg.faults, key) if not 0 <= i < n]
        if bad:
            yield f"faults.{key}: no client {bad[0]}; partition ids are 0..{n - 1} (partition.num_clients is {n})"
    if cfg.faults.rounds is not None and _family(cfg) != "async":
        bad = [r for r in cfg.faults.rounds if not 1 <= r <= cfg.rounds]
        if bad:
            yield f"faults.rounds: no round {bad[0]}; rounds are 1..{cfg.rounds} (rounds)"


def _attack(cfg: ExperimentConfig) -> Iterator[str | None]:
    attack = cfg.attack
    if attack.name != "none" and attack.fraction == 0:
        yield f"attack.fraction: 0 leaves attack.name {attack.name!r} without a Byzantine client; set a fraction"
    if attack.name == "none" and attack.fraction > 0:
        yield f"attack.fraction: {attack.fraction} Byzantine clients with attack.name 'none'; name an attack"


def _loss(cfg: ExperimentConfig) -> Iterator[str | None]:
    from fedsim.losses.registry import REGISTRY

    loss = cfg.loss
    if getattr(REGISTRY[loss.name], "auxiliary_only", False):
        yield (f"loss.name: {loss.name!r} is an auxiliary term, not a training objective; use it as "
               f"loss.aux.name beside a main loss such as cross_entropy")
        return
    reduction = loss.kwargs.get("reduction", "mean")
    if reduction != "mean":
        yield (f"loss.reduction: {reduction!r}; the client objective is the batch mean (a sum would scale "
               f"client.lr by the batch size); allowed: mean")
        return
    classes = cfg.data.synthetic.num_classes if cfg.data.name == "synthetic" else KNOWN_NUM_CLASSES.get(cfg.data.name)
    if classes is not None:
        yield loss_class_problem(cfg, classes)


def loss_class_problem(cfg: ExperimentConfig, num_classes: int) -> str | None:
    """Why the main loss cannot train on ``num_classes`` classes (a binary loss on 10), or None.

    The loss is built and called once on a small batch that holds every class, with the
    inputs its ``inputs`` names: what it refuses there, it would refuse in every client.
    """
    import torch

    from fedsim.losses.registry import REGISTRY

    cls = REGISTRY[cfg.loss.name]
    kwargs = dict(cfg.loss.kwargs)
    if "num_samples" in inspect.signature(cls).parameters:
        kwargs["num_samples"] = 2 * num_classes
    loss = cls(**kwargs)
    batch, width = 2 * num_classes, 8
    generator = torch.Generator().manual_seed(0)
    inputs = {"logits": torch.randn(batch, num_classes, generator=generator),
              "targets": torch.arange(batch) % num_classes,
              "embeddings": torch.randn(batch, width, generator=generator),
              "embeddings2": torch.randn(batch, width, generator=generator),
              "indices": torch.arange(batch),
              "classifier": torch.randn(num_classes, width, generator=generator)}
    try:
        value = loss(**{k: inputs[k] for k in loss.inputs})
    except (ValueError, RuntimeError, IndexError) as exc:
        return f"loss.name: {cfg.loss.name!r} cannot train on {num_classes} classes (data.name {cfg.data.name!r}): {exc}"
    if value.dim() != 0:
        return f"loss.name: {cfg.loss.name!r} returns {tuple(value.shape)} per batch, not a scalar"
    return None


RULES: tuple[Callable[[ExperimentConfig], Iterator[str | None]], ...] = (
    _algorithm, _sync_only, _async_options, _async_only, _participation, _model, _faults, _attack, _loss,
)

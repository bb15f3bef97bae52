"""The combination contract of an experiment: what cannot combine, and what does not apply.

Each section of :mod:`fedsim.config` checks its own keys. The rules here look across
sections, and :class:`fedsim.config.ExperimentConfig` applies them when it validates: a
configuration they pass runs, so ``fedsim validate`` refuses what ``fedsim run`` would
otherwise stop on, or silently ignore. Each rule returns ``None`` or one line that names
both keys and why they do not go together, e.g. ``quant.uplink.error_feedback: 'ef21'
needs the server estimates of the synchronous strategies; strategy.name is 'gossip'``.

An option that does not apply to the chosen strategy family is refused when it differs
from its default, so a resolved ``config.yaml`` (every key written out) validates again.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from fedsim.algorithms import registry

if TYPE_CHECKING:
    from pydantic import BaseModel

    from fedsim.config import ExperimentConfig

# Classes of the datasets whose class count is fixed (synthetic: data.synthetic.num_classes)
KNOWN_NUM_CLASSES = {"digits": 10, "mnist": 10, "cifar10": 10, "shakespeare": 80}

UPDATE_ATTACKS = ("sign_flip", "scaled", "gaussian", "alie", "ipm")
"""Attacks that replace Byzantine rows of a round's updates on the server (the synchronous
strategies' aggregation step); label_flip acts in the client's training and applies anywhere."""

def combination_problems(cfg: ExperimentConfig) -> list[str]:
    """Every rule's complaint about ``cfg``, one line each (empty: the config can run)."""
    return [problem for rule in RULES for problem in rule(cfg) if problem]


def unread(section: BaseModel, prefix: str, reads: tuple[str, ...], where: str) -> Iterator[str]:
    """One line per field of ``section`` (written ``prefix.field``) outside ``reads`` and off
    its default: the option is not read ``where`` (e.g. ``under partition.scheme 'iid'``)."""
    for name, field in type(section).model_fields.items():
        value = getattr(section, name)
        if name not in reads and value != field.get_default(call_default_factory=True):
            yield f"{prefix}.{name}: {value!r} is not read {where}; leave it unset"


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


MAX_VIRTUAL_STEPS = 100_000
"""The most evaluations (``strategy.horizon / strategy.eval_every``) and aggregation windows
(``horizon / window``) an asynchronous run may have: each is a metrics row or a server step,
and a tiny interval would otherwise run for days."""


def _async_options(cfg: ExperimentConfig) -> Iterator[str | None]:
    """The asynchronous loops run on virtual time: ``strategy.horizon`` and ``strategy.eval_every``."""
    if _family(cfg) != "async":
        return
    horizon, interval = cfg.strategy.horizon, cfg.strategy.eval_every
    if horizon / interval > MAX_VIRTUAL_STEPS:
        yield (f"strategy.eval_every: {interval:g} makes {horizon / interval:.3g} steps in strategy.horizon "
               f"{horizon:g}; at most {MAX_VIRTUAL_STEPS:,} (raise strategy.eval_every, or lower strategy.horizon)")
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
    yield from unread(cfg.sim.speeds, "sim.speeds", (), f"under strategy.name {cfg.strategy.name!r} (device speeds "
                      "drive the asynchronous strategies' virtual clock)")


SPEED_READS = {"linear": ("spread",), "lognormal": ("sigma",), "two_tier": ("slow_fraction", "slow_factor"),
               "csv": ("path",)}
"""What each ``sim.speeds.kind`` reads besides kind, network_delay and dropout."""


def _speeds(cfg: ExperimentConfig) -> Iterator[str | None]:
    if _family(cfg) == "async":
        speeds = cfg.sim.speeds
        yield from unread(speeds, "sim.speeds", ("kind", "network_delay", "dropout", *SPEED_READS[speeds.kind]),
                          f"under sim.speeds.kind {speeds.kind!r}")


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
    elif part.model == "cyclic" and part.num_groups <= n and cfg.strategy.min_successful > (smallest := n // part.num_groups):
        yield (f"strategy.min_successful: {cfg.strategy.min_successful} replies needed, but participation.num_groups "
               f"{part.num_groups} splits partition.num_clients {n} into groups as small as {smallest}; their rounds "
               "would be skipped")
    if not cfg.eval.federated and cfg.strategy.fraction_evaluate != (
            default := type(cfg.strategy).model_fields["fraction_evaluate"].default):
        yield (f"strategy.fraction_evaluate: {cfg.strategy.fraction_evaluate} samples clients for federated "
               f"evaluation, which eval.federated false turns off; leave it at {default}")


def participation_reads(cfg: ExperimentConfig) -> tuple[str, ...]:
    """The fields of ``participation`` its model reads (fedsim.strategies.build_sampler)."""
    part = cfg.participation
    if part.model in ("uniform", "cyclic"):
        return ("model", "num_groups") if part.model == "cyclic" else ("model",)
    chance = ("p_mean", "p_low", "label_concentration") if part.tied_to_labels else ("p_low", "p_high")
    return ("model", "tied_to_labels", *chance, *(("p_off_to_on",) if part.model == "markov" else ()))


def _participation_options(cfg: ExperimentConfig) -> Iterator[str | None]:
    if _family(cfg) != "sync":
        return  # _sync_only refuses the section
    part = cfg.participation
    tied = " with participation.tied_to_labels true" if part.tied_to_labels else ""
    yield from unread(part, "participation", participation_reads(cfg),
                      f"under participation.model {part.model!r}{tied}")


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


def _client_features(cfg: ExperimentConfig) -> Iterator[str | None]:
    """The rules of the third-party client features the run uses (entry-point group
    ``fedsim.client_features``)."""
    for feature in registry.client_feature_classes():
        if feature.applies(cfg):
            yield from feature.rules(cfg)


# ------------------------------------------------------------------------- the rest
def _model(cfg: ExperimentConfig) -> Iterator[str | None]:
    if cfg.model.name != "mlp" and cfg.model.hidden != type(cfg.model)().hidden:
        yield f"model.hidden: the hidden widths of the MLP; model.name is {cfg.model.name!r}"
    if cfg.model.name != "char_lstm" and cfg.model.lstm_hidden != type(cfg.model)().lstm_hidden:
        yield f"model.lstm_hidden: the LSTM width of char_lstm; model.name is {cfg.model.name!r}"


IMAGE_MODELS = ("cnn", "lenet5", "resnet8")
VECTOR_DATA = ("synthetic",)
"""Datasets whose samples are always vectors; a file's (npz, hf) shape is checked when it
is loaded (fedsim.preflight)."""
TEXT_MODELS = ("char_lstm",)
TEXT_DATA = ("shakespeare",)
"""Datasets of character indices, and the models that embed them; neither goes with the other kind."""


def _model_and_data(cfg: ExperimentConfig) -> Iterator[str | None]:
    if cfg.model.name in TEXT_MODELS and cfg.data.name not in TEXT_DATA:
        yield (f"model.name: {cfg.model.name!r} embeds character indices; data.name {cfg.data.name!r} is not text; "
               f"use it with {', '.join(TEXT_DATA)}")
        return
    if cfg.data.name in TEXT_DATA and cfg.model.name not in TEXT_MODELS:
        yield (f"model.name: {cfg.model.name!r} takes features, not the character indices of data.name "
               f"{cfg.data.name!r}; use {', '.join(TEXT_MODELS)}")
        return
    if cfg.model.name in IMAGE_MODELS and cfg.data.name in VECTOR_DATA:
        yield (f"model.name: {cfg.model.name!r} takes images (C, H, W); data.name {cfg.data.name!r} gives vectors of "
               f"{cfg.data.synthetic.dim} features; use mlp")


PARTITION_READS = {"iid": (), "dirichlet": ("alpha", "min_size"), "shards": ("shards_per_client",),
                   "quantity": ("quantity_alpha", "min_size"), "natural": (),
                   "pathological": ("classes_per_client",), "feature_noise": ("noise_std", "noise_draw")}
"""What each ``partition.scheme`` reads besides scheme, num_clients, client_test_fraction."""


def _partition_and_data(cfg: ExperimentConfig) -> Iterator[str | None]:
    part, data = cfg.partition, cfg.data
    yield from unread(part, "partition", ("scheme", "num_clients", "client_test_fraction",
                                          *PARTITION_READS[part.scheme]), f"under partition.scheme {part.scheme!r}")
    if data.name != "synthetic":
        yield from unread(data.synthetic, "data.synthetic", ("num_devices",), f"with data.name {data.name!r}")
        if data.synthetic.num_devices != 30:  # what validation resolves it to off synthetic data
            yield (f"data.synthetic.num_devices: {data.synthetic.num_devices} is not read with data.name "
                   f"{data.name!r}; leave it unset")
    if data.name != "hf":
        text = ("min_samples", "stride") if data.name in TEXT_DATA else ()
        yield from unread(data, "data", ("name", "path", "test_fraction", "synthetic", "hf_partition_by", *text),
                          f"with data.name {data.name!r}")
    else:
        yield from unread(data, "data", tuple(n for n in type(data).model_fields if n not in ("min_samples", "stride")),
                          f"with data.name {data.name!r}")
    if data.name in TEXT_DATA and part.scheme == "feature_noise":
        yield (f"partition.scheme: 'feature_noise' adds Gaussian noise to the inputs; data.name {data.name!r} "
               "has character indices")
    if data.name in ("digits", "synthetic") and data.path is not None:
        yield f"data.path: {data.path!r} is not read with data.name {data.name!r} (built in); leave it unset"


def _quant_options(cfg: ExperimentConfig) -> Iterator[str | None]:
    for direction in ("uplink", "downlink"):
        link = getattr(cfg.quant, direction)
        reads = {"qsgd": ("bits", "block_size"), "topk": ("fraction",), "randk": ("fraction",)}.get(link.codec, ())
        yield from unread(link, f"quant.{direction}", ("codec", "error_feedback", "eta", *reads),
                          f"by quant.{direction}.codec {link.codec!r}")
        if link.error_feedback != "econtrol" and link.eta is not None:
            yield (f"quant.{direction}.eta: {link.eta} is read by error_feedback 'econtrol' only; "
                   f"quant.{direction}.error_feedback is {link.error_feedback!r}; leave it unset")
    ptq = cfg.quant.ptq
    if ptq is not None:
        yield from unread(ptq, "quant.ptq", ("method", "bits", *(("calibration_samples",) if ptq.method == "awq" else ())),
                          f"by quant.ptq.method {ptq.method!r}")


def _faults(cfg: ExperimentConfig) -> Iterator[str | None]:
    n = cfg.partition.num_clients
    if not cfg.faults.slow and cfg.faults.slow_s != 0:
        yield f"faults.slow_s: {cfg.faults.slow_s} s stalls the clients of faults.slow, which is empty; leave it unset"
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
    from fedsim.attacks import ATTACKS

    takes = {f.name for f in dataclasses.fields(ATTACKS[attack.name])} if attack.name != "none" else set()
    for key, value in attack.kwargs().items():
        if key not in takes:
            yield f"attack.{key}: {value} is not a parameter of attack.name {attack.name!r}; leave it unset"


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


PERSONALIZATION_READS = {"none": (), "finetune": ("finetune_steps",), "fedper": ("head",),
                         "fedrep": ("head", "head_steps"), "ditto": ("lam",), "fedbn": ()}
"""What each ``personalization.method`` reads besides ``method``."""

SAMPLE_SHAPES = {"mlp": (4,), "cnn": (1, 8, 8), "lenet5": (1, 28, 28), "resnet8": (3, 8, 8)}
"""A sample shape each model builds on: its layers' names do not depend on the input size."""


def model_layers(cfg: ExperimentConfig) -> dict[str, str]:
    """The named modules of ``cfg``'s model and their class names (e.g. ``body.1: BatchNorm2d``)."""
    from fedsim.models.registry import build_model

    kwargs = {"hidden": tuple(cfg.model.hidden)} if cfg.model.name == "mlp" else {}
    model = build_model(cfg.model.name, SAMPLE_SHAPES[cfg.model.name], 2, **kwargs)
    return {name: type(module).__name__ for name, module in model.named_modules() if name}


def norm_layers(cfg: ExperimentConfig) -> list[str]:
    """The normalisation layers of ``cfg``'s model (BatchNorm, GroupNorm, LayerNorm, ...)."""
    return [name for name, kind in model_layers(cfg).items() if "Norm" in kind]


def _personalization(cfg: ExperimentConfig) -> Iterator[str | None]:
    pfl = cfg.personalization
    yield from unread(pfl, "personalization", ("method", *PERSONALIZATION_READS[pfl.method]),
                      f"by personalization.method {pfl.method!r}")
    if pfl.method == "none":
        return
    if _family(cfg) != "sync":
        yield f"personalization.method: {pfl.method!r} applies to the synchronous strategies; {_strategy(cfg)}"
    if not cfg.eval.federated:
        yield (f"personalization.method: {pfl.method!r} is evaluated on the clients' test splits; "
               f"eval.federated is false")
    quantized = "quant.qat" if cfg.quant.qat is not None else "quant.lowbit" if cfg.quant.lowbit is not None else None
    if pfl.method in ("finetune", "ditto") and quantized:
        yield (f"personalization.method: {pfl.method!r} trains its personal model in full precision; "
               f"{quantized} is set (use fedper, fedrep or fedbn, whose personal layers train with the rest)")
    if pfl.method == "fedbn" and not norm_layers(cfg):
        yield (f"personalization.method: 'fedbn' keeps the normalisation layers local; model.name "
               f"{cfg.model.name!r} has none (resnet8 has BatchNorm)")
    if "head" in PERSONALIZATION_READS[pfl.method]:
        layers = set(model_layers(cfg))
        for name in pfl.head:
            if name not in layers:
                yield (f"personalization.head: {name!r} names no layer of model.name {cfg.model.name!r}; "
                       f"its layers: {', '.join(sorted(layers))}")
        if not pfl.head:
            yield "personalization.head: empty; name the personal layers (the last layer is 'head')"


def _secagg(cfg: ExperimentConfig) -> Iterator[str | None]:
    """Secure aggregation needs a synchronous strategy whose server reads only the weighted
    sum of the updates, and dense uploads; its quantised inputs must sum below 2^32."""
    secagg = cfg.secagg
    if not secagg.enabled:
        yield from unread(secagg, "secagg", ("enabled",), "with secagg.enabled false")
        return
    algorithm = registry.get(cfg.strategy.name)
    if _family(cfg) != "sync":
        yield (f"secagg.enabled: secure aggregation sums a synchronous round's updates; {_strategy(cfg)} "
               f"({_family(cfg)})")
        return
    if not getattr(algorithm, "sums_updates", lambda: False)():
        yield (f"secagg.enabled: the server learns only the weighted sum of the updates; {_strategy(cfg)}, "
               "whose server reads each client's reply")
    uplink = cfg.quant.uplink
    if uplink.codec != "identity":
        yield (f"secagg.enabled: masked uploads are dense uint32 vectors; quant.uplink.codec {uplink.codec!r} "
               "cannot compress them (use identity)")
    if uplink.error_feedback in ("ef21", "econtrol"):
        yield (f"secagg.enabled: the server sees no client's update; quant.uplink.error_feedback "
               f"{uplink.error_feedback!r} keeps each client's estimate on the server (use none)")
    if cfg.privacy.mechanism == "central" and cfg.privacy.clipping == "adaptive":
        yield ("secagg.enabled: the server sees no client's update norm; privacy.clipping 'adaptive' counts the "
               "clipped clients on the server (use fixed)")
    from fedsim.secagg.quantization import RING_BITS, fits

    k = clients_per_round(cfg)
    if not fits(secagg.bits, k):
        yield (f"secagg.bits: {secagg.bits} bits per input and up to {k} clients per round (partition.num_clients, "
               f"participation) can wrap around 2^{RING_BITS}; need bits + ceil(log2 clients) <= {RING_BITS}")


RULES: tuple[Callable[[ExperimentConfig], Iterator[str | None]], ...] = (
    _algorithm, _client_features, _sync_only, _async_options, _async_only, _speeds, _participation, _participation_options, _model,
    _model_and_data, _partition_and_data, _quant_options, _faults, _attack, _loss,
    _personalization, _secagg,
)

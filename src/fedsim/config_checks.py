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
    if _family(cfg) == "gossip" and cfg.eval.federated_fraction is not None:
        yield f"eval.federated_fraction: gossip evaluates every node's own model; {_strategy(cfg)}; leave it unset"


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
    if cfg.eval.federated_fraction is not None and cfg.strategy.fraction_evaluate != (
            type(cfg.strategy).model_fields["fraction_evaluate"].default):
        yield (f"eval.federated_fraction: {cfg.eval.federated_fraction} draws the evaluated clients, and "
               f"strategy.fraction_evaluate {cfg.strategy.fraction_evaluate} takes the first ones; set one of them")
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
    if cfg.model.name != "mlp" and cfg.model.norm != "none":
        yield f"model.norm: the MLP's normalisation layers; model.name is {cfg.model.name!r}"
    if cfg.model.name != "char_lstm" and cfg.model.lstm_hidden != type(cfg.model)().lstm_hidden:
        yield f"model.lstm_hidden: the LSTM width of char_lstm; model.name is {cfg.model.name!r}"


IMAGE_MODELS = ("cnn", "lenet5", "resnet8")
VECTOR_DATA = ("synthetic",)
"""Datasets whose samples are always vectors; a file's (npz, hf) shape is checked when it
is loaded (fedsim.preflight)."""
TEXT_MODELS = ("char_lstm", "causal_lm")
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
                   "pathological": ("classes_per_client",), "feature_noise": ("noise_std", "noise_draw"),
                   "domains": ("domains", "target_domain")}
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
        text = ("min_samples", "stride", "tokenizer", "seq_len") if data.name in TEXT_DATA else ()
        yield from unread(data, "data", ("name", "path", "test_fraction", "validation_fraction", "synthetic",
                                          "hf_partition_by", "client_cache_mb", *text),
                          f"with data.name {data.name!r}")
    else:
        yield from unread(data, "data", tuple(n for n in type(data).model_fields
                                              if n not in ("min_samples", "stride", "tokenizer", "seq_len")),
                          f"with data.name {data.name!r}")
    if data.name in TEXT_DATA and part.scheme == "feature_noise":
        yield (f"partition.scheme: 'feature_noise' adds Gaussian noise to the inputs; data.name {data.name!r} "
               "has character indices")
    if data.name in ("digits", "synthetic") and data.path is not None:
        yield f"data.path: {data.path!r} is not read with data.name {data.name!r} (built in); leave it unset"


IMAGE_DOMAINS = ("identity", "rotate", "invert", "noise", "blur", "scale")
VECTOR_DOMAINS = ("identity", "rotate", "invert", "noise", "shift", "scale")
"""The transforms of fedsim.data.domains, for images and for feature vectors."""


def _domains(cfg: ExperimentConfig) -> Iterator[str | None]:
    part, name = cfg.partition, cfg.data.name
    if part.scheme != "domains":
        return
    if name in TEXT_DATA:
        yield f"partition.scheme: 'domains' transforms inputs; data.name {name!r} has character indices"
        return
    # npz and hf data may hold images or vectors: the transforms both have
    known = (VECTOR_DOMAINS if name in VECTOR_DATA else IMAGE_DOMAINS if name in ("digits", "mnist", "cifar10")
             else tuple(d for d in IMAGE_DOMAINS if d in VECTOR_DOMAINS))
    if unknown := [d for d in part.domains if d not in known]:
        yield f"partition.domains: {', '.join(unknown)} not a domain of data.name {name!r}; known: {', '.join(known)}"
    if len(set(part.domains)) != len(part.domains):
        yield f"partition.domains: {part.domains} names a domain twice"
    if part.target_domain not in part.domains:
        yield f"partition.target_domain: {part.target_domain!r} is not one of partition.domains {part.domains}"
    elif part.num_clients % (sources := len(part.domains) - 1):
        yield (f"partition.num_clients: {part.num_clients} clients over the {sources} source domains of "
               f"partition.domains; a multiple of {sources}")


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
    for key in ("crash", "slow", "nan", "wrong_shape", "drop_after_keys"):
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
    if cfg.data.tokenizer is not None:
        classes = None  # token ids, not LEAF's characters: _language_model checks the vocabulary
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
                         "fedrep": ("head", "head_steps"), "ditto": ("lam",), "fedbn": (),
                         "apfl": ("alpha", "alpha_lr")}
"""What each ``personalization.method`` reads besides ``method``."""

SAMPLE_SHAPES = {"mlp": (4,), "cnn": (1, 8, 8), "lenet5": (1, 28, 28), "resnet8": (3, 8, 8)}
"""A sample shape each model builds on: its layers' names do not depend on the input size."""


def model_layers(cfg: ExperimentConfig) -> dict[str, str]:
    """The named modules of ``cfg``'s model and their class names (e.g. ``body.1: BatchNorm2d``)."""
    from fedsim.models.registry import build_model

    kwargs = {"hidden": tuple(cfg.model.hidden), "norm": cfg.model.norm} if cfg.model.name == "mlp" else {}
    model = build_model(cfg.model.name, SAMPLE_SHAPES[cfg.model.name], 2, **kwargs)
    return {name: type(module).__name__ for name, module in model.named_modules() if name}


def norm_layers(cfg: ExperimentConfig) -> list[str]:
    """The normalisation layers of ``cfg``'s model (BatchNorm, GroupNorm, LayerNorm, ...)."""
    return [name for name, kind in model_layers(cfg).items() if "Norm" in kind]


def _personalization(cfg: ExperimentConfig) -> Iterator[str | None]:
    pfl = cfg.personalization
    yield from unread(pfl, "personalization", ("method", *PERSONALIZATION_READS[pfl.method]),
                      f"by personalization.method {pfl.method!r}")
    if pfl.method == "none" or cfg.model.name == "causal_lm":  # _language_model refuses it there
        return
    if _family(cfg) != "sync":
        yield f"personalization.method: {pfl.method!r} applies to the synchronous strategies; {_strategy(cfg)}"
    if not cfg.eval.federated:
        yield (f"personalization.method: {pfl.method!r} is evaluated on the clients' test splits; "
               f"eval.federated is false")
    quantized = "quant.qat" if cfg.quant.qat is not None else "quant.lowbit" if cfg.quant.lowbit is not None else None
    if pfl.method in ("finetune", "ditto", "apfl") and quantized:
        yield (f"personalization.method: {pfl.method!r} trains its personal model in full precision; "
               f"{quantized} is set (use fedper, fedrep or fedbn, whose personal layers train with the rest)")
    client = cfg.client
    plain = {"client.optimizer": client.optimizer != "sgd" and client.optimizer,
             "client.momentum": client.momentum, "client.weight_decay": client.weight_decay}
    for key, value in plain.items():
        if pfl.method == "apfl" and value:
            yield (f"personalization.method: 'apfl' steps v and alpha by plain SGD (Deng et al. 2020, "
                   f"Algorithm 1); {key} is {value!r}")
    if pfl.method == "fedbn" and not norm_layers(cfg):
        yield (f"personalization.method: 'fedbn' keeps the normalisation layers local; model.name "
               f"{cfg.model.name!r} has none (resnet8 has BatchNorm; mlp has with model.norm batch, group or layer)")
    if "head" in PERSONALIZATION_READS[pfl.method]:
        layers = set(model_layers(cfg))
        for name in pfl.head:
            if name not in layers:
                yield (f"personalization.head: {name!r} names no layer of model.name {cfg.model.name!r}; "
                       f"its layers: {', '.join(sorted(layers))}")
        if not pfl.head:
            yield "personalization.head: empty; name the personal layers (the last layer is 'head')"


def _robust_eval(cfg: ExperimentConfig) -> Iterator[str | None]:
    """``eval.robust`` attacks the global model on the server's test set (and
    ``client.adversarial`` the clients' batches): real-valued inputs only."""
    if cfg.client.adversarial is not None and cfg.data.name in TEXT_DATA:
        yield (f"client.adversarial: perturbs real-valued inputs within a norm ball; data.name {cfg.data.name!r} "
               "gives token ids")
    if cfg.eval.robust is None:
        return
    if not cfg.eval.centralised:
        yield "eval.robust: attacks the global model on the server's test set; eval.centralised is false"
    if cfg.data.name in TEXT_DATA:
        yield f"eval.robust: perturbs real-valued inputs within a norm ball; data.name {cfg.data.name!r} gives token ids"
    if _family(cfg) == "gossip":
        yield f"eval.robust: attacks one global model; {_strategy(cfg)}, whose nodes each keep their own"


def _hierarchy(cfg: ExperimentConfig) -> Iterator[str | None]:
    """Two-tier rounds (``hierarchy``): gateways run the synchronous strategy, the cloud an
    aggregation of the gateways' updates."""
    h = cfg.hierarchy
    if h is None:
        return
    if _family(cfg) != "sync":
        yield f"hierarchy: gateways run rounds of a synchronous strategy; {_strategy(cfg)}"
    if h.association == "static" and h.num_edges > cfg.partition.num_clients:
        yield (f"hierarchy.num_edges: {h.num_edges} gateways, but partition.num_clients {cfg.partition.num_clients} "
               "leaves some without a client under hierarchy.association static")
    yield from unread(h, "hierarchy", ("num_edges", "edge_rounds", "weighting", "association", "cloud",
                                       *(("orbit_period", "contact_width") if h.association == "orbits" else ())),
                      "under hierarchy.association 'static'")
    feedback = cfg.quant.uplink.error_feedback
    if feedback in ("ef21", "econtrol"):
        yield (f"quant.uplink.error_feedback: {feedback} keeps one server estimate per client; hierarchy moves "
               "clients between gateways, each with its own server (use none or ef)")
    try:
        cloud = registry.get(h.cloud)
    except registry.UnknownAlgorithm as exc:
        yield f"hierarchy.cloud: {exc}"
        return
    if cloud.family() != "sync" or cloud.client is not None or cloud.sgd_steps:
        yield (f"hierarchy.cloud: {h.cloud} needs its clients' own training (a client half, SGD step counts "
               f"or asynchronous arrivals); the cloud combines gateways' updates (e.g. fedavg, median, krum)")


def _new_clients(cfg: ExperimentConfig) -> Iterator[str | None]:
    fraction, n = cfg.eval.new_clients, cfg.partition.num_clients
    if fraction == 0:
        return
    held_out = round(fraction * n)
    if _family(cfg) != "sync":
        yield f"eval.new_clients: held-out clients are evaluated by the synchronous strategies; {_strategy(cfg)}"
    elif not cfg.eval.federated:
        yield "eval.new_clients: held-out clients are evaluated on their test splits; eval.federated is false"
    elif cfg.strategy.fraction_evaluate == 0:
        yield "eval.new_clients: held-out clients are evaluated with the others; strategy.fraction_evaluate is 0"
    if held_out == 0:
        yield f"eval.new_clients: {fraction:g} of partition.num_clients {n} holds out no client"
    elif held_out == n:
        yield f"eval.new_clients: {fraction:g} of partition.num_clients {n} leaves no client to train"


def _evaluation(cfg: ExperimentConfig) -> Iterator[str | None]:
    if cfg.eval.federated_fraction is not None and not cfg.eval.federated:
        yield (f"eval.federated_fraction: {cfg.eval.federated_fraction} samples clients for federated evaluation, "
               "which eval.federated false turns off; leave it unset")
    if (cfg.eval.test_samples is not None and not cfg.eval.centralised and cfg.quant.ptq is None
            and _family(cfg) != "gossip"):
        yield (f"eval.test_samples: {cfg.eval.test_samples} bounds the server's test set, which eval.centralised "
               "false leaves unused (and quant.ptq is off); leave it unset")


LANGUAGE_MODEL_KEYS = ("config", "path", "adapter", "base_quant")
LANGUAGE_MODEL_LOSSES = ("cross_entropy", "linear_cross_entropy")


def _language_model(cfg: ExperimentConfig) -> Iterator[str | None]:
    """model.name causal_lm: its keys, its token data, and what a frozen base and next-token
    rows do not combine with."""
    model, data = cfg.model, cfg.data
    if model.name != "causal_lm":
        yield from unread(model, "model", tuple(n for n in type(model).model_fields if n not in LANGUAGE_MODEL_KEYS),
                          f"by model.name {model.name!r} (causal_lm reads it)")
        if data.tokenizer is not None:
            yield f"data.tokenizer: token blocks for model.name causal_lm; model.name is {model.name!r}"
        elif data.seq_len != type(data)().seq_len:
            yield f"data.seq_len: the block length of data.tokenizer, which is unset; leave it unset"
        return
    if data.tokenizer is None:
        yield "model.name: 'causal_lm' reads token blocks; data.tokenizer is unset (bpe trains one on the text)"
        return
    if data.stride != 1:
        yield f"data.stride: {data.stride} spaces LEAF's character windows; data.tokenizer cuts token blocks instead"
    adapter = model.adapter
    if adapter.kind == "none":
        yield from unread(adapter, "model.adapter", ("kind",), "by model.adapter.kind 'none'")
        if model.base_quant != "none":
            yield (f"model.base_quant: {model.base_quant!r} stores a frozen base; model.adapter.kind 'none' "
                   "trains every weight")
    for key, value, why in (
            ("model.init", model.init != "default", "it keeps transformers' initialisation"),
            ("personalization.method", cfg.personalization.method != "none", "its adapter is the one trained part"),
            ("quant.qat", cfg.quant.qat is not None, "its frozen base is quantized by model.base_quant"),
            ("quant.lowbit", cfg.quant.lowbit is not None, "its frozen base is quantized by model.base_quant"),
            ("quant.ptq", cfg.quant.ptq is not None, "its frozen base is quantized by model.base_quant")):
        if value:
            yield f"{key}: not for model.name 'causal_lm': {why}"
    if cfg.attack.name == "label_flip":
        yield "attack.name: 'label_flip' flips class labels; model.name 'causal_lm' predicts next tokens"
    if cfg.loss.name not in LANGUAGE_MODEL_LOSSES or cfg.loss.aux is not None:
        yield (f"loss.name: {cfg.loss.name!r}{' with loss.aux' if cfg.loss.aux else ''} is not a next-token loss "
               f"of model.name 'causal_lm'; allowed: {', '.join(LANGUAGE_MODEL_LOSSES)}, no aux")
    yield from _language_model_shape(cfg)


def _language_model_shape(cfg: ExperimentConfig) -> Iterator[str | None]:
    """The model's vocabulary against the tokenizer's, its positions against data.seq_len, and
    LoRA's target modules against its linear layers (read from the config, no weights)."""
    from fedsim.models.causal_lm import linear_layer_names, transformers_config

    model, tokenizer = cfg.model, cfg.data.tokenizer
    where = "model.path" if model.path is not None else "model.config"
    try:
        settings = transformers_config(model.config, model.path)
        layers = linear_layer_names(model.config, model.path) if model.adapter.kind == "lora" else set()
    except (OSError, ValueError, TypeError, KeyError) as exc:
        yield f"{where}: not a transformers causal language model: {' '.join(str(exc).split())[:200]}"
        return
    if tokenizer.kind == "bpe":
        vocab = tokenizer.vocab_size
    else:
        from fedsim.data.tokens import load_tokenizer

        try:
            vocab = load_tokenizer(tokenizer.path).get_vocab_size()
        except (OSError, ValueError) as exc:
            yield f"data.tokenizer.path: {exc}"
            return
    given = model.path is not None or "vocab_size" in (model.config or {})
    if given and settings.vocab_size != vocab:
        yield (f"{where}: a vocabulary of {settings.vocab_size} tokens; data.tokenizer gives {vocab} "
               f"({'vocab_size' if tokenizer.kind == 'bpe' else tokenizer.path}); they must match")
    positions = getattr(settings, "max_position_embeddings", None)
    if positions is not None and positions < cfg.data.seq_len:
        yield f"data.seq_len: {cfg.data.seq_len} tokens; {where} has {positions} positions (max_position_embeddings)"
    for name in model.adapter.target_modules if model.adapter.kind == "lora" else ():
        if name not in layers:
            yield (f"model.adapter.target_modules: {name!r} is no linear layer of {where}; "
                   f"its linear layers: {', '.join(sorted(layers))}")


def _secagg(cfg: ExperimentConfig) -> Iterator[str | None]:
    """Secure aggregation needs a synchronous strategy whose server reads only the weighted
    sum of the updates, and dense uploads; its quantised inputs must sum below 2^32."""
    secagg = cfg.secagg
    if not secagg.enabled:
        yield from unread(secagg, "secagg", ("enabled",), "with secagg.enabled false")
        if cfg.faults.drop_after_keys:
            yield "faults.drop_after_keys: clients drop in secure aggregation's protocol, and secagg.enabled is false"
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
    _model_and_data, _partition_and_data, _domains, _quant_options, _faults, _attack, _loss,
    _personalization, _new_clients, _robust_eval, _hierarchy, _evaluation, _language_model, _secagg,
)

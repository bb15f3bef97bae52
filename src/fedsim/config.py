"""The experiment description: pydantic models of a whole fedsim run.

This is the one place defaults live. A YAML file in ``configs/`` is loaded into
:class:`ExperimentConfig`; ``--set a.b=value`` overrides are applied to the raw mapping
before validation, so an override is checked exactly like a value in the file. Unknown
keys, wrong types and out-of-range values raise :class:`ConfigError` with one line per
problem that names the key and what is allowed.
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationError,
    field_validator,
    model_validator,
)

from fedsim.algorithms import registry
from fedsim.algorithms.api import StrategySection
from fedsim.config_checks import KNOWN_NUM_CLASSES, combination_problems
from fedsim.privacy.settings import PrivacyConfig
from fedsim.sections import ConfigError, Section

__all__ = ["ConfigError", "ExperimentConfig", "Section", "apply_override", "format_validation_error", "load_config",
           "validate_config"]


class SectionErrors(ValueError):
    """Problems already formatted one per line, each naming its full key (a nested section
    validated on its own, as ``strategy`` is by its algorithm's config model)."""


# --------------------------------------------------------------------------- data
class SyntheticConfig(Section):
    """LEAF Synthetic(alpha, beta): alpha controls model heterogeneity, beta data heterogeneity.

    ``num_devices`` natural clients (one group per device); unset, it is
    ``partition.num_clients`` under ``partition.scheme: natural``, else 30 (LEAF's count).
    """

    alpha: float = Field(1.0, ge=0)
    beta: float = Field(1.0, ge=0)
    num_devices: int | None = Field(None, ge=1)
    dim: int = Field(60, ge=1)
    num_classes: int = Field(10, ge=2)
    on_demand: bool | None = Field(
        None, description="generate a device's data when its client is sampled, from (seed, device); "
                          "unset: under partition.scheme natural")


class TokenizerConfig(Section):
    """The tokenizer of a language model's text (:mod:`fedsim.data.tokens`).

    ``bpe``: a byte-level BPE of ``vocab_size`` tokens trained with the ``tokenizers`` library
    on the run's own training text (every role's training part); ``local``: the
    ``tokenizer.json`` of a local directory ``path`` (a transformers model's tokenizer).
    """

    kind: Literal["bpe", "local"] = "bpe"
    vocab_size: int = Field(512, ge=260, description="bpe: tokens, the 256 bytes and the merges learnt")
    path: str | None = Field(None, description="local: a directory holding tokenizer.json")

    @model_validator(mode="after")
    def _source(self) -> TokenizerConfig:
        if (self.kind == "local") != (self.path is not None):
            raise ValueError(f"path: a tokenizer directory, needed by kind 'local' and read by it only; "
                             f"kind is {self.kind!r}")
        return self


class DataConfig(Section):
    """Which dataset to load; ``path`` for file loaders, ``hf_id`` for Hugging Face ids.

    ``hf`` names a public dataset the ecosystem's way: ``hf_id: ylecun/mnist`` is loaded
    through flwr-datasets' ``FederatedDataset``; offline, ``path`` to a ``save_to_disk``
    folder of a ``datasets.Dataset`` takes the same code path from the conversion on.
    """

    name: Literal["digits", "synthetic", "mnist", "cifar10", "npz", "hf", "shakespeare"] = "digits"
    path: str | None = None
    hf_id: str | None = None
    hf_image_key: str = "image"
    hf_label_key: str = "label"
    hf_partition_by: str | None = Field(
        None, description="hf: column of natural client ids (e.g. a writer id), for partition.scheme natural")
    hf_test_split: str | None = Field(
        "test", description="hf: the split held out for testing; null holds out test_fraction of train (FEMNIST)")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="held-out server test set")
    validation_fraction: float = Field(
        0.0, ge=0, lt=1, description="held out of the training pool as the server's evaluation set in place of the "
                                     "test set, which the run then never sees (a benchmark's tuning stage); 0: none")
    min_samples: int = Field(10, ge=1, description="shakespeare: roles with fewer samples are dropped (LEAF's -k)")
    stride: int = Field(1, ge=1, description="shakespeare: a sample at every stride-th character of play text "
                                             "(LEAF's 1: about 640 bytes of samples per character)")
    synthetic: SyntheticConfig = SyntheticConfig()
    client_cache_mb: float = Field(64.0, ge=0, description="clients' arrays kept for reuse, least recently "
                                                            "used out first")
    tokenizer: TokenizerConfig | None = Field(
        None, description="shakespeare for model.name causal_lm: each role's speech as token blocks, "
                          "not LEAF's windows")
    seq_len: int = Field(64, ge=2, description="tokenizer: tokens a block predicts (a block holds seq_len + 1)")

    @model_validator(mode="after")
    def _needs_source(self) -> DataConfig:
        if self.name in ("mnist", "cifar10", "npz", "shakespeare") and not self.path:
            raise ValueError(f"data.path is required for data.name={self.name!r}")
        if self.name == "hf" and (self.hf_id is None) == (self.path is None):
            raise ValueError("data.name='hf' needs exactly one of data.hf_id (a Hugging Face id, "
                             "loaded through flwr-datasets) or data.path (a save_to_disk folder)")
        return self


class PartitionConfig(Section):
    """How the training data is split over clients (:mod:`fedsim.data.partition`).

    NIID-Bench's kinds of skew (Li et al., ICDE 2022), drawn as NIID-Bench's
    ``partition_data`` draws them (the same partition for the same seed and labels):
    label distribution skew (``dirichlet``: each label shuffled and split by
    Dirichlet(``alpha``) proportions, clients holding the mean size or more getting no
    more, drawn again until every client holds ``min_size``), label quantity skew #C=k
    (``pathological``, ``classes_per_client`` labels per client, each label shuffled and
    split equally among its holders; ``shards`` is McMahan et al.'s variant), noise-based
    feature skew (``feature_noise``: IID labels, client i of n gets Gaussian noise of std
    ``noise_std * i / (n - 1)`` on its inputs, drawn afresh every round, ``noise_draw: round``,
    or once for the run, ``once``; NIID-Bench draws it at every access to a sample, see
    :class:`fedsim.data.partition.FeatureNoise`), quantity skew (``quantity``: Dirichlet(``quantity_alpha``)
    shares, drawn again until every client holds ``min_size``), real-world groups
    (``natural``) and ``iid``; and domain shift (``domains``: each source domain of
    ``domains`` a transform of the data, one ``target_domain`` held out and tested on; see
    :mod:`fedsim.data.domains`). ``num_clients * min_size`` more than the training samples is
    refused when the data is loaded (``fedsim validate``), in one line naming both keys.
    """

    scheme: Literal["iid", "dirichlet", "shards", "quantity", "natural", "pathological",
                    "feature_noise", "domains"] = "dirichlet"
    num_clients: int = Field(10, ge=1)
    alpha: float = Field(0.5, gt=0, description="Dirichlet label-skew concentration")
    shards_per_client: int = Field(2, ge=1)
    quantity_alpha: float = Field(0.5, gt=0, description="Dirichlet concentration of sizes")
    min_size: int = Field(10, ge=1, description="dirichlet and quantity: the smallest client (NIID-Bench's 10); "
                                                "drawn again until every client has it")
    classes_per_client: int = Field(2, ge=1, description="pathological: labels per client (#C=k)")
    noise_std: float = Field(0.1, gt=0, description="feature_noise: client i of n gets noise_std * i / (n - 1)")
    noise_draw: Literal["round", "once"] = Field(
        "round", description="feature_noise: a fresh draw every round (round) or one for the whole run (once)")
    client_test_fraction: float = Field(0.2, ge=0, lt=1)
    domains: list[str] = Field(default_factory=lambda: ["identity", "rotate", "invert", "noise", "scale"],
                               min_length=2, description="domains: the domains (transforms of the data)")
    target_domain: str = Field("rotate", description="domains: the held-out domain the server tests on")


# -------------------------------------------------------------------------- model
class AdapterConfig(Section):
    """What of a causal language model trains and travels (peft; Hu et al., "LoRA: Low-Rank
    Adaptation of Large Language Models", arXiv 2106.09685).

    ``none``: every weight (full fine-tuning); ``lora``: ``W x + (alpha / r) B A x`` on each
    module named in ``target_modules``, ``A`` (r x in) and ``B`` (out x r, zero at the start)
    train, the base is frozen.
    """

    kind: Literal["none", "lora"] = "none"
    r: int = Field(8, ge=1, description="lora: rank of A and B")
    alpha: float = Field(16.0, gt=0, description="lora: the update is scaled by alpha / r")
    dropout: float = Field(0.0, ge=0, lt=1, description="lora: dropout on the adapter's input")
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], min_length=1,
                                      description="lora: names (last part) of the linear layers adapted")


class ModelConfig(Section):
    """A model of the zoo, chosen by name."""

    name: Literal["mlp", "cnn", "lenet5", "resnet8", "char_lstm", "causal_lm"] = "mlp"
    hidden: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [128], min_length=1,
                                                      description="MLP hidden sizes")
    norm: Literal["none", "batch", "group", "layer"] = Field(
        "none", description="MLP: a normalisation layer after each hidden linear layer (BatchNorm1d, GroupNorm, "
                            "LayerNorm), e.g. for personalization.method fedbn")
    lstm_hidden: int = Field(256, ge=1, description="char_lstm: units of each of its two LSTM layers (LEAF's 256)")
    init: Literal["default", "xavier"] = Field(
        "default", description="default: PyTorch's per-layer init; xavier: Glorot uniform weights, zero biases")
    config: dict[str, Any] | None = Field(
        None, description="causal_lm: a transformers config (model_type, llama by default, and its sizes), "
                          "randomly initialised from the seed")
    path: str | None = Field(None, description="causal_lm: a local transformers model directory")
    adapter: AdapterConfig = AdapterConfig()
    base_quant: Literal["none", "int8", "int4"] = Field(
        "none", description="causal_lm with an adapter: the frozen base's linear layers stored as integers")

    @model_validator(mode="after")
    def _language_model_source(self) -> ModelConfig:
        if self.name == "causal_lm" and (self.config is None) == (self.path is None):
            raise ValueError("model.name 'causal_lm' needs exactly one of model.config (a transformers config) or "
                             "model.path (a local model directory)")
        return self


# ----------------------------------------------------------------- client training
class AdversarialConfig(Section):
    """Adversarial training of the clients (federated adversarial learning, FAL: Li, Song and
    Yang, "Federated Adversarial Learning: A Framework with Convergence Analysis", ICML 2023,
    arXiv 2208.03635; :mod:`fedsim.clients.adversarial`).

    Each local step first attacks its batch (the inner loop: ``steps`` steps of projected
    gradient ascent of the cross entropy on the inputs, Madry et al. 2018, arXiv 1706.06083),
    then trains on the attacked batch (the outer loop). ``pgd`` starts at a uniform random
    point of the ``epsilon``-ball (``random_start``); ``fgsm`` is PGD with one step of size
    ``epsilon`` from the clean input (Goodfellow et al. 2015): its ``steps`` and
    ``step_size`` resolve to 1 and ``epsilon``. ``step_size`` unset is ``2.5 epsilon / steps``
    (Madry et al.'s choice). ``norm``: ``linf`` steps by the gradient's sign and clamps each
    coordinate to [-epsilon, epsilon]; ``l2`` steps along the per-sample unit gradient and
    rescales onto the l2 ball.
    """

    method: Literal["pgd", "fgsm"] = "pgd"
    epsilon: float = Field(0.1, gt=0, description="radius of the perturbation ball")
    steps: int | None = Field(None, ge=1, description="pgd: attack steps per batch (unset: 10); fgsm: 1")
    step_size: float | None = Field(None, gt=0, description="unset: 2.5 * epsilon / steps (pgd), epsilon (fgsm)")
    norm: Literal["linf", "l2"] = "linf"
    random_start: bool | None = Field(None, description="pgd: start at a random point of the ball "
                                                        "(unset: true); fgsm: false")

    @model_validator(mode="after")
    def _resolve(self) -> AdversarialConfig:
        if self.method == "fgsm":
            for key, value, allowed in (("steps", self.steps, 1), ("step_size", self.step_size, self.epsilon),
                                        ("random_start", self.random_start, False)):
                if value is not None and value != allowed:
                    raise ValueError(f"method fgsm is one step of size epsilon from the clean input; {key} "
                                     f"{value!r} cannot combine with it (use method pgd, or leave {key} unset)")
            steps, step_size, random_start = 1, self.epsilon, False
        else:
            steps = self.steps or 10
            step_size = self.step_size or 2.5 * self.epsilon / steps
            random_start = True if self.random_start is None else self.random_start
        # set through __dict__: assignment would validate the whole section again
        self.__dict__.update(steps=steps, step_size=step_size, random_start=random_start)
        return self


class ClientConfig(Section):
    """The local training loop every client runs."""

    local_epochs: int = Field(1, ge=1)
    local_steps: int | None = Field(None, ge=1, description="if set, overrides local_epochs")
    batch_size: int = Field(32, ge=1)
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    timeout_s: float = Field(120.0, gt=0, description="a reply later than this is a failure")
    adversarial: AdversarialConfig | None = Field(None, description="train on adversarial examples (FAL)")

    @model_validator(mode="after")
    def _momentum_for_sgd(self) -> ClientConfig:
        if self.optimizer == "adam" and self.momentum > 0:
            raise ValueError(f"momentum {self.momentum} is SGD's heavy-ball momentum, which optimizer adam does "
                             "not use; set client.momentum: 0")
        return self

class AuxLossConfig(Section):
    """An auxiliary loss term added to the main loss with a weight."""

    name: str
    weight: float = Field(1e-4, ge=0)


class LossConfig(BaseModel):
    """``loss: {name: ..., <kwargs>}``; kwargs are checked against the loss's constructor."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    name: str = "cross_entropy"
    aux: AuxLossConfig | None = None

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    @model_validator(mode="after")
    def _known_loss_and_kwargs(self) -> LossConfig:
        # the registry is the source of truth for names
        from fedsim.losses.registry import REGISTRY, unknown_loss_message

        for where, name, kwargs in (("name", self.name, self.kwargs),
                                    ("aux.name", self.aux.name if self.aux else None, {})):
            if name is None:
                continue
            if name not in REGISTRY:
                raise ValueError(f"{where}: {unknown_loss_message(name)}")
            params = inspect.signature(REGISTRY[name]).parameters
            allowed = [p for p in params if p not in ("self", "num_samples")]
            unknown = [k for k in kwargs if k not in allowed]
            if unknown:
                raise ValueError(f"unknown argument(s) {', '.join(unknown)} for {name!r}; "
                                 f"allowed: {', '.join(allowed) or '(none)'}")
            infinite = [k for k, v in kwargs.items() if isinstance(v, float) and not math.isfinite(v)]
            if infinite:
                raise ValueError(f"{infinite[0]}: {kwargs[infinite[0]]} is not a finite number")
            # build it once, so a bad value (tau: -1) stops here and not in every client
            try:
                REGISTRY[name](**kwargs, **({"num_samples": 1} if "num_samples" in params else {}))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{name!r}: {exc}") from None
        return self


# ------------------------------------------------------------------------ quantization
class QATSettings(Section):
    """Quantization-aware training of the client model (fedsim.quant.prepare_qat).

    QAT switches on after ``start_fraction`` of the run's rounds (train in float first,
    then quantized: the compute-optimal QAT schedule applied to the federated run).
    """

    weight_bits: Literal[2, 4, 8] = 8
    granularity: Literal["per_channel", "per_tensor"] = "per_channel"
    symmetric: bool = True
    activation_bits: Literal[2, 4, 8] | None = None
    lsq: bool = False
    start_fraction: float = Field(0.0, ge=0, lt=1)


class LowBitSettings(Section):
    """Low-bit training: quantized forward and backward, stochastic gradient rounding."""

    bits: int = Field(8, ge=2, le=8)
    grad_bits: int = Field(8, ge=2, le=8)


class LinkSettings(Section):
    """A codec for one direction of traffic, with optional error feedback (uplink only)."""

    codec: Literal["identity", "float16", "qsgd", "topk", "randk", "sign"] = "identity"
    bits: Literal[2, 4, 8] = Field(8, description="qsgd")
    block_size: int = Field(256, ge=1, description="qsgd")
    fraction: float | None = Field(None, gt=0, le=1, description="topk / randk")
    error_feedback: Literal["none", "ef", "ef21", "econtrol"] = "none"
    eta: float | None = Field(None, ge=0, description="econtrol: about k/d of the compressor")

    @model_validator(mode="after")
    def _complete(self) -> LinkSettings:
        if self.codec in ("topk", "randk") and self.fraction is None:
            raise ValueError(f"fraction is required for codec {self.codec!r}")
        if self.error_feedback == "econtrol" and self.eta is None:
            raise ValueError("eta is required for error_feedback 'econtrol'")
        return self

    def codec_kwargs(self) -> dict[str, Any]:
        """The arguments of ``fedsim.quant.codecs.build`` for this codec."""
        if self.codec == "qsgd":
            return {"bits": self.bits, "block_size": self.block_size}
        if self.codec in ("topk", "randk"):
            return {"fraction": self.fraction}
        return {}


class PTQSettings(Section):
    """Post-training weight quantization of the final global model, reported beside float."""

    method: Literal["rtn", "awq"] = "rtn"
    bits: int = Field(4, ge=2, le=8)
    calibration_samples: int = Field(256, ge=1, description="awq")


class QuantConfig(Section):
    """``quant: {qat, lowbit, uplink, downlink, ptq}``; everything off by default."""

    qat: QATSettings | None = None
    lowbit: LowBitSettings | None = None
    uplink: LinkSettings = LinkSettings()
    downlink: LinkSettings = LinkSettings()
    ptq: PTQSettings | None = None

    @model_validator(mode="after")
    def _consistent(self) -> QuantConfig:
        if self.qat is not None and self.lowbit is not None:
            raise ValueError("qat and lowbit are alternatives; set one")
        if self.downlink.error_feedback != "none":
            raise ValueError("downlink.error_feedback: error feedback applies to the uplink only")
        if self.downlink.codec not in ("identity", "float16", "qsgd"):
            raise ValueError(f"downlink.codec: {self.downlink.codec!r} cannot carry a whole model; "
                             "use identity, float16 or qsgd")
        return self


class ParticipationConfig(Section):
    """Which clients take part each round (fedsim.strategies.participation).

    uniform: ``strategy.fraction_train`` of the clients, uniformly; bernoulli: client i
    independently with probability p_i drawn uniformly in [p_low, p_high], or tied to its
    label mix (``tied_to_labels``, mean ``p_mean``); markov: on/off chains with stationary
    probabilities as bernoulli's and ``p_off_to_on``; cyclic: ``num_groups`` groups in turn.
    """

    model: Literal["uniform", "bernoulli", "markov", "cyclic"] = "uniform"
    p_low: float = Field(0.02, gt=0, le=1)
    p_high: float = Field(0.5, gt=0, le=1)
    tied_to_labels: bool = False
    p_mean: float = Field(0.1, gt=0, le=1)
    p_off_to_on: float = Field(0.05, gt=0, le=1)
    label_concentration: float = Field(
        0.1, gt=0, description="tied_to_labels: Dirichlet concentration of the class weights")
    num_groups: int = Field(4, ge=1)


class AttackConfig(Section):
    """Byzantine clients: a fixed, seeded ``fraction`` of them run ``name``.

    Update attacks (sign_flip, scaled, gaussian, alie, ipm) replace the Byzantine rows of
    the round's updates on the server, knowing the honest ones (omniscient attacker);
    label_flip makes Byzantine clients train on flipped labels.
    """

    name: Literal["none", "sign_flip", "scaled", "gaussian", "alie", "ipm", "label_flip"] = "none"
    fraction: float = Field(0.0, ge=0, lt=0.5)
    scale: float | None = Field(None, description="sign_flip, scaled")
    std: float | None = Field(None, gt=0, description="gaussian")
    z: float | None = Field(None, description="alie; None uses the paper's formula")
    epsilon: float | None = Field(None, description="ipm")

    def kwargs(self) -> dict[str, float]:
        """The set parameters, as ``fedsim.attacks.build_attack`` takes them."""
        return {k: v for k in ("scale", "std", "z", "epsilon") if (v := getattr(self, k)) is not None}


# ----------------------------------------------------------------------- simulation
class SpeedConfig(Section):
    """Simulated device speeds (local updates per unit of virtual time); see fedsim.sim.speeds."""

    kind: Literal["linear", "lognormal", "two_tier", "csv"] = "linear"
    spread: float = Field(0.8, ge=0, description="linear: fastest is (1 + spread) x slowest")
    sigma: float = Field(0.5, gt=0, description="lognormal")
    slow_fraction: float = Field(0.5, ge=0, le=1, description="two_tier")
    slow_factor: float = Field(4.0, ge=1, description="two_tier")
    path: str | None = Field(None, description="csv: a file with a 'speed' column")
    network_delay: float = Field(0.0, ge=0)
    dropout: float = Field(0.0, ge=0, lt=1, description="probability a client's update is lost")

    @model_validator(mode="after")
    def _csv_needs_path(self) -> SpeedConfig:
        if self.kind == "csv" and not self.path:
            raise ValueError("path: required for kind 'csv' (a file with a 'speed' column)")
        return self


class SimConfig(Section):
    """Where and how clients run.

    ``backend``: ``ray`` is Flower's simulation engine (local Ray, or a cluster), with
    ``clients_per_node`` clients served by each engine node (trained together, stacked);
    ``inprocess`` runs the clients in the driver process one after another, without Ray;
    ``batched`` runs them in the driver process and trains each round's clients together,
    their models stacked (fedsim.clients.batched).
    """

    backend: Literal["ray", "inprocess", "batched"] = "ray"
    clients_per_node: int = Field(1, ge=1, description="ray: partitions each Flower node serves")
    num_cpus_per_client: float = Field(
        1.0, gt=0, description="ray: CPUs per client, and torch threads of a worker process (at least 1); "
                               "inprocess and batched leave the driver's threads as they are")
    num_gpus_per_client: float = Field(0.0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    ray_address: str | None = Field(None, description="attach to an existing Ray cluster")
    wait_for_nodes_s: float = Field(120.0, gt=0)
    speeds: SpeedConfig = SpeedConfig()
    clock: Literal["virtual", "wall"] = Field(
        "virtual", description="async loops: simulated device times, or real time (deployment)")
    concurrency: int | None = Field(None, ge=1, description="clients training at once (async)")
    client_state_mb: float = Field(
        1024.0, ge=0, description="the run's client states held in memory by the server's process (every "
                                  "backend), and as much again of the server's EF21/EControl estimates; the least "
                                  "recently used beyond it spill to the run directory")

    @model_validator(mode="after")
    def _grouping_needs_ray(self) -> SimConfig:
        if self.clients_per_node > 1 and self.backend != "ray":
            raise ValueError(f"clients_per_node: groups clients on Flower nodes under backend 'ray'; "
                             f"backend is {self.backend!r}")
        return self


class RobustEvalConfig(Section):
    """Robust accuracy of the global model (row key ``robust_accuracy``): its accuracy on the
    server's test set attacked by PGD (:func:`fedsim.clients.adversarial.pgd`) with
    ``steps`` steps of ``step_size`` (unset: ``2.5 epsilon / steps``) in the ``norm`` ball of
    radius ``epsilon``, from a random start of the ball (``random_start``). Unset while
    ``client.adversarial`` is set, it is the clients' attack."""

    epsilon: float = Field(0.1, gt=0)
    steps: int = Field(10, ge=1)
    step_size: float | None = Field(None, gt=0, description="unset: 2.5 * epsilon / steps")
    norm: Literal["linf", "l2"] = "linf"
    random_start: bool = True

    @model_validator(mode="after")
    def _resolve(self) -> RobustEvalConfig:
        if self.step_size is None:
            self.__dict__["step_size"] = 2.5 * self.epsilon / self.steps
        return self


class EvalConfig(Section):
    """Centralised (server test set) and federated (client test splits) evaluation."""

    every: int = Field(1, ge=1)
    centralised: bool = True
    federated: bool = True
    batch_size: int = Field(512, ge=1)
    robust: RobustEvalConfig | None = Field(None, description="robust_accuracy under PGD; unset: the "
                                                              "clients' attack when client.adversarial is set")
    new_clients: float = Field(0.0, ge=0, lt=1, description="fraction of the clients held out of training, evaluated "
                                                            "after personalising from the global model")
    federated_fraction: float | None = Field(
        None, gt=0, le=1, description="clients drawn afresh (seeded) for each federated evaluation; unset: "
                                      "strategy.fraction_evaluate's first clients")
    test_samples: int | None = Field(
        None, ge=1, description="the server's test set: a seeded sample of this many held-out rows; unset: all")


class FaultConfig(Section):
    """Faults injected into chosen clients, to exercise failure handling (off by default)."""

    crash: list[int] = Field(default_factory=list, description="partition ids that raise")
    slow: list[int] = Field(default_factory=list, description="partition ids that stall")
    slow_s: float = Field(0.0, ge=0, description="how long a slow client stalls")
    nan: list[int] = Field(default_factory=list, description="partition ids that send NaN")
    wrong_shape: list[int] = Field(default_factory=list, description="ids that send a short update")
    drop_after_keys: list[int] = Field(default_factory=list, description="secagg: ids that share their keys, then "
                                                                           "drop before sending their masked input")
    rounds: list[int] | None = Field(None, description="rounds the faults apply to; None = all")

    def dropped_after_keys(self, partition_id: int, server_round: int) -> bool:
        """Whether this client shares its secure-aggregation keys in this round and then drops
        before sending its masked input (``drop_after_keys``)."""
        return (self.rounds is None or server_round in self.rounds) and partition_id in self.drop_after_keys


class SecAggConfig(Section):
    """Secure aggregation (:mod:`fedsim.secagg`): SecAgg+ (Bell et al. 2020, CCS'20) over
    Bonawitz et al. 2017's pairwise masks. The server learns only the sum of the round's
    weighted updates, quantised to ``bits`` bits over ``[-value_range, value_range]`` and
    summed in Z_(2^32); clients that drop after sharing their keys are recovered while a
    ``threshold`` share of each one's neighbours replies. For the synchronous strategies
    whose aggregate is a weighted sum of the updates.
    """

    enabled: bool = False
    bits: int = Field(20, ge=1, le=31, description="quantisation levels per coordinate: 2^bits; "
                                                   "bits + ceil(log2 clients per round) <= 32")
    value_range: float = Field(1.0, gt=0, description="update coordinates are quantised over "
                                                      "[-value_range, value_range]")
    out_of_range: Literal["clip", "withhold"] = Field(
        "clip", description="a coordinate outside the range: clip it (counted in the row, a warning line) or "
                            "withhold the client's input (it drops out, counted in the row)")
    degree: int | None = Field(None, ge=2, description="SecAgg+: each client masks with this many neighbours "
                                                       "(even); unset: with every other client (SecAgg)")
    threshold: float = Field(0.5, ge=0.5, lt=1, description="shares that rebuild a client's secrets: more than "
                                                            "this fraction of its neighbours")

    @field_validator("degree")
    @classmethod
    def _even(cls, degree: int | None) -> int | None:
        if degree is not None and degree % 2:
            raise ValueError(f"a Harary graph's degree is even (k/2 neighbours on either side); got {degree}")
        return degree


class OutputConfig(Section):
    """Where results go: ``<dir>/<name>-<timestamp>/``."""

    dir: str = "runs"
    checkpoint_every: int = Field(5, ge=1)
    plots: bool = True
    target_accuracy: float = Field(0.9, gt=0, le=1, description="for rounds-to-target")





class PersonalizationConfig(Section):
    """Personal models per client, orthogonal to the global aggregator
    (:mod:`fedsim.clients.personalization`). Each method reads only its own keys.

    ``finetune`` (FedAvg-FT) fine-tunes the global model ``finetune_steps`` steps on the
    client's train split before evaluating it; ``fedper`` keeps the ``head`` layers personal
    and trains them with the body; ``fedrep`` trains the personal head ``head_steps`` steps
    with the body frozen, then the body with the head frozen; ``ditto`` trains a personal
    model beside the global update, regularised toward the global model by ``lam``; ``apfl``
    trains a personal model mixed with the global one by ``alpha``, learned with step ``alpha_lr``.
    """

    method: Literal["none", "finetune", "fedper", "fedrep", "ditto", "fedbn", "apfl"] = "none"
    finetune_steps: int = Field(10, ge=1, description="finetune: local steps before evaluation")
    head: list[str] = Field(default_factory=lambda: ["head"],
                            description="fedper, fedrep: the personal layers (module names); the last layer by default")
    head_steps: int = Field(5, ge=1, description="fedrep: head steps (body frozen) before the body's")
    lam: float = Field(0.1, ge=0, description="ditto: pull of the personal model toward the global one")
    alpha: float = Field(0.25, ge=0, le=1, description="apfl: each client's first mixing weight of its personal model")
    alpha_lr: float = Field(0.1, ge=0, description="apfl: step size of alpha's gradient step; 0 keeps alpha fixed")


class HierarchyConfig(Section):
    """Hierarchical FL: clients aggregate at ``num_edges`` edge servers (gateways) for
    ``edge_rounds`` edge aggregations, then the gateways' models at the cloud, once per round
    (SemSpaceFL: Nguyen et al., "SemSpaceFL: A Collaborative Hierarchical Federated Learning
    Framework for Semantic Communication in 6G LEO Satellites", arXiv 2505.00966;
    :mod:`fedsim.loops.hierarchical`, :mod:`fedsim.strategies.hierarchy`).

    The edge tier is ``strategy`` (any synchronous algorithm, one instance per gateway); the
    cloud tier is the aggregation of the algorithm ``cloud`` (a registered synchronous one
    whose math reads only the updates and their weights, with its default arguments) over the
    gateways' updates. ``rounds`` counts cloud rounds; what clients see as their round (the
    seeds of their training, ``faults.rounds``) counts edge rounds, 1-based.
    ``association``: ``static`` puts client k at gateway k mod num_edges for the whole run;
    ``orbits`` moves each client along a circular orbit of ``orbit_period`` edge rounds (its
    phase seeded), past gateways equally spaced on it, each in contact over ``contact_width``
    of the orbit: a client trains in an edge round only when it is in contact with a gateway.
    ``weighting``: ``samples`` weighs a client by its samples n_k at its gateway and a gateway
    by the samples of the clients it aggregated in the round; ``semspacefl`` scales client k's
    weight at gateway g by its association a_kg (the share of the round's edge rounds it is
    in contact with g), and weighs gateway g by sum_k n_k a_kg.
    """

    num_edges: int = Field(2, ge=1)
    edge_rounds: int = Field(1, ge=1, description="edge aggregations per cloud round")
    weighting: Literal["samples", "semspacefl"] = "samples"
    association: Literal["static", "orbits"] = "static"
    orbit_period: float = Field(8.0, gt=0, description="orbits: edge rounds per orbit")
    contact_width: float | None = Field(None, gt=0, le=1, description="orbits: share of an orbit each gateway "
                                                                      "sees (unset: 1 / num_edges, no gaps)")
    cloud: str = Field("fedavg", description="the algorithm whose aggregation combines the gateways' updates")

    @model_validator(mode="after")
    def _resolve(self) -> HierarchyConfig:
        if self.contact_width is None and self.association == "orbits":
            self.__dict__["contact_width"] = 1.0 / self.num_edges
        return self


class ExperimentConfig(Section):
    """A whole experiment: everything a run needs, and nothing else."""

    name: str = Field("experiment", min_length=1, description="the run directory is <output.dir>/<name>-<timestamp>")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="numpy's seeds are 32-bit")
    rounds: int = Field(20, ge=1)
    data: DataConfig = DataConfig()
    partition: PartitionConfig = PartitionConfig()
    model: ModelConfig = ModelConfig()
    # the section of the algorithm that strategy.name registers (fedsim.algorithms.registry)
    strategy: SerializeAsAny[StrategySection] = Field(default_factory=lambda: _algorithm_section({}))
    client: ClientConfig = ClientConfig()
    # a factory: validating a loss imports the loss library (and torch), which importing
    # this module must not
    loss: LossConfig = Field(default_factory=LossConfig)
    quant: QuantConfig = QuantConfig()
    participation: ParticipationConfig = ParticipationConfig()
    attack: AttackConfig = AttackConfig()
    sim: SimConfig = SimConfig()
    eval: EvalConfig = EvalConfig()
    faults: FaultConfig = FaultConfig()
    secagg: SecAggConfig = SecAggConfig()
    personalization: PersonalizationConfig = PersonalizationConfig()
    hierarchy: HierarchyConfig | None = Field(None, description="two-tier aggregation: gateways, then the cloud")
    privacy: PrivacyConfig = PrivacyConfig()
    output: OutputConfig = OutputConfig()

    @field_validator("strategy", mode="before")
    @classmethod
    def _strategy_of_its_algorithm(cls, value: Any) -> StrategySection:
        return _algorithm_section(value)

    @field_validator("name")
    @classmethod
    def _a_directory_name(cls, name: str) -> str:
        if name in (".", "..") or any(sep in name for sep in ("/", "\\", "\0")):
            raise ValueError("the run directory's name, inside output.dir: no '/', '\\' or '..'")
        return name

    @model_validator(mode="after")
    def _sections_combine(self) -> ExperimentConfig:
        """Resolve ``data.synthetic.num_devices``; refuse settings of two sections that cannot
        work together, in one line naming both keys."""
        part, data = self.partition, self.data
        if data.synthetic.num_devices is None:
            natural = data.name == "synthetic" and part.scheme == "natural"
            data.synthetic.num_devices = part.num_clients if natural else 30
        if data.name == "synthetic" and data.synthetic.on_demand is None:
            data.synthetic.on_demand = part.scheme == "natural"
        if data.synthetic.on_demand and part.scheme != "natural":
            raise ValueError(f"data.synthetic.on_demand: devices are generated one per client, which needs "
                             f"partition.scheme natural; got {part.scheme!r}")
        classes = KNOWN_NUM_CLASSES.get(data.name) or (data.synthetic.num_classes if data.name == "synthetic" else None)
        if part.scheme == "pathological" and classes is not None and part.classes_per_client > classes:
            raise ValueError(f"partition.classes_per_client: {part.classes_per_client} labels per client but "
                             f"data.name {data.name} has {classes} classes; allowed 1..{classes}")
        if part.scheme == "natural" and not (data.name in ("synthetic", "shakespeare") or data.hf_partition_by):
            raise ValueError(f"partition.scheme: natural needs natural client ids, which data.name {data.name} "
                             "does not have; use synthetic, shakespeare, or hf with data.hf_partition_by")
        if part.scheme == "natural" and data.name == "synthetic" and data.synthetic.num_devices != part.num_clients:
            raise ValueError(f"partition.num_clients: {part.num_clients} clients, but a natural partition has one "
                             f"per group and data.synthetic.num_devices is {data.synthetic.num_devices}")
        if data.hf_partition_by is not None and (data.name != "hf" or part.scheme != "natural"):
            raise ValueError("data.hf_partition_by: only data.name hf with partition.scheme natural uses it; "
                             f"got {data.name} with {part.scheme}")
        return self

    @model_validator(mode="after")
    def _robust_eval_of_the_clients_attack(self) -> ExperimentConfig:
        """``eval.robust`` unset under ``client.adversarial``: the clients' attack, where there is
        one global model to attack on the server's test set (not under gossip, nor without
        ``eval.centralised``)."""
        attack = self.client.adversarial
        one_global_model = self.eval.centralised and self.strategy.family != "gossip"
        if attack is not None and self.eval.robust is None and one_global_model:
            self.eval.__dict__["robust"] = RobustEvalConfig(
                epsilon=attack.epsilon, steps=attack.steps, step_size=attack.step_size, norm=attack.norm,
                random_start=attack.random_start)
        return self

    @model_validator(mode="after")
    def _combinations(self) -> ExperimentConfig:
        """What cannot combine, or does not apply to the strategy family (fedsim.config_checks)."""
        problems = combination_problems(self)
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def to_yaml(self) -> str:
        """The resolved config as YAML (what ``config.yaml`` in a run directory holds)."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _algorithm_section(value: Any) -> StrategySection:
    """``strategy:`` validated by the config model of the algorithm its ``name`` registers."""
    if isinstance(value, StrategySection):
        return value
    if not isinstance(value, dict):
        raise SectionErrors(f"strategy: a mapping with a name (one of {', '.join(registry.names())}); "
                            f"got {value!r}")
    name = value.get("name", "fedavg")
    try:
        algorithm = registry.get(name)
    except registry.UnknownAlgorithm as exc:
        raise SectionErrors(f"strategy.name: {exc}") from None
    try:
        return algorithm.Config.model_validate({**value, "name": name})
    except ValidationError as exc:
        raise SectionErrors(format_validation_error(exc, prefix="strategy", root=algorithm.Config)) from None


# ------------------------------------------------------------------------- loading
class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader refusing a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} at line {key_node.start_mark.line + 1}", None)
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(text: str) -> Any:
    """Parse ``text`` as YAML, refusing duplicate keys."""
    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one ``dotted.key=value`` override in place; the value is parsed as YAML."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. strategy.mu=0.01")
    key, text = assignment.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {assignment!r}: empty key segment")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {part!r} holds a value, not a section")
        node = child
    try:
        node[parts[-1]] = read_yaml(text) if text.strip() else None
    except yaml.YAMLError as exc:
        problem = " ".join(str(exc).split())
        raise ConfigError(f"--set {key}: the value is not valid YAML ({problem})") from None


def _locate(loc: tuple[Any, ...], root: type[BaseModel]) -> tuple[str, type[BaseModel] | None]:
    """The key an error location points to, as a user writes it, and the section holding it.

    pydantic puts the class name of a plain union's member into the location; it is not a
    key the user wrote, so it is left out, and the section is the member it names. The
    section is ``None`` once ``loc`` leaves the models (a list index, a free-form mapping).
    """
    model: type[BaseModel] | None = root
    holder: type[BaseModel] | None = None
    path: list[str] = []
    parts = list(loc)
    index = 0
    while index < len(parts):
        part = parts[index]
        index += 1
        holder = model
        path.append(str(part))
        field = model.model_fields.get(part) if model is not None and isinstance(part, str) else None
        candidates = (get_args(field.annotation) or (field.annotation,)) if field is not None else ()
        sections = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        model = sections[0] if sections else None
        if len(sections) > 1 and index < len(parts):
            members = {c.__name__: c for c in sections}
            if parts[index] in members:
                model = members[parts[index]]
                index += 1
    return ".".join(path) or "config", holder


def format_validation_error(exc: ValidationError, prefix: str = "",
                            root: type[BaseModel] | None = None) -> str:
    """One line per problem: ``key: what is wrong (got value)``.

    An unknown key lists the keys of the section it was found in; under ``strategy`` those
    are the keys of the algorithm that ``strategy.name`` chose. ``root`` is the model that
    was validated (the experiment by default), ``prefix`` the key it sits under.
    """
    lines = []
    for err in exc.errors():
        key, section = _locate(tuple(err["loc"]), root or ExperimentConfig)
        key = ".".join(part for part in (prefix, key if err["loc"] else "") if part) or key
        msg = err["msg"].removeprefix("Value error, ")
        if isinstance(err.get("ctx", {}).get("error"), SectionErrors):
            lines.extend(str(err["ctx"]["error"]).splitlines())
        elif err["type"] == "bool_for_number":  # raised by a section for one of its keys
            where = key if err["loc"] else prefix
            lines.append(f"{where}.{err['msg']}" if where else err["msg"])
        elif err["type"] == "finite_number":
            lines.append(f"{key}: {err['input']!r} is not a finite number; infinity and nan mean nothing here")
        elif not err["loc"] and err["type"] == "value_error" and not prefix:
            lines.extend(msg.splitlines())  # a check across sections: its message names the keys
        elif err["type"] == "extra_forbidden":
            allowed = sorted(section.model_fields) if section is not None else []
            lines.append(f"{key}: unknown key; allowed here: {', '.join(allowed)}")
        else:
            got = err.get("input")
            suffix = "" if isinstance(got, dict) or got is None else f" (got {got!r})"
            lines.append(f"{key}: {msg}{suffix}")
    return "\n".join(lines)


def validate_config(raw: dict[str, Any]) -> ExperimentConfig:
    """Validate a raw mapping into an :class:`ExperimentConfig` or raise :class:`ConfigError`."""
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Load a YAML experiment file, apply ``--set`` overrides, validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        raw = read_yaml(path.read_text()) or {}
    except yaml.YAMLError as exc:
        problem = " ".join(str(exc).split())
        raise ConfigError(f"{path}: not valid YAML: {problem}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for assignment in overrides:
        apply_override(raw, assignment)
    return validate_config(raw)

"""Building the pieces of a run from its config: data, partitions, model, objective.

Both the ServerApp (in the driver process) and every ClientApp (in Ray workers) build
what they need from the same config, so each piece is a deterministic function of the
config and the seed. The federated dataset is cached per process: a Ray worker loads and
partitions the data once and then serves every client call from memory.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from fedsim import losses
from fedsim.clients.hooks import ClientHook
from fedsim.clients.objective import ClientObjective
from fedsim.config import (
    DataConfig,
    ExperimentConfig,
    ModelConfig,
    PartitionConfig,
    SpeedConfig,
)
from fedsim.data import ArrayDataset, load_dataset
from fedsim.data import cache as partition_cache
from fedsim.data.array_dataset import split_train_test
from fedsim.data.client_cache import ClientCache
from fedsim.data.domains import domain_split
from fedsim.data.partition import (
    FeatureNoise,
    label_histograms,
    noise_scales,
    partition_indices,
    split_client,
)
from fedsim.data.synthetic import SyntheticDevices
from fedsim.models import build_model
from fedsim.models.init import xavier_init
from fedsim.seeding import derive_seed
from fedsim.sim.on_demand import OnDemandSynthetic, held_out_rows
from fedsim.sim.speeds import client_speeds


@dataclass(frozen=True)
class FederatedData:
    """The server's held-out test set and each client's train/test indices into ``train``
    (clean inputs), and the feature noise the clients' inputs take, if any.

    A federation's interface, which :class:`~fedsim.sim.on_demand.OnDemandSynthetic` shares:
    ``client``, ``test``, ``num_clients``, ``num_classes``, ``input_shape``, ``train_sizes``,
    ``label_counts``, ``calibration_inputs``.
    """

    train: ArrayDataset
    test: ArrayDataset
    client_train: tuple[np.ndarray, ...]
    client_test: tuple[np.ndarray, ...]
    noise: FeatureNoise | None = None
    unlabelled: tuple[np.ndarray, ...] | None = None  # partition.scheme domains: the target domain's indices
    cache: ClientCache | None = None

    @property
    def num_clients(self) -> int:
        return len(self.client_train)

    @property
    def num_classes(self) -> int:
        return self.train.num_classes

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.train.input_shape

    def train_sizes(self) -> np.ndarray:
        """Each client's number of training rows."""
        return np.array([len(idx) for idx in self.client_train], dtype=np.int64)

    def label_counts(self, with_test: bool = False) -> np.ndarray:
        """Each client's label counts in its training split, or its whole partition
        ``with_test`` (clients x classes)."""
        parts = (self.client_train if not with_test else
                 [np.concatenate([a, b]) for a, b in zip(self.client_train, self.client_test, strict=True)])
        return label_histograms(self.train.y, parts, self.num_classes)

    def calibration_inputs(self, count: int) -> np.ndarray:
        """The first ``count`` training inputs of the pool."""
        return self.train.x[:count]

    def client(self, partition_id: int, server_round: int | None = None) -> tuple[ArrayDataset, ArrayDataset]:
        """The client's (train, test) data as it sees it in ``server_round``: with feature
        noise, its inputs plus that round's draw (``server_round`` needed when the noise is
        drawn every round)."""
        if not 0 <= partition_id < len(self.client_train):
            raise ValueError(f"partition id {partition_id} out of range 0..{len(self.client_train) - 1}")
        if self.cache is None:
            train, test = self._clean(partition_id)
        else:
            train, test = self.cache.get(partition_id, lambda: self._clean(partition_id))
        if self.noise is None:
            return train, test
        return (replace(train, x=self.noise.apply(train.x, partition_id, server_round, "train")),
                replace(test, x=self.noise.apply(test.x, partition_id, server_round, "test")))

    def _clean(self, partition_id: int) -> tuple[ArrayDataset, ArrayDataset]:
        return self.train.subset(self.client_train[partition_id]), self.train.subset(self.client_test[partition_id])


def load_source(data: DataConfig, seed: int) -> tuple[ArrayDataset, ArrayDataset]:
    """Load the configured dataset as (train pool, server test set); with
    ``data.validation_fraction`` the second is a seeded, stratified validation split of the
    train pool, which the clients then do not hold, and the test set is not used."""
    options = data.synthetic.model_dump(exclude={"on_demand"}) if data.name == "synthetic" else {}
    if data.name == "shakespeare":
        options = {"min_samples": data.min_samples, "stride": data.stride}
        if data.tokenizer is not None:
            options = {"min_samples": data.min_samples, "tokenizer": data.tokenizer.model_dump(), "seq_len": data.seq_len}
    if data.name == "hf":
        options = {"image_key": data.hf_image_key, "label_key": data.hf_label_key, "test_split": data.hf_test_split,
                   **({"group_key": data.hf_partition_by} if data.hf_partition_by else {})}
    train, test = load_dataset(data.name, path=data.path, hf_id=data.hf_id, seed=seed,
                               test_fraction=data.test_fraction, **options)
    if data.validation_fraction:
        return split_train_test(train, data.validation_fraction, derive_seed(seed, "validation"))
    return train, test


Federation = FederatedData | OnDemandSynthetic


@functools.lru_cache(maxsize=4)
def _federated_data(data_json: str, partition_json: str, seed: int, test_samples: int | None) -> Federation:
    data = DataConfig.model_validate_json(data_json)
    part = PartitionConfig.model_validate_json(partition_json)
    cache = ClientCache(int(data.client_cache_mb * 2**20))
    if data.name == "synthetic" and data.synthetic.on_demand:
        devices = SyntheticDevices(**data.synthetic.model_dump(exclude={"on_demand"}), seed=seed,
                                   test_fraction=data.test_fraction)
        return OnDemandSynthetic(devices, part.client_test_fraction, seed, test_samples, cache)
    federation = _partitioned(data_json, partition_json, seed)
    rows = held_out_rows(len(federation.test), test_samples, seed)
    federation = replace(federation, cache=cache, test=federation.test if rows is None else federation.test.subset(rows))
    if part.scheme != "feature_noise":
        return federation
    scales = tuple(noise_scales(part.noise_std, part.num_clients))
    return replace(federation, noise=FeatureNoise(scales, derive_seed(seed, "feature-noise"), part.noise_draw))


@partition_cache.cached(FederatedData)  # on disk too, where a deployed node turned it on
def _partitioned(data_json: str, partition_json: str, seed: int) -> FederatedData:
    data = DataConfig.model_validate_json(data_json)
    part = PartitionConfig.model_validate_json(partition_json)
    train, test = load_source(data, seed)
    if part.scheme == "domains":
        split = domain_split(train, test, part.domains, part.target_domain, part.num_clients, seed)
        splits = [split_client(idx, part.client_test_fraction, derive_seed(seed, "client-split", i))
                  for i, idx in enumerate(split.clients)]
        return FederatedData(split.train, split.test, tuple(s[0] for s in splits), tuple(s[1] for s in splits),
                             unlabelled=(split.target,))
    parts = partition_indices(
        train.y, part.scheme, part.num_clients, seed, alpha=part.alpha,
        shards_per_client=part.shards_per_client, quantity_alpha=part.quantity_alpha,
        min_size=part.min_size, classes_per_client=part.classes_per_client, groups=train.groups,
    )
    splits = [split_client(idx, part.client_test_fraction, derive_seed(seed, "client-split", i))
              for i, idx in enumerate(parts)]
    return FederatedData(train, test, tuple(s[0] for s in splits), tuple(s[1] for s in splits))


def federated_data(cfg: ExperimentConfig) -> Federation:
    """The run's data, partitioned over ``cfg.partition.num_clients`` clients (cached), made
    on demand where ``data.synthetic.on_demand``; the server's test set bounded by
    ``eval.test_samples``."""
    return _federated_data(cfg.data.model_dump_json(), cfg.partition.model_dump_json(), cfg.seed,
                           cfg.eval.test_samples)


def make_model(model: ModelConfig, data: ArrayDataset | Federation, seed: int) -> nn.Module:
    """The configured model for ``data``'s inputs and classes, initialised from ``seed``."""
    torch.manual_seed(seed)
    kwargs = {"mlp": {"hidden": tuple(model.hidden), "norm": model.norm}, "char_lstm": {"hidden_size": model.lstm_hidden},
              "causal_lm": {"config": model.config, "path": model.path, "adapter": model.adapter.model_dump(),
                            "base_quant": model.base_quant}}.get(model.name, {})
    net = build_model(model.name, data.input_shape, data.num_classes, **kwargs)
    return xavier_init(net) if model.init == "xavier" else net


def build_loss(cfg: ExperimentConfig, num_samples: int, per_sample: bool = False
               ) -> tuple[nn.Module, nn.Module | None]:
    """The main loss and the optional auxiliary loss of the config; ``per_sample`` builds
    them with ``reduction="none"`` (the batched trainer masks and averages them itself)."""
    reduction = {"reduction": "none"} if per_sample else {}
    main = losses.build(cfg.loss.name, **_with_samples(cfg.loss.name, {**cfg.loss.kwargs, **reduction}, num_samples))
    aux = None
    if cfg.loss.aux is not None:
        # loss.aux.weight is the only weight of the auxiliary term: a loss's own weight is 1
        own = {"weight": 1.0} if "weight" in loss_parameters(cfg.loss.aux.name) else {}
        aux = losses.build(cfg.loss.aux.name, **_with_samples(cfg.loss.aux.name, {**own, **reduction}, num_samples))
    return main, aux


@functools.cache
def loss_parameters(name: str) -> frozenset[str]:
    """The constructor parameters of the registered loss ``name``."""
    return frozenset(inspect.signature(losses.REGISTRY[name]).parameters)


def _with_samples(name: str, kwargs: dict, num_samples: int) -> dict:
    """Stateful losses keep per-sample state and need the number of samples."""
    return {**kwargs, "num_samples": num_samples} if "num_samples" in loss_parameters(name) else kwargs


def predict_fn(cfg: ExperimentConfig):
    """The loss's own decision rule when it has one (HarmonicLoss), else None (argmax)."""
    return getattr(build_loss(cfg, num_samples=1)[0], "predict", None)


def build_objective(cfg: ExperimentConfig, num_samples: int, hooks: tuple[ClientHook, ...] = (),
                    per_sample: bool = False) -> ClientObjective:
    """The client objective: main loss, weighted auxiliary term and strategy hooks (losses
    per sample for the batched trainer)."""
    main, aux = build_loss(cfg, num_samples, per_sample)
    weight = cfg.loss.aux.weight if cfg.loss.aux else 0.0
    return ClientObjective(main, aux, weight, hooks)


SPEED_PARAMS = {"linear": ("spread",), "lognormal": ("sigma",), "two_tier": ("slow_fraction", "slow_factor"),
                "csv": ("path",)}


@functools.lru_cache(maxsize=4)
def _speeds(speed_json: str, num_clients: int, seed: int) -> np.ndarray:
    speeds = SpeedConfig.model_validate_json(speed_json)
    params = {k: getattr(speeds, k) for k in SPEED_PARAMS[speeds.kind]}
    return client_speeds(speeds.kind, num_clients, derive_seed(seed, "speeds"), **params)


def device_speeds(cfg: ExperimentConfig) -> np.ndarray:
    """Each client's simulated speed (local steps per unit of virtual time), ``sim.speeds``."""
    return _speeds(cfg.sim.speeds.model_dump_json(), cfg.partition.num_clients, cfg.seed)


def resolve_device(cfg: ExperimentConfig) -> torch.device:
    """``sim.device``: auto uses CUDA when present and the client was given a GPU share."""
    if cfg.sim.device == "cuda" or (cfg.sim.device == "auto" and torch.cuda.is_available()
                                    and cfg.sim.num_gpus_per_client > 0):
        return torch.device("cuda")
    return torch.device("cpu")

"""fedsim's own client-side training features, declared as :class:`ClientFeature` s, and the
features of a run: :func:`client_features` composes the algorithm's client half, these where
they apply, and third-party ones registered in the entry-point group ``fedsim.client_features``.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, ClassVar

import torch

from fedsim.algorithms import registry
from fedsim.attacks import build_attack, choose_byzantine
from fedsim.clients.features import ClientContext, ClientFeature
from fedsim.clients.personalization import Personalization
from fedsim.clients.quantization import EF_STATE_KEY, LOCAL_PARAMETERS_KEY
from fedsim.losses import REGISTRY

if TYPE_CHECKING:
    from fedsim.config import ExperimentConfig
    from fedsim.data import ArrayDataset

LOSS_STATE_KEY = "loss-state"
"""Where a client keeps its stateful loss's per-sample buffers (ALDR-KL, SogCLR, iSogCLR)."""


class Loss(ClientFeature):
    """The configured loss (and auxiliary term): its per-sample state, and whether it is a
    mean of per-sample terms, which stacked training needs."""

    state_keys: ClassVar[tuple[str, ...]] = (LOSS_STATE_KEY,)

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.names = {"loss.name": cfg.loss.name, "loss.aux.name": cfg.loss.aux.name if cfg.loss.aux else None}

    @staticmethod
    def applies(cfg: ExperimentConfig) -> bool:
        return True

    def stacked_reason(self, cfg: ExperimentConfig) -> str | None:
        for key, name in self.names.items():
            if name is not None and not getattr(REGISTRY[name], "per_sample", False):
                return f"{key}: {name!r} is not a mean of per-sample terms"
        return None


class QuantizedTraining(ClientFeature):
    """QAT or low-bit training: quantized layers train one client at a time; LSQ's learned
    step sizes are the client's own state."""

    state_keys: ClassVar[tuple[str, ...]] = (LOCAL_PARAMETERS_KEY,)

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.key_name = "quant.qat" if cfg.quant.qat is not None else "quant.lowbit"

    @staticmethod
    def applies(cfg: ExperimentConfig) -> bool:
        return cfg.quant.qat is not None or cfg.quant.lowbit is not None

    def stacked_reason(self, cfg: ExperimentConfig) -> str | None:
        kind = "fake-quantized" if self.key_name == "quant.qat" else "low-bit"
        return f"{self.key_name}: {kind} layers train one client at a time"


class UplinkErrorFeedback(ClientFeature):
    """Error feedback on the compressed uplink: the client's memory is its own state."""

    state_keys: ClassVar[tuple[str, ...]] = (EF_STATE_KEY,)

    def __init__(self, cfg: ExperimentConfig) -> None:
        pass

    @staticmethod
    def applies(cfg: ExperimentConfig) -> bool:
        return cfg.quant.uplink.error_feedback != "none"


class LabelFlip(ClientFeature):
    """The label-flipping attack: Byzantine clients train on flipped labels."""

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.byzantine = set(choose_byzantine(cfg.partition.num_clients, cfg.attack.fraction, cfg.seed))

    @staticmethod
    def applies(cfg: ExperimentConfig) -> bool:
        return cfg.attack.name == "label_flip"

    def train_set(self, ctx: ClientContext, data: ArrayDataset) -> ArrayDataset:
        if ctx.partition_id not in self.byzantine:
            return data
        flip = build_attack("label_flip", num_classes=data.num_classes)
        return dataclasses.replace(data, y=flip(torch.from_numpy(data.y)).numpy())


TRAINING_FEATURES: tuple[type, ...] = (Loss, QuantizedTraining, UplinkErrorFeedback, LabelFlip, Personalization)


def client_features(cfg: ExperimentConfig) -> tuple[ClientFeature, ...]:
    """The features of ``cfg``'s clients: its algorithm's client half, fedsim's training
    features that apply, then registered third-party ones that apply."""
    algorithm = registry.get(cfg.strategy.name)
    features = [algorithm.client] if algorithm.client is not None else []
    features += [feature(cfg) for feature in (*TRAINING_FEATURES, *registry.client_feature_classes()) if feature.applies(cfg)]
    return tuple(features)


def stacked_reason(cfg: ExperimentConfig) -> str | None:
    """Why ``cfg``'s clients cannot train stacked (the first feature that says so), or None."""
    return next((reason for feature in client_features(cfg) if (reason := feature.stacked_reason(cfg))), None)

"""Multilayer perceptron on flattened inputs."""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import pairwise

import torch
from torch import nn

from fedsim.models.classifier import EmbeddingClassifier

NORMS = ("none", "batch", "group", "layer")


class BatchNorm1d(nn.BatchNorm1d):
    """``nn.BatchNorm1d`` that normalises a training batch of one example by its running
    statistics (and leaves them as they are) instead of raising: a client's last batch of an
    epoch can hold a single example."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] == 1:
            return nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                            False, 0.0, self.eps)
        return super().forward(x)


class MLP(EmbeddingClassifier):
    """Fully connected ReLU network; the last hidden layer is the embedding.

    Parameters
    ----------
    input_shape : tuple[int, ...]
        Shape of one sample; it is flattened.
    num_classes : int
        Number of classes.
    hidden : Sequence[int], default (128,)
        Widths of the hidden layers, at least one.
    norm : {"none", "batch", "group", "layer"}, default "none"
        A normalisation layer after each hidden linear layer, before its ReLU: ``batch``
        ``BatchNorm1d`` (running statistics as buffers; a training batch of one uses them), ``group`` ``GroupNorm`` with
        ``gcd(width, 8)`` groups, ``layer`` ``LayerNorm``; the layers FedBN keeps local.
    """

    def __init__(
        self, input_shape: tuple[int, ...], num_classes: int, hidden: Sequence[int] = (128,), norm: str = "none"
    ) -> None:
        super().__init__()
        if len(hidden) == 0 or min(hidden) < 1:
            raise ValueError(f"mlp: hidden must be one or more widths >= 1; got {tuple(hidden)}")
        if norm not in NORMS:
            raise ValueError(f"mlp: norm must be one of {', '.join(NORMS)}; got {norm!r}")
        widths = [math.prod(input_shape), *hidden]
        layers: list[nn.Module] = [nn.Flatten()]
        for width_in, width_out in pairwise(widths):
            layers.append(nn.Linear(width_in, width_out))
            if norm == "batch":
                layers.append(BatchNorm1d(width_out))
            elif norm == "group":
                layers.append(nn.GroupNorm(math.gcd(width_out, 8), width_out))
            elif norm == "layer":
                layers.append(nn.LayerNorm(width_out))
            layers.append(nn.ReLU())
        self.body = nn.Sequential(*layers)
        self._set_head(widths[-1], num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

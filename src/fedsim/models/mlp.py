"""Multilayer perceptron on flattened inputs."""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import pairwise

import torch
from torch import nn

from fedsim.models.classifier import EmbeddingClassifier


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
    """

    def __init__(
        self, input_shape: tuple[int, ...], num_classes: int, hidden: Sequence[int] = (128,)
    ) -> None:
        super().__init__()
        if len(hidden) == 0 or min(hidden) < 1:
            raise ValueError(f"mlp: hidden must be one or more widths >= 1; got {tuple(hidden)}")
        widths = [math.prod(input_shape), *hidden]
        layers: list[nn.Module] = [nn.Flatten()]
        for width_in, width_out in pairwise(widths):
            layers += [nn.Linear(width_in, width_out), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self._set_head(widths[-1], num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

"""A small two-layer convolutional network."""

from __future__ import annotations

import torch
from torch import nn

from fedsim.models.classifier import EmbeddingClassifier, image_shape


class CNN(EmbeddingClassifier):
    """Two 3x3 conv-ReLU-maxpool blocks and one fully connected layer.

    Modelled on the CNN of FedAvg (McMahan et al., arXiv:1602.05629: two conv layers
    of 32 and 64 channels with max pooling, then a fully connected layer), with
    padded 3x3 kernels so that it fits images from 4x4 pixels upward.

    Parameters
    ----------
    input_shape : tuple[int, int, int]
        ``(C, H, W)`` with H and W at least 4.
    num_classes : int
        Number of classes.
    channels : tuple[int, int], default (32, 64)
        Output channels of the two conv layers.
    embedding_dim : int, default 128
        Width of the fully connected layer, the embedding.
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        channels: tuple[int, int] = (32, 64),
        embedding_dim: int = 128,
    ) -> None:
        super().__init__()
        in_channels, height, width = image_shape("cnn", input_shape)
        if min(height, width) < 4:
            raise ValueError(f"cnn: images must be at least 4x4; got {height}x{width}")
        first, second = channels
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, first, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(first, second, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(second * (height // 4) * (width // 4), embedding_dim),
            nn.ReLU(),
        )
        self._set_head(embedding_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

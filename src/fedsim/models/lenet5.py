"""LeNet-5 on images up to 32x32, smaller ones zero-padded to 32x32."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedsim.models.classifier import EmbeddingClassifier, image_shape

_SIDE = 32


class LeNet5(EmbeddingClassifier):
    """LeNet-5 (LeCun et al., 1998) with ReLU and max pooling.

    conv 5x5 (6) - pool - conv 5x5 (16) - pool - fc 120 - fc 84 - head. The network
    is defined on 32x32 inputs; smaller images (8x8 digits, 28x28 MNIST) are
    centred in a 32x32 zero canvas, as the digits setting of the LeNet-5 benchmarks
    pads its 8x8 inputs.

    Parameters
    ----------
    input_shape : tuple[int, int, int]
        ``(C, H, W)`` with H and W at most 32.
    num_classes : int
        Number of classes.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        in_channels, height, width = image_shape("lenet5", input_shape)
        if max(height, width) > _SIDE:
            raise ValueError(f"lenet5: images must be at most 32x32; got {height}x{width}")
        top, left = (_SIDE - height) // 2, (_SIDE - width) // 2
        # F.pad order: (left, right, top, bottom).
        self.padding = (left, _SIDE - width - left, top, _SIDE - height - top)
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 6, kernel_size=5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, kernel_size=5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(16 * 5 * 5, 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
        )
        self._set_head(84, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(F.pad(x, self.padding))

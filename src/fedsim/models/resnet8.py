"""ResNet-8: a three-stage CIFAR-style residual network, one basic block per stage."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedsim.models.classifier import EmbeddingClassifier, image_shape


class BasicBlock(nn.Module):
    """Two 3x3 conv-BatchNorm layers with an identity or 1x1-projection shortcut.

    From "Deep Residual Learning for Image Recognition" (He et al., arXiv:1512.03385).

    Parameters
    ----------
    in_channels : int
        Input channels.
    out_channels : int
        Output channels.
    stride : int, default 1
        Stride of the first conv and of the shortcut.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet8(EmbeddingClassifier):
    """ResNet-8: stem conv, three stages of one ``BasicBlock`` each, global avg pool.

    Stages have ``width``, ``2 * width`` and ``4 * width`` channels, the last two
    with stride 2; adaptive average pooling makes it fit any image size.

    Parameters
    ----------
    input_shape : tuple[int, int, int]
        ``(C, H, W)``.
    num_classes : int
        Number of classes.
    width : int, default 16
        Channels of the stem and the first stage; the embedding has ``4 * width``.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, width: int = 16) -> None:
        super().__init__()
        in_channels, _, _ = image_shape("resnet8", input_shape)
        if width < 1:
            raise ValueError(f"resnet8: width must be >= 1; got {width}")
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            BasicBlock(width, width),
            BasicBlock(width, 2 * width, stride=2),
            BasicBlock(2 * width, 4 * width, stride=2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self._set_head(4 * width, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

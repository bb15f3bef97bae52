"""Soft Dice loss (Milletari et al., 2016) for binary and multi-class classification."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._common import (
    check_binary_targets,
    check_logits,
    check_non_negative,
    one_hot_like,
)


def _soft_dice(probabilities: Tensor, truth: Tensor, smooth: float) -> Tensor:
    """Per-column soft Dice ``(2 sum p g + smooth) / (sum p^2 + sum g^2 + smooth)`` over the batch."""
    overlap = (probabilities * truth).sum(dim=0)
    total = probabilities.square().sum(dim=0) + truth.square().sum(dim=0)
    return (2.0 * overlap + smooth) / (total + smooth)


def dice_loss(logits: Tensor, targets: Tensor, smooth: float = 1.0) -> Tensor:
    """Soft Dice loss; see :class:`DiceLoss`."""
    if logits.dim() == 1 or logits.shape[1] == 1:
        probabilities = torch.sigmoid(logits.reshape(-1))
        return 1.0 - _soft_dice(probabilities, targets.to(probabilities.dtype), smooth)
    probabilities = torch.softmax(logits, dim=1)
    return 1.0 - _soft_dice(probabilities, one_hot_like(logits, targets), smooth).mean()


class DiceLoss(nn.Module):
    """Soft Dice loss (Milletari, Navab & Ahmadi, 2016).

    "V-Net: Fully Convolutional Neural Networks for Volumetric Medical Image Segmentation",
    arXiv:1606.04797. Over the batch, with predicted probabilities p and one-hot truth g:

        Dice = (2 sum_i p_i g_i + smooth) / (sum_i p_i^2 + sum_i g_i^2 + smooth),   loss = 1 - Dice.

    For (B,) or (B, 1) logits it is the binary loss: p = sigmoid(logit) of the positive class,
    targets in {0, 1}. For (B, C) logits with C >= 2 it is multi-class: p = softmax(logits) and
    the loss is one minus the mean of the C per-class Dice scores; predictions are the argmax
    of the logits, hence ``task = "classification"``. ``smooth`` (the usual additive
    smoothing; V-Net itself has none) makes a class absent from the batch, and predicted
    absent, score 1 rather than 0.

    Parameters
    ----------
    smooth : float, default 1.0
        Additive smoothing (>= 0) of numerator and denominator.
    """

    inputs = ("logits", "targets")
    task = "classification"

    def __init__(self, smooth: float = 1.0) -> None:
        super().__init__()
        self.smooth = check_non_negative("smooth", smooth)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        if logits.dim() == 1 or (logits.dim() == 2 and logits.shape[1] == 1):
            check_binary_targets(targets, logits.shape[0], "DiceLoss")
            if not logits.dtype.is_floating_point:
                raise ValueError(f"DiceLoss: logits must be floating point, got {logits.dtype}")
        else:
            check_logits(logits, targets, "DiceLoss")
        return dice_loss(logits, targets, self.smooth)

    def extra_repr(self) -> str:
        return f"smooth={self.smooth}"

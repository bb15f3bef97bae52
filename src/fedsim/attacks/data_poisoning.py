"""Data-level attacks applied by Byzantine clients to their own training data."""

from __future__ import annotations

import torch

__all__ = ["label_flip"]


def label_flip(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Label flipping: ``y -> C - 1 - y``.

    Parameters
    ----------
    labels : torch.Tensor
        Integer class labels in ``[0, C)``, any shape.
    num_classes : int
        Number of classes ``C``.
    """
    if num_classes < 1:
        raise ValueError(f"label_flip: num_classes must be >= 1, got {num_classes}")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"label_flip: labels must be integers, got {labels.dtype}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"label_flip: labels must be in [0, {num_classes})")
    return (num_classes - 1) - labels

"""FedKA's federated voting (Sun et al., arXiv 2203.11635, Section 3): every client's model
labels the target domain's unlabelled inputs; a sample takes the label most clients give it
(ties: the smallest label) when at least a fraction ``threshold`` of the clients agree on it,
and is left out otherwise. The server fine-tunes the global model on the samples kept.
"""

from __future__ import annotations

import torch

__all__ = ["federated_vote"]


def federated_vote(predictions: torch.Tensor, num_classes: int, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(labels, agreed)`` of the samples given ``predictions``, ``(clients, samples)`` class ids:
    ``labels[j]`` the most frequent class of column ``j``, ``agreed[j]`` whether its count is at
    least ``threshold * clients``."""
    counts = torch.nn.functional.one_hot(predictions, num_classes).sum(dim=0)  # (samples, classes)
    labels = counts.argmax(dim=1)  # the first of equal counts: the smallest label
    agreed = counts.max(dim=1).values >= threshold * predictions.shape[0]
    return labels, agreed

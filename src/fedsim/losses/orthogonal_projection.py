"""Orthogonal projection loss of Ranasinghe et al. (2021)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import check_embeddings, check_non_negative, check_targets


def orthogonal_projection_loss(embeddings: Tensor, targets: Tensor, gamma: float = 0.5) -> Tensor:
    """Orthogonal projection loss ``1 - s + gamma * |d|``; see :class:`OrthogonalProjectionLoss`."""
    normalized = F.normalize(embeddings, p=2, dim=1)
    cosine = normalized @ normalized.T
    same = targets.unsqueeze(0) == targets.unsqueeze(1)
    eye = torch.eye(same.shape[0], dtype=torch.bool, device=same.device)
    positive = (same & ~eye).to(cosine.dtype)
    negative = (~same).to(cosine.dtype)
    same_class_mean = (positive * cosine).sum() / positive.sum().clamp_min(1.0)
    different_class_mean = (negative * cosine).sum() / negative.sum().clamp_min(1.0)
    return 1.0 - same_class_mean + gamma * different_class_mean.abs()


class OrthogonalProjectionLoss(nn.Module):
    """Orthogonal projection loss (Ranasinghe et al., 2021).

    "Orthogonal Projection Loss", ICCV 2021, arXiv:2103.14021. On L2-normalised features, with
    s the mean cosine similarity over same-class pairs (i != j) and d the mean cosine similarity
    over different-class pairs of the batch:

        loss = (1 - s) + gamma * |d|,

    which pulls each class together and makes different classes orthogonal. A batch without
    same-class (or different-class) pairs counts that mean as 0. The paper adds it to the
    cross-entropy with a weight; here it is the whole loss, trained on the features.

    Parameters
    ----------
    gamma : float, default 0.5
        Weight of the different-class term (>= 0).
    """

    inputs = ("embeddings", "targets")
    task = "embedding"

    def __init__(self, gamma: float = 0.5) -> None:
        super().__init__()
        self.gamma = check_non_negative("gamma", gamma)

    def forward(self, embeddings: Tensor, targets: Tensor) -> Tensor:
        check_embeddings(embeddings, "OrthogonalProjectionLoss")
        check_targets(targets, embeddings.shape[0], "OrthogonalProjectionLoss")
        return orthogonal_projection_loss(embeddings, targets, self.gamma)

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}"

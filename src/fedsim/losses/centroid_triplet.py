"""Centroid triplet loss of Wieczorek et al. (2021)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._common import check_embeddings, check_non_negative, check_targets


def _distances(points: Tensor, others: Tensor, eps: float) -> Tensor:
    """Euclidean distances ``||points_i - others_j||`` (B, M); eps keeps the gradient finite at 0."""
    squared = (
        points.square().sum(dim=1, keepdim=True) + others.square().sum(dim=1).unsqueeze(0) - 2.0 * points @ others.T
    )
    return (squared.clamp_min(0.0) + eps).sqrt()


def centroid_triplet_loss(embeddings: Tensor, targets: Tensor, margin: float = 0.3, eps: float = 1e-12) -> Tensor:
    """Centroid triplet loss; see :class:`CentroidTripletLoss`."""
    same = (targets.unsqueeze(0) == targets.unsqueeze(1)).to(embeddings.dtype)
    eye = torch.eye(same.shape[0], dtype=embeddings.dtype, device=embeddings.device)
    others_of_class = same - eye
    num_others = others_of_class.sum(dim=1)
    positive_centroid = (others_of_class @ embeddings) / num_others.clamp_min(1.0).unsqueeze(1)
    class_centroid = (same @ embeddings) / same.sum(dim=1, keepdim=True)
    positive_distance = (embeddings - positive_centroid).square().sum(dim=1).add(eps).sqrt()
    negative_distance = _distances(embeddings, class_centroid, eps).masked_fill(same > 0, float("inf"))
    hardest_negative = negative_distance.amin(dim=1)
    valid = (num_others > 0) & torch.isfinite(hardest_negative)
    hinge = torch.relu(positive_distance - hardest_negative + margin)
    return torch.where(valid, hinge, 0.0).sum() / valid.sum().clamp_min(1)


class CentroidTripletLoss(nn.Module):
    """Centroid triplet loss (Wieczorek et al., 2021).

    "On the Unreasonable Effectiveness of Centroids in Image Retrieval", ICONIP 2021,
    arXiv:2104.13643. A triplet loss whose positive and negative are class centroids rather
    than samples. For anchor i of class y_i, with ``c_+`` the mean of the other batch samples of
    class y_i (the anchor left out) and ``c_k`` the mean of the batch samples of class k:

        loss_i = max(0, ||x_i - c_+|| - min_{k != y_i} ||x_i - c_k|| + margin),

    the hardest (nearest) negative centroid, as in the batch-hard triplet loss it replaces;
    averaged over the anchors that have both a positive centroid (another sample of their
    class) and a negative one (another class in the batch). Distances are Euclidean.

    Parameters
    ----------
    margin : float, default 0.3
        Triplet margin (>= 0), the value of the re-identification baselines the paper builds on;
        it is on the scale of the embeddings.
    """

    inputs = ("embeddings", "targets")
    task = "embedding"

    def __init__(self, margin: float = 0.3) -> None:
        super().__init__()
        self.margin = check_non_negative("margin", margin)

    def forward(self, embeddings: Tensor, targets: Tensor) -> Tensor:
        check_embeddings(embeddings, "CentroidTripletLoss")
        check_targets(targets, embeddings.shape[0], "CentroidTripletLoss")
        return centroid_triplet_loss(embeddings, targets, self.margin)

    def extra_repr(self) -> str:
        return f"margin={self.margin}"

"""Harmonic loss of Baek et al. (2025): class probabilities from distances to class centres."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import check_embeddings, check_positive, check_reduction, check_targets


def _log_distances(embeddings: Tensor, classifier: Tensor, eps: float) -> Tensor:
    """(B, C) ``log ||x_b - w_c||_2``, from ``|x|^2 + |w|^2 - 2 x.w`` (no (B, C, d) tensor)."""
    squared = (
        embeddings.square().sum(dim=1, keepdim=True)
        + classifier.square().sum(dim=1).unsqueeze(0)
        - 2.0 * embeddings @ classifier.T
    )
    return 0.5 * torch.log(squared.clamp_min(0.0) + eps)


def harmonic_logits(
    embeddings: Tensor, classifier: Tensor, exponent: float | None = None, eps: float = 1e-12
) -> Tensor:
    """Log-probability logits ``-n * log d_k`` of the harmonic max; softmax of them is ``p_k``."""
    n = math.sqrt(embeddings.shape[1]) if exponent is None else exponent
    return -n * _log_distances(embeddings, classifier, eps)


def harmonic_loss(
    embeddings: Tensor,
    classifier: Tensor,
    targets: Tensor,
    exponent: float | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Harmonic loss ``-log p_y`` with ``p_k ∝ d_k^(-n)``; see :class:`HarmonicLoss`."""
    check_reduction(reduction)
    return F.cross_entropy(harmonic_logits(embeddings, classifier, exponent), targets, reduction=reduction)


class HarmonicLoss(nn.Module):
    """Harmonic loss (Baek et al., 2025).

    "Harmonic Loss Trains Interpretable AI Models", arXiv:2502.01628. The classifier's rows
    w_k are class centres; the harmonic logit of class k is the Euclidean distance
    ``d_k = ||x - w_k||_2`` of the features x to it, and the harmonic max

        p_k = d_k^(-n) / sum_j d_j^(-n),      loss = -log p_y,

    with harmonic exponent n, computed as a softmax of ``-n log d_k``. The loss trains the
    features and the head's weight (the centres) together, so the model is a classifier
    (``task = "classification"``), but its class prediction is the nearest centre,
    ``argmin_k d_k`` (:meth:`predict`), not the argmax of the usual dot-product logits
    ``x @ W^T + b``: evaluate it with ``predict(features, head.weight)``.

    Parameters
    ----------
    exponent : float or None, default None
        n > 0; None uses sqrt(d), the paper's choice for d-dimensional features.
    reduction : {"mean", "sum", "none"}, default "mean"
    """

    inputs = ("embeddings", "classifier", "targets")
    per_sample = True
    task = "classification"

    def __init__(self, exponent: float | None = None, reduction: str = "mean") -> None:
        super().__init__()
        self.exponent = None if exponent is None else check_positive("exponent", exponent)
        self.reduction = check_reduction(reduction)

    def _check(self, embeddings: Tensor, classifier: Tensor) -> None:
        check_embeddings(embeddings, "HarmonicLoss")
        check_embeddings(classifier, "HarmonicLoss", name="classifier")
        if classifier.shape[1] != embeddings.shape[1]:
            raise ValueError(
                f"HarmonicLoss: classifier must have shape (C, {embeddings.shape[1]}) to match the embeddings, "
                f"got {tuple(classifier.shape)}"
            )

    def forward(self, embeddings: Tensor, classifier: Tensor, targets: Tensor) -> Tensor:
        self._check(embeddings, classifier)
        check_targets(targets, embeddings.shape[0], "HarmonicLoss")
        return harmonic_loss(embeddings, classifier, targets, self.exponent, self.reduction)

    @torch.no_grad()
    def predict(self, embeddings: Tensor, classifier: Tensor) -> Tensor:
        """Predicted labels (B,): the index of the nearest class centre, ``argmin_k ||x - w_k||``.

        Parameters
        ----------
        embeddings : Tensor
            (B, d) features.
        classifier : Tensor
            (C, d) the head's weight, whose rows are the class centres.
        """
        self._check(embeddings, classifier)
        return _log_distances(embeddings, classifier, eps=0.0).argmin(dim=1)

    def extra_repr(self) -> str:
        return f"exponent={self.exponent}, reduction={self.reduction!r}"

"""AnyLoss (Han, Moniz & Chawla, 2024): confusion-matrix metrics made differentiable."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._common import binary_scores, check_binary_targets, check_positive

METRICS = ("f_beta", "accuracy", "balanced_accuracy")


def any_loss(
    logits: Tensor,
    targets: Tensor,
    metric: str = "f_beta",
    beta: float = 1.0,
    amplifier: float = 73.0,
    eps: float = 1e-5,
) -> Tensor:
    """AnyLoss ``1 - metric(soft confusion matrix)``; see :class:`AnyLoss`.

    ``logits`` are binary scores (B,), (B, 1) or (B, 2) (see ``binary_scores``).
    """
    if metric not in METRICS:
        raise ValueError(f"metric: {metric!r} is not an AnyLoss metric; known: {', '.join(METRICS)}")
    probability = torch.sigmoid(binary_scores(logits, "any_loss"))
    amplified = torch.sigmoid(amplifier * (probability - 0.5))
    truth = targets.to(amplified.dtype)
    positives = truth.sum()
    negatives = (1.0 - truth).sum()
    true_positive = (truth * amplified).sum()
    true_negative = ((1.0 - truth) * (1.0 - amplified)).sum()
    if metric == "accuracy":
        score = (true_positive + true_negative) / (positives + negatives)
    elif metric == "balanced_accuracy":
        score = 0.5 * (true_positive / (positives + eps) + true_negative / (negatives + eps))
    else:
        score = (1.0 + beta**2) * true_positive / (beta**2 * positives + amplified.sum() + eps)
    return 1.0 - score


class AnyLoss(nn.Module):
    """AnyLoss: a confusion-matrix metric turned into a loss (Han, Moniz & Chawla, 2024).

    "AnyLoss: Transforming Classification Metrics into Loss Functions", KDD 2024,
    arXiv:2405.14745. The probability ``p = sigmoid(score)`` is pushed towards 0 or 1 by the
    approximation (amplifying) function ``A(p) = 1 / (1 + exp(-L (p - 0.5)))``; with truth
    y in {0, 1} the batch's soft confusion matrix is

        TP = sum y A,  FN = sum y (1 - A),  FP = sum (1 - y) A,  TN = sum (1 - y)(1 - A),

    and the loss is ``1 - metric``:

        accuracy           (TP + TN) / B
        f_beta             (1 + beta^2) TP / ((1 + beta^2) TP + beta^2 FN + FP)
        balanced_accuracy  (TP / (TP + FN) + TN / (TN + FP)) / 2

    (``eps`` in the denominators avoids 0/0 for a batch without positives or negatives).
    Binary only: logits (B,), (B, 1), or (B, 2) (score = logit_1 - logit_0); targets in {0, 1}.

    Parameters
    ----------
    metric : {"f_beta", "accuracy", "balanced_accuracy"}, default "f_beta"
    beta : float, default 1.0
        beta of F-beta (> 0).
    amplifier : float, default 73.0
        L of the approximation function (> 0), the paper's value.
    """

    inputs = ("logits", "targets")
    task = "binary"

    def __init__(self, metric: str = "f_beta", beta: float = 1.0, amplifier: float = 73.0) -> None:
        super().__init__()
        if metric not in METRICS:
            raise ValueError(f"metric: {metric!r} is not an AnyLoss metric; known: {', '.join(METRICS)}")
        self.metric = metric
        self.beta = check_positive("beta", beta)
        self.amplifier = check_positive("amplifier", amplifier)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        check_binary_targets(targets, logits.shape[0], "AnyLoss")
        return any_loss(logits, targets, self.metric, self.beta, self.amplifier)

    def extra_repr(self) -> str:
        return f"metric={self.metric!r}, beta={self.beta}, amplifier={self.amplifier}"

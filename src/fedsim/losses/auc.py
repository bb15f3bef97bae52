"""Pairwise AUC surrogate: the Wilcoxon-Mann-Whitney statistic with a squared hinge."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._common import check_binary_targets, check_logits, check_non_negative


def _squared_hinge_pairs(scores: Tensor, is_positive: Tensor, margin: float) -> tuple[Tensor, Tensor]:
    """Sum over (positive, negative) pairs of ``max(0, margin - (s_p - s_n))^2`` and the pair count.

    ``scores`` and ``is_positive`` are (B,) or (B, K) (one binary problem per column).
    """
    pairs = is_positive.unsqueeze(1) & ~is_positive.unsqueeze(0)
    hinge = torch.relu(margin - (scores.unsqueeze(1) - scores.unsqueeze(0))).square()
    return torch.where(pairs, hinge, 0.0).sum(dim=(0, 1)), pairs.sum(dim=(0, 1))


def auc_mw_loss(logits: Tensor, targets: Tensor, margin: float = 1.0) -> Tensor:
    """Squared-hinge Wilcoxon-Mann-Whitney AUC surrogate; see :class:`AUCMWLoss`."""
    if logits.dim() == 1 or logits.shape[1] == 1:
        scores = logits.reshape(-1)
        total, count = _squared_hinge_pairs(scores, targets == 1, margin)
        return total / count.clamp_min(1)
    is_positive = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, targets.unsqueeze(1), True)
    total, count = _squared_hinge_pairs(logits, is_positive, margin)
    has_pairs = count > 0
    per_class = torch.where(has_pairs, total / count.clamp_min(1), 0.0)
    return per_class.sum() / has_pairs.sum().clamp_min(1)


class AUCMWLoss(nn.Module):
    """Pairwise AUC loss: squared-hinge surrogate of the Wilcoxon-Mann-Whitney statistic.

    Yan, Dodier, Mozer & Wolniewicz, 2003, "Optimizing Classifier Performance via an
    Approximation to the Wilcoxon-Mann-Whitney Statistic", ICML 2003. The AUC is the fraction
    of (positive, negative) pairs ranked correctly; its surrogate here is

        loss = mean_{p in P, n in N} max(0, margin - (s_p - s_n))^2

    over the batch's pairs, with the scores s the logits. For (B,) or (B, 1) logits the
    problem is binary with targets in {0, 1}. For (B, C) logits with C >= 2 it is one-vs-rest:
    class k's column scores class k against the rest, and the loss is the mean over the classes
    that have both a positive and a negative in the batch. A batch without any pair gives 0.

    Parameters
    ----------
    margin : float, default 1.0
        Required score gap gamma (>= 0); Yan et al.'s R_2 surrogate with p = 2.
    """

    inputs = ("logits", "targets")
    task = "binary"

    def __init__(self, margin: float = 1.0) -> None:
        super().__init__()
        self.margin = check_non_negative("margin", margin)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        if logits.dim() == 1 or (logits.dim() == 2 and logits.shape[1] == 1):
            check_binary_targets(targets, logits.shape[0], "AUCMWLoss")
            if not logits.dtype.is_floating_point:
                raise ValueError(f"AUCMWLoss: logits must be floating point, got {logits.dtype}")
        else:
            check_logits(logits, targets, "AUCMWLoss")
        return auc_mw_loss(logits, targets, self.margin)

    def extra_repr(self) -> str:
        return f"margin={self.margin}"

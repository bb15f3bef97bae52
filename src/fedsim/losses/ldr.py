"""Label-distributionally robust losses of Zhu, Ying & Yang: LDR-KL and adaptive ALDR-KL."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ._common import (
    check_indices,
    check_logits,
    check_non_negative,
    check_num_samples,
    check_positive,
    check_reduction,
    one_hot_like,
    reduce,
)


def _margin_scores(logits: Tensor, targets: Tensor, margin: float) -> Tensor:
    """``delta_{k,y} + s_k - s_y`` with ``delta_{k,y} = margin * [k != y]``; shape (B, K)."""
    one_hot = one_hot_like(logits, targets)
    true_score = (logits * one_hot).sum(dim=1, keepdim=True)
    return margin * (1.0 - one_hot) + logits - true_score


def ldr_kl_loss(
    logits: Tensor, targets: Tensor, lam: float | Tensor = 1.0, margin: float = 2.0, reduction: str = "mean"
) -> Tensor:
    """LDR-KL loss ``lam * log mean_k exp((delta_{k,y} + s_k - s_y) / lam)``; see :class:`LDRKLLoss`.

    ``lam`` is a float or a (B,) tensor of per-sample values (as ALDR-KL uses).
    """
    check_reduction(reduction)
    if isinstance(lam, Tensor):
        lam = lam.to(dtype=logits.dtype).unsqueeze(1)
    scores = _margin_scores(logits, targets, margin)
    per_sample = lam * (torch.logsumexp(scores / lam, dim=1, keepdim=True) - math.log(logits.shape[1]))
    return reduce(per_sample.squeeze(1), reduction)


def aldr_kl_loss(
    logits: Tensor,
    targets: Tensor,
    lam_prev: Tensor,
    lam0: float = 1.0,
    alpha: float = 2.0,
    margin: float = 2.0,
    reduction: str = "mean",
) -> tuple[Tensor, Tensor]:
    """ALDR-KL loss for one batch and the samples' updated lambdas; see :class:`ALDRKLLoss`.

    Parameters
    ----------
    logits, targets : Tensor
        (B, K) scores and (B,) labels.
    lam_prev : Tensor
        (B,) the samples' lambdas from their previous visit (lambda_0 on the first).
    lam0, alpha, margin, reduction
        As in :class:`ALDRKLLoss`.

    Returns
    -------
    (Tensor, Tensor)
        The loss, and the (B,) new lambdas (detached) to store for the next visit.
    """
    check_reduction(reduction)
    num_classes = logits.shape[1]
    with torch.no_grad():
        scores = _margin_scores(logits, targets, margin)
        log_p = torch.log_softmax(scores / lam_prev.to(logits.dtype).unsqueeze(1), dim=1)
        kl_to_uniform = (log_p.exp() * (log_p + math.log(num_classes))).sum(dim=1)
        lam = lam0 * (1.0 - kl_to_uniform / (alpha * math.log(num_classes)))
        penalty = alpha * math.log(num_classes) / (2.0 * lam0) * (lam - lam0).square()
    per_sample = ldr_kl_loss(logits, targets, lam, margin, reduction="none") - penalty
    return reduce(per_sample, reduction), lam


class LDRKLLoss(nn.Module):
    """LDR-KL loss (Zhu, Ying & Yang, 2023).

    "Label Distributionally Robust Losses for Multi-class Classification: Consistency,
    Robustness and Adaptivity", ICML 2023, arXiv:2112.14869. The worst case over label
    distributions p in the simplex, regularised by KL to the uniform distribution:

        loss = max_p sum_k p_k (delta_{k,y} + s_k - s_y) - lambda * KL(p, 1/K)
             = lambda * log( (1/K) sum_k exp((delta_{k,y} + s_k - s_y) / lambda) ),

    with margin ``delta_{k,y} = margin * [k != y]``. With zero margin it equals
    ``lambda * (CE(s / lambda, y) - log K)`` (temperature-scaled cross-entropy).

    Parameters
    ----------
    lam : float, default 1.0
        lambda > 0; large lambda -> uniform worst case (robust to label noise), small lambda ->
        max-margin (top-1 SVM-like).
    margin : float, default 2.0
        delta >= 0 added to the scores of the wrong classes.
    reduction : {"mean", "sum", "none"}, default "mean"
    """

    inputs = ("logits", "targets")
    per_sample = True
    task = "classification"

    def __init__(self, lam: float = 1.0, margin: float = 2.0, reduction: str = "mean") -> None:
        super().__init__()
        self.lam = check_positive("lam", lam)
        self.margin = check_non_negative("margin", margin)
        self.reduction = check_reduction(reduction)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        check_logits(logits, targets, "LDRKLLoss")
        return ldr_kl_loss(logits, targets, self.lam, self.margin, self.reduction)

    def extra_repr(self) -> str:
        return f"lam={self.lam}, margin={self.margin}, reduction={self.reduction!r}"


class ALDRKLLoss(nn.Module):
    """Adaptive LDR-KL loss with a per-sample lambda kept as state (Zhu, Ying & Yang, 2023).

    "Label Distributionally Robust Losses for Multi-class Classification: Consistency,
    Robustness and Adaptivity", ICML 2023, arXiv:2112.14869, Sec. 5. Each sample i has its own
    lambda_i, chosen by the adversary together with p, with a quadratic penalty that keeps it
    near lambda_0:

        loss_i = max_{lambda} max_p sum_k p_k (delta_{k,y} + s_k - s_y) - lambda * KL(p, 1/K)
                 - (alpha * log K / (2 * lambda_0)) * (lambda - lambda_0)^2.

    For fixed p the maximiser is ``lambda = lambda_0 * (1 - KL(p, 1/K) / (alpha * log K))``,
    which lies in ``[lambda_0 * (1 - 1/alpha), lambda_0]`` because KL(p, 1/K) <= log K. The
    maximisation is run as one alternating step per visit of a sample: p is computed at the
    sample's stored lambda, lambda is updated in closed form, and the loss is the LDR-KL loss
    at the new lambda plus the (constant) penalty. The stored lambdas live in the buffer
    ``lambdas`` (shape (num_samples,), initialised to lambda_0), indexed by the batch's
    global sample ``indices``; ``state_dict()`` / ``load_state_dict()`` save and restore them
    so a federated client keeps them between rounds.

    The authors' code was not available to check against; the scale of the quadratic penalty,
    alpha * log K / lambda_0, is the one that makes alpha dimensionless and keeps every
    lambda_i positive for alpha > 1.

    Parameters
    ----------
    num_samples : int
        Number of samples whose lambda is tracked (the client's dataset size).
    lam0 : float, default 1.0
        lambda_0 > 0, the reference (and initial) lambda.
    alpha : float, default 2.0
        Strength of the pull towards lambda_0, > 1.
    margin : float, default 2.0
        delta >= 0 added to the scores of the wrong classes.
    reduction : {"mean", "sum", "none"}, default "mean"
    """

    inputs = ("logits", "targets", "indices")
    task = "classification"

    def __init__(
        self, num_samples: int, lam0: float = 1.0, alpha: float = 2.0, margin: float = 2.0, reduction: str = "mean"
    ) -> None:
        super().__init__()
        self.num_samples = check_num_samples(num_samples)
        self.lam0 = check_positive("lam0", lam0)
        if not alpha > 1.0:
            raise ValueError(f"alpha must be > 1 so that every lambda stays positive, got {alpha!r}")
        self.alpha = float(alpha)
        self.margin = check_non_negative("margin", margin)
        self.reduction = check_reduction(reduction)
        self.register_buffer("lambdas", torch.full((num_samples,), self.lam0))

    def forward(self, logits: Tensor, targets: Tensor, indices: Tensor) -> Tensor:
        check_logits(logits, targets, "ALDRKLLoss")
        if logits.shape[1] < 2:
            raise ValueError(f"ALDRKLLoss: needs at least 2 classes, got logits of shape {tuple(logits.shape)}")
        check_indices(indices, logits.shape[0], self.num_samples, "ALDRKLLoss")
        loss, lam = aldr_kl_loss(
            logits, targets, self.lambdas[indices], self.lam0, self.alpha, self.margin, self.reduction
        )
        self.lambdas[indices] = lam.to(self.lambdas.dtype)
        return loss

    def extra_repr(self) -> str:
        return (
            f"num_samples={self.num_samples}, lam0={self.lam0}, alpha={self.alpha}, margin={self.margin}, "
            f"reduction={self.reduction!r}"
        )

"""Comp-sum losses of Mao, Mohri & Zhong: one family holding CE, sum-exponential, GCE and MAE."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import check_logits, check_non_negative, check_reduction, reduce


def compsum_loss(logits: Tensor, targets: Tensor, tau: float = 1.0, reduction: str = "mean") -> Tensor:
    """Comp-sum loss ``Phi_tau(u)`` with ``u = sum_{y' != y} exp(h_y' - h_y)``; see :class:`CompSumLoss`.

    Computed in log space: ``1 + u = 1 / p_y``, so ``log(1 + u)`` is the cross-entropy ``l`` and
    ``Phi_tau = expm1((1 - tau) * l) / (1 - tau)`` for ``tau != 1``.
    """
    check_reduction(reduction)
    log_one_plus_u = F.cross_entropy(logits, targets, reduction="none")
    if tau == 1.0:
        return reduce(log_one_plus_u, reduction)
    return reduce(torch.expm1((1.0 - tau) * log_one_plus_u) / (1.0 - tau), reduction)


class CompSumLoss(nn.Module):
    """Comp-sum loss family (Mao, Mohri & Zhong, 2023).

    "Cross-Entropy Loss Functions: Theoretical Analysis and Applications", ICML 2023,
    arXiv:2304.07288. With ``u = sum_{y' != y} exp(h_y' - h_y)``:

        Phi_tau(u) = log(1 + u)                              tau = 1   (cross-entropy)
        Phi_tau(u) = ((1 + u)^(1 - tau) - 1) / (1 - tau)     tau != 1

    ``tau = 0`` gives the sum-exponential loss ``u``, ``tau = 2`` gives ``1 - 1 / (1 + u)``
    (= 1 - p_y, MAE-like, bounded), ``1 < tau < 2`` generalised-cross-entropy-like losses. The
    paper studies the whole family and fixes no single tau; the default tau = 1 is the
    cross-entropy member.

    Parameters
    ----------
    tau : float, default 1.0
        Family parameter, >= 0.
    reduction : {"mean", "sum", "none"}, default "mean"
    """

    inputs = ("logits", "targets")
    per_sample = True
    task = "classification"

    def __init__(self, tau: float = 1.0, reduction: str = "mean") -> None:
        super().__init__()
        self.tau = check_non_negative("tau", tau)
        self.reduction = check_reduction(reduction)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        check_logits(logits, targets, "CompSumLoss")
        return compsum_loss(logits, targets, self.tau, self.reduction)

    def extra_repr(self) -> str:
        return f"tau={self.tau}, reduction={self.reduction!r}"

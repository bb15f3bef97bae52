"""Cross-entropy with label smoothing, and PaLM's z-loss auxiliary."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import check_logits, check_non_negative, check_reduction, reduce


def palm_z_loss(logits: Tensor, weight: float = 1e-4, reduction: str = "mean") -> Tensor:
    """PaLM's auxiliary z-loss, ``weight * logsumexp(logits)^2`` per sample.

    It pulls the softmax normaliser log Z towards 0 and so keeps the logits from drifting,
    which stabilises training (Chowdhery et al., 2022, "PaLM: Scaling Language Modeling with
    Pathways", arXiv:2204.02311, Sec. 5, weight 1e-4).

    Parameters
    ----------
    logits : Tensor
        (B, C) unnormalised class scores.
    weight : float, default 1e-4
        The coefficient lambda.
    reduction : {"mean", "sum", "none"}, default "mean"

    Returns
    -------
    Tensor
        Scalar, or (B,) for ``reduction="none"``.
    """
    check_reduction(reduction)
    return reduce(weight * torch.logsumexp(logits, dim=-1).square(), reduction)


class CrossEntropyLoss(nn.Module):
    """Softmax cross-entropy with optional label smoothing; a thin wrapper of ``F.cross_entropy``.

    ``loss = -sum_k q_k log softmax(logits)_k`` with ``q = (1 - eps) * onehot(y) + eps / C``
    (label smoothing, Szegedy et al., 2016, "Rethinking the Inception Architecture for Computer
    Vision", arXiv:1512.00567). The functional twin is ``torch.nn.functional.cross_entropy``.

    Parameters
    ----------
    label_smoothing : float, default 0.0
        eps in [0, 1].
    reduction : {"mean", "sum", "none"}, default "mean"
    """

    inputs = ("logits", "targets")
    per_sample = True
    task = "classification"

    def __init__(self, label_smoothing: float = 0.0, reduction: str = "mean") -> None:
        super().__init__()
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")
        self.label_smoothing = float(label_smoothing)
        self.reduction = check_reduction(reduction)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        check_logits(logits, targets, "CrossEntropyLoss")
        return F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"label_smoothing={self.label_smoothing}, reduction={self.reduction!r}"


class PaLMZLoss(nn.Module):
    """PaLM's z-loss auxiliary, ``weight * logsumexp(logits)^2`` (registry name ``"palm_z_loss"``).

    Chowdhery et al., 2022, "PaLM: Scaling Language Modeling with Pathways",
    arXiv:2204.02311, Sec. 5: an auxiliary loss ``1e-4 * log^2 Z``, with Z the softmax
    normaliser, that keeps log Z close to 0 and so stops the logits from drifting, which
    stabilises training. It is an auxiliary term, not a classification loss: use it beside one
    (in fedsim's config as ``loss.aux``, whose ``weight`` multiplies this module's ``weight``).
    The functional twin is :func:`palm_z_loss`.

    Parameters
    ----------
    weight : float, default 1e-4
        The coefficient lambda (>= 0), PaLM's value.
    reduction : {"mean", "sum", "none"}, default "mean"
    """

    inputs = ("logits",)
    per_sample = True
    task = "classification"
    auxiliary_only = True  # it does not depend on the targets: refused as a run's main loss

    def __init__(self, weight: float = 1e-4, reduction: str = "mean") -> None:
        super().__init__()
        self.weight = check_non_negative("weight", weight)
        self.reduction = check_reduction(reduction)

    def forward(self, logits: Tensor) -> Tensor:
        if logits.dim() != 2 or not logits.dtype.is_floating_point:
            raise ValueError(
                f"PaLMZLoss: logits must be a floating (B, C) tensor, got {logits.dtype} {tuple(logits.shape)}"
            )
        return palm_z_loss(logits, self.weight, self.reduction)

    def extra_repr(self) -> str:
        return f"weight={self.weight}, reduction={self.reduction!r}"

"""The spherical Z-loss of de Brebisson & Vincent: a shift- and scale-invariant classification loss.

Registry name ``spherical_z_loss`` (formerly ``zloss``, renamed so that it cannot be taken
for PaLM's auxiliary ``palm_z_loss``).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ._common import check_logits, check_positive, check_reduction, reduce


def spherical_z_loss(
    logits: Tensor, targets: Tensor, a: float = 1.0, b: float = 1.0, reduction: str = "mean", eps: float = 1e-12
) -> Tensor:
    """Z-loss, ``softplus(b * (a - z_y)) / b`` with ``z = (o - mean(o)) / std(o)`` per sample.

    See :class:`SphericalZLoss`. ``std`` is the population standard deviation over the C logits;
    ``eps`` is added to the variance so that constant logits do not divide by zero.
    """
    check_reduction(reduction)
    mean = logits.mean(dim=1, keepdim=True)
    std = (logits.var(dim=1, unbiased=False, keepdim=True) + eps).sqrt()
    z_target = ((logits - mean) / std).gather(1, targets.unsqueeze(1)).squeeze(1)
    return reduce(F.softplus(b * (a - z_target)) / b, reduction)


class SphericalZLoss(nn.Module):
    """Spherical Z-loss (de Brebisson & Vincent, 2016), registry name ``spherical_z_loss``.

    "The Z-loss: a shift and scale invariant classification loss belonging to the Spherical
    Family", arXiv:1604.08859. The logits of each sample are standardised,
    ``z = (o - mean(o)) / std(o)``, and the loss is

        loss = softplus(b * (a - z_y)) / b = log(1 + exp(b * (a - z_y))) / b,

    a smooth hinge pushing the standardised target score above ``a``. It depends on the
    logits only through z, so it is unchanged when a sample's logits are shifted by a constant
    or multiplied by a positive constant. The paper tunes a and b per task and gives no
    universal default; the defaults here (a = 1, b = 1) train small classifiers well.

    Parameters
    ----------
    a : float, default 1.0
        Target for the standardised score of the true class (must be < sqrt(C - 1), its maximum).
    b : float, default 1.0
        Sharpness of the softplus (> 0); large b approaches ``max(0, a - z_y)``.
    reduction : {"mean", "sum", "none"}, default "mean"
    """

    inputs = ("logits", "targets")
    per_sample = True
    task = "classification"

    def __init__(self, a: float = 1.0, b: float = 1.0, reduction: str = "mean") -> None:
        super().__init__()
        self.a = float(a)
        self.b = check_positive("b", b)
        self.reduction = check_reduction(reduction)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        check_logits(logits, targets, "SphericalZLoss")
        if logits.shape[1] < 2:
            raise ValueError(f"SphericalZLoss: needs at least 2 classes, got logits of shape {tuple(logits.shape)}")
        return spherical_z_loss(logits, targets, self.a, self.b, self.reduction)

    def extra_repr(self) -> str:
        return f"a={self.a}, b={self.b}, reduction={self.reduction!r}"

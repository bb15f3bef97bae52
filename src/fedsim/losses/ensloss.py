"""EnsLoss (Dai, 2024): a new random calibrated surrogate loss for every batch (binary)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._common import binary_scores, check_binary_targets


def _inverse_box_cox(values: Tensor, box_cox_lambda: float) -> Tensor:
    """Inverse Box-Cox transform: ``exp(z)`` for lambda 0, else ``max(1 + lambda z, 0)^(1/lambda)``."""
    if box_cox_lambda == 0.0:
        return torch.exp(values)
    return torch.relu(1.0 + box_cox_lambda * values).pow(1.0 / box_cox_lambda)


def random_calibrated_derivative(
    margins: Tensor, generator: torch.Generator | None = None, box_cox_lambda: float = 0.0
) -> Tensor:
    """Random values of a convex, classification-calibrated loss derivative at ``margins`` (B,).

    Draws B + 1 values ``-invBoxCox(N(0, 1))``, floors them at -1, sorts them and assigns them
    to the margins and to the anchor margin 0 in increasing order, so the derivative is
    non-decreasing in the margin (a convex loss); divides it by the margin where the margin is
    above 1 (a decaying tail); and subtracts 1e-6, so it is negative everywhere and in
    particular at 0 (calibration). The draws come from ``generator`` (a CPU generator, so a
    seed gives the same losses on every device) and are moved to the margins' device and dtype.
    """
    with torch.no_grad():
        anchored = torch.cat([margins, torch.zeros_like(margins[:1])])
        draws = torch.randn(anchored.shape[0], generator=generator).to(device=margins.device, dtype=margins.dtype)
        values = (-_inverse_box_cox(draws, box_cox_lambda)).sort().values.clamp_min(-1.0)
        derivative = torch.empty_like(anchored).scatter_(0, anchored.argsort(), values)
        derivative = torch.where(anchored > 1.0, derivative / anchored, derivative) - 1e-6
    return derivative[:-1]


def ens_loss(
    logits: Tensor, targets: Tensor, generator: torch.Generator | None = None, box_cox_lambda: float = 0.0
) -> Tensor:
    """EnsLoss for one batch; see :class:`EnsLoss`."""
    margins = (2.0 * targets.to(logits.dtype) - 1.0) * binary_scores(logits, "ens_loss")
    derivative = random_calibrated_derivative(margins.detach(), generator, box_cox_lambda)
    return (derivative * margins).mean()


class EnsLoss(nn.Module):
    """EnsLoss: stochastic calibrated loss ensembles (Dai, 2024), binary classification.

    "EnsLoss: Stochastic Calibrated Loss Ensembles for Preventing Overfitting in
    Classification", arXiv:2409.00908. A margin loss phi(y f(x)) with y in {-1, +1} is
    classification-calibrated if it is convex with phi'(0) < 0, and SGD sees the loss only
    through phi'. So every batch draws a new random derivative that satisfies these
    conditions (see :func:`random_calibrated_derivative`: non-decreasing in the margin,
    negative everywhere, via the inverse Box-Cox transform of Gaussian draws) and SGD follows
    it: the gradient is ``mean_i phi'_batch(m_i) * grad(m_i)`` with margins ``m_i = y_i f(x_i)``.
    Averaged over batches this ensembles many calibrated losses.

    The returned value is the authors' surrogate ``mean_i phi'_batch(m_i) * m_i`` (phi'
    detached): only its gradient is meaningful; monitor accuracy, not this value. The draws
    come from a CPU ``torch.Generator`` seeded with ``seed``, so runs are reproducible and
    independent of the device.

    Logits (B,), (B, 1), or (B, 2) (score = logit_1 - logit_0); targets in {0, 1}.

    Parameters
    ----------
    seed : int, default 0
        Seed of the loss's random generator.
    box_cox_lambda : float, default 0.0
        lambda of the inverse Box-Cox transform; 0 (the authors' choice) gives log-normal
        derivative magnitudes.
    """

    inputs = ("logits", "targets")
    task = "binary"

    def __init__(self, seed: int = 0, box_cox_lambda: float = 0.0) -> None:
        super().__init__()
        self.seed = int(seed)
        self.box_cox_lambda = float(box_cox_lambda)
        self.generator = torch.Generator().manual_seed(self.seed)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        check_binary_targets(targets, logits.shape[0], "EnsLoss")
        return ens_loss(logits, targets, self.generator, self.box_cox_lambda)

    def extra_repr(self) -> str:
        return f"seed={self.seed}, box_cox_lambda={self.box_cox_lambda}"

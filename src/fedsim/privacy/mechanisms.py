"""The mechanisms' math as pure functions on tensors: clipping, the noise of an aggregate,
adaptive clipping, and the analytic Gaussian mechanism.
"""

from __future__ import annotations

import math

import torch
from dp_accounting import gaussian_mechanism

__all__ = ["adaptive_clip_norm", "aggregate_noise_std", "analytic_gaussian_epsilon", "analytic_gaussian_sigma",
           "clip_factors", "clip_rows", "update_noise_multiplier"]


def clip_factors(norms: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """The factors ``min(1, C / ||x||)`` that scale vectors of these norms to norm at most ``C``."""
    return (clip_norm / norms.clamp_min(1e-30)).clamp(max=1.0)


def clip_rows(rows: torch.Tensor, clip_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row scaled to L2 norm at most ``clip_norm``: ``x min(1, C / ||x||)``; and the
    rows' norms before clipping. Rows of shape ``(n, ...)``, norms over all but the first dim."""
    norms = rows.flatten(1).norm(dim=1)
    scale = clip_factors(norms, clip_norm)
    return rows * scale.reshape(-1, *([1] * (rows.dim() - 1))).to(rows.dtype), norms


def aggregate_noise_std(clip_norm: float, noise_multiplier: float, expected_clients: float,
                        replace_one: bool = False) -> float:
    """Std of the Gaussian noise on each coordinate of the central mechanism's aggregate.

    The aggregate is DP-FedAvg's fixed-denominator mean (McMahan et al. 2018,
    arXiv 1710.06963, Algorithm 1 with uniform weights),
    ``(sum_i clip(Delta_i, C) + N(0, (z S)^2 I)) / m``, whose std per coordinate is
    ``z S / m``: ``z`` the noise multiplier, ``m`` the expected clients per round, and ``S``
    the L2 sensitivity of the sum: ``C`` when one client is added or removed (Poisson
    sampling, no sampling), ``2 C`` when one is replaced by another (fixed-size sampling
    without replacement).
    """
    sensitivity = (2.0 if replace_one else 1.0) * clip_norm
    return noise_multiplier * sensitivity / expected_clients


def update_noise_multiplier(noise_multiplier: float, count_noise_multiplier: float) -> float:
    """The noise multiplier of the updates' sum under adaptive clipping.

    Andrew et al. 2021 (arXiv 1905.03871, Theorem 1): releasing the sum of clipped updates
    with multiplier ``z_Delta`` and the count of unclipped clients ``sum_i (b_i - 1/2)`` with
    noise std ``sigma_b`` (sensitivity 1/2) is one Gaussian mechanism of multiplier
    ``z = (z_Delta^-2 + (2 sigma_b)^-2)^(-1/2)``; so for a total ``z``,
    ``z_Delta = (z^-2 - (2 sigma_b)^-2)^(-1/2)``, which needs ``2 sigma_b > z``.
    """
    rest = noise_multiplier**-2 - (2.0 * count_noise_multiplier) ** -2
    if rest <= 0:
        raise ValueError(f"adaptive clipping: count noise {count_noise_multiplier:g} leaves no budget for the "
                         f"updates at noise multiplier {noise_multiplier:g}; it must exceed {noise_multiplier / 2:g}")
    return rest**-0.5


def adaptive_clip_norm(clip_norm: float, unclipped_fraction: float, target_quantile: float,
                       learning_rate: float) -> float:
    """Andrew et al.'s geometric update ``C <- C exp(-eta (b - gamma))``: ``b`` the (noisy)
    fraction of clients whose update norm was at most ``C``, ``gamma`` the target quantile;
    its fixed point is the ``gamma`` quantile of the norms."""
    return clip_norm * math.exp(-learning_rate * (unclipped_fraction - target_quantile))


def analytic_gaussian_sigma(epsilon: float, delta: float) -> float:
    """The analytic Gaussian mechanism's noise multiplier for one (epsilon, delta)-DP release
    (Balle & Wang 2018, arXiv 1805.06530, Theorem 8): the smallest sigma with
    ``Phi(1/(2 sigma) - eps sigma) - e^eps Phi(-1/(2 sigma) - eps sigma) <= delta``,
    valid for every epsilon (the classic ``sqrt(2 ln(1.25/delta)) / eps`` only below 1)."""
    return float(gaussian_mechanism.get_sigma_gaussian(epsilon, delta))


def analytic_gaussian_epsilon(sigma: float, delta: float) -> float:
    """The exact epsilon at ``delta`` of one Gaussian release of multiplier ``sigma`` (the
    inverse of :func:`analytic_gaussian_sigma`)."""
    return float(gaussian_mechanism.get_epsilon_gaussian(sigma, delta))

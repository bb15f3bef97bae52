"""Multi-kernel maximum mean discrepancy (MK-MMD; Gretton et al., "A Kernel Two-Sample Test",
JMLR 2012; Long et al., "Learning Transferable Features with Deep Adaptation Networks", ICML
2015, whose multi-kernel form FedKA uses).

For samples ``x`` (n x d) and ``y`` (m x d), the biased (V-statistic) estimate

    MMD^2 = mean_ij k(x_i, x_j) + mean_ij k(y_i, y_j) - 2 mean_ij k(x_i, y_j),

with ``k(a, b) = (1/M) sum_m exp(-||a - b||^2 / (s_m h))``, the mean of M Gaussian kernels
whose bandwidths are the ``scales`` ``s_m`` times ``h``, the mean squared distance over all
pairs of the pooled sample (detached, as DAN's implementation takes it). It is zero when the
two samples are the same multiset.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["DEFAULT_SCALES", "mk_mmd"]

DEFAULT_SCALES = (0.25, 0.5, 1.0, 2.0, 4.0)


def mk_mmd(x: torch.Tensor, y: torch.Tensor, scales: Sequence[float] = DEFAULT_SCALES) -> torch.Tensor:
    """The MK-MMD^2 estimate between the rows of ``x`` and of ``y`` (see the module docstring)."""
    pooled = torch.cat([x, y])
    squared = torch.cdist(pooled, pooled).pow(2)
    h = squared.detach().sum() / max(len(pooled) * (len(pooled) - 1), 1)
    h = h.clamp_min(torch.finfo(squared.dtype).tiny)
    kernel = sum(torch.exp(-squared / (s * h)) for s in scales) / len(scales)
    n = len(x)
    return kernel[:n, :n].mean() + kernel[n:, n:].mean() - 2 * kernel[:n, n:].mean()

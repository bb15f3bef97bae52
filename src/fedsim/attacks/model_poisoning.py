"""Byzantine attacks on the stacked client updates.

Each function takes the honest updates ``(N, D)`` and the Byzantine rows (a boolean mask of
length ``N`` or a sequence of row indices) and returns a new ``(N, D)`` tensor in which only
the Byzantine rows are replaced; the input is not modified.

References
----------
- ALIE: M. Baruch, G. Baruch, Y. Goldberg, "A Little Is Enough: Circumventing Defenses For
  Distributed Learning", NeurIPS 2019, arXiv:1902.06156.
- IPM: C. Xie, O. Koyejo, I. Gupta, "Fall of Empires: Breaking Byzantine-tolerant SGD by Inner
  Product Manipulation", UAI 2020, arXiv:1903.03936.
- Gaussian: P. Blanchard, E. M. El Mhamdi, R. Guerraoui, J. Stainer, "Machine Learning with
  Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS 2017 (Gaussian Byzantine workers).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist

import torch

__all__ = ["ByzantineRows", "alie", "alie_z", "byzantine_mask", "gaussian_noise", "ipm", "scaled_update", "sign_flip"]

ByzantineRows = torch.Tensor | Sequence[int] | Sequence[bool]


def byzantine_mask(byzantine: ByzantineRows, num_rows: int, device: torch.device | None = None) -> torch.Tensor:
    """Boolean mask of length ``num_rows`` from a boolean mask or a sequence of row indices."""
    rows = torch.as_tensor(byzantine, device=device)
    if rows.dtype == torch.bool:
        if rows.shape != (num_rows,):
            raise ValueError(f"byzantine mask has shape {tuple(rows.shape)}, expected ({num_rows},)")
        return rows
    rows = rows.reshape(-1).long()
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= num_rows):
        raise ValueError(f"byzantine indices must be in [0, {num_rows}), got {rows.tolist()}")
    mask = torch.zeros(num_rows, dtype=torch.bool, device=device)
    mask[rows] = True
    return mask


def _prepare(updates: torch.Tensor, byzantine: ByzantineRows, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(updates, torch.Tensor) or updates.dim() != 2 or not updates.is_floating_point():
        raise ValueError(f"{where}: updates must be a floating-point tensor of shape (N, D)")
    return updates.clone(), byzantine_mask(byzantine, updates.shape[0], updates.device)


def sign_flip(updates: torch.Tensor, byzantine: ByzantineRows, scale: float = 1.0) -> torch.Tensor:
    """Byzantine rows send ``-scale * x_i`` (their own honest update, reversed).

    Parameters
    ----------
    updates : torch.Tensor
        Honest updates, shape ``(N, D)``.
    byzantine : bool mask of length N or sequence of int
        The Byzantine rows.
    scale : float, default 1.0
        Magnitude multiplier of the reversed update.
    """
    out, mask = _prepare(updates, byzantine, "sign_flip")
    out[mask] = -scale * updates[mask]
    return out


def scaled_update(updates: torch.Tensor, byzantine: ByzantineRows, scale: float = 10.0) -> torch.Tensor:
    """Byzantine rows send ``scale * x_i`` (their own update, enlarged).

    Parameters
    ----------
    updates : torch.Tensor
        Honest updates, shape ``(N, D)``.
    byzantine : bool mask of length N or sequence of int
        The Byzantine rows.
    scale : float, default 10.0
        Multiplier.
    """
    out, mask = _prepare(updates, byzantine, "scaled_update")
    out[mask] = scale * updates[mask]
    return out


def gaussian_noise(
    updates: torch.Tensor,
    byzantine: ByzantineRows,
    std: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Byzantine rows send pure noise ``N(0, std^2 I)`` in place of their update.

    Parameters
    ----------
    updates : torch.Tensor
        Honest updates, shape ``(N, D)``.
    byzantine : bool mask of length N or sequence of int
        The Byzantine rows.
    std : float, default 1.0
        Standard deviation of every coordinate.
    generator : torch.Generator or None, default None
        Source of randomness (on the updates' device); ``None`` uses torch's global generator.
    """
    out, mask = _prepare(updates, byzantine, "gaussian_noise")
    if std < 0:
        raise ValueError(f"gaussian_noise: std must be >= 0, got {std}")
    shape = (int(mask.sum()), updates.shape[1])
    noise = torch.randn(shape, generator=generator, dtype=updates.dtype, device=updates.device)
    out[mask] = std * noise
    return out


def alie_z(num_clients: int, num_byzantine: int) -> float:
    """ALIE's ``z_max`` (Baruch et al. 2019).

    With ``s = floor(n/2 + 1) - f`` (the benign clients the attackers must sway for a
    majority), ``z_max = Phi^{-1}((n - s) / n)``, ``Phi`` the standard normal CDF.

    Parameters
    ----------
    num_clients : int
        Total number of clients ``n``.
    num_byzantine : int
        Number of Byzantine clients ``f``.
    """
    s = math.floor(num_clients / 2 + 1) - num_byzantine
    if num_clients < 1 or not 0 < s < num_clients:
        raise ValueError(f"alie_z: z is undefined for n={num_clients}, f={num_byzantine} "
                         f"(needs 0 < floor(n/2 + 1) - f < n); pass z explicitly")
    return NormalDist().inv_cdf((num_clients - s) / num_clients)


def alie(updates: torch.Tensor, byzantine: ByzantineRows, z: float | None = None) -> torch.Tensor:
    """A Little Is Enough: Byzantine rows send ``mu - z * sigma``.

    ``mu`` and ``sigma`` are the coordinate-wise mean and (sample, ``n - 1``) standard
    deviation of the benign rows; ``z`` defaults to :func:`alie_z` of ``(N, f)``.

    Parameters
    ----------
    updates : torch.Tensor
        Honest updates, shape ``(N, D)``.
    byzantine : bool mask of length N or sequence of int
        The Byzantine rows.
    z : float or None, default None
        Number of standard deviations; ``None`` uses the paper's formula.
    """
    out, mask = _prepare(updates, byzantine, "alie")
    num_byzantine = int(mask.sum())
    if num_byzantine == 0:
        return out
    benign = updates[~mask]
    if benign.shape[0] < 2:
        raise ValueError(f"alie: needs at least 2 benign rows to estimate a std, got {benign.shape[0]}")
    if z is None:
        z = alie_z(updates.shape[0], num_byzantine)
    out[mask] = benign.mean(dim=0) - z * benign.std(dim=0)
    return out


def ipm(updates: torch.Tensor, byzantine: ByzantineRows, epsilon: float = 0.1) -> torch.Tensor:
    """Inner-product manipulation: Byzantine rows send ``-epsilon * mean(benign rows)``.

    Parameters
    ----------
    updates : torch.Tensor
        Honest updates, shape ``(N, D)``.
    byzantine : bool mask of length N or sequence of int
        The Byzantine rows.
    epsilon : float, default 0.1
        Scale (small epsilon keeps the attack hard to spot; large epsilon reverses the mean).
    """
    out, mask = _prepare(updates, byzantine, "ipm")
    if not bool(mask.any()):
        return out
    if bool(mask.all()):
        raise ValueError("ipm: needs at least one benign row")
    out[mask] = -epsilon * updates[~mask].mean(dim=0)
    return out

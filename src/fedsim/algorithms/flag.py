"""Flag Aggregator: Byzantine-robust aggregation by robust subspace estimation.

Reference
---------
H. Almasi et al., "Flag Aggregator: Scalable Distributed Training under Failures and
Augmented Losses using Convex Optimization", arXiv:2302.05865. Authors' code:
github.com/hamidralmasi/FlagAggregator (``aggregators/flag_median.py``,
``aggregators/center_algorithms_torch.py``).

Definition implemented
----------------------
Let ``x_1..x_N`` be the client updates and ``g_i = x_i / |x_i|`` their unit-norm versions.
Find the ``r``-dimensional subspace ``Y`` (``D x r``, ``Y^T Y = I``) minimising the sum of
the sines of the angles between each ``g_i`` and ``Y``::

    A(Y) = sum_i sqrt(1 - |Y^T g_i|^2)
           + lam * 2 / (n (n - 1)) * sum_{i<j} sqrt(1 - |Y^T d_ij|^2),
    d_ij = (g_i - g_j) / |g_i - g_j|,

an L1-like (outlier-tolerant) PCA, the "flag median". It is solved by IRLS, starting from the
top-``r`` PCA of the ``g_i``::

    repeat:  w_m = a_m / max(eps, sqrt(1 - |Y^T p_m|^2))       (p_m: every g_i and d_ij)
             Y   = top-r left singular vectors of [sqrt(w_m) p_m]
    until A(Y) stops falling (a step that does not lower A is rejected),

where ``a_m`` is 1 for the ``g_i`` and ``2 lam / (n (n - 1))`` for the ``d_ij``. Each IRLS
step minimises the majoriser ``sum_m a_m (s_m^2 + s_m0^2) / (2 s_m0)`` of ``A``, so the
objective does not increase. The aggregate is the projection onto ``Y`` of the mean of the
normalised updates, rescaled by the *median* of the original norms::

    out = median_i(|x_i|) * Y Y^T (1/N) sum_i g_i

so an attacker cannot win by norm, and the output stays at the gradients' scale.

Where this differs from the authors' public code (on purpose)
---------------------------------------------------------------
- The code starts IRLS from a fixed random subspace and, when the first step does not lower
  the objective, returns that random start. Here IRLS starts from the top-``r`` PCA of the
  normalised updates.
- The code returns the projection divided by ``r``; here the output is rescaled by the median
  of the original norms (gradient scale).
- Pairwise term (``lam > 0``): the code adds the raw differences ``g_i - g_j`` over ordered
  pairs with the term ``sqrt(|1 - |Y^T (g_i - g_j)|^2|)`` (``|g_i - g_j|`` can reach 2, hence
  the absolute value) and multiplies the difference *vectors* by ``lam / (n (n - 1))``, which
  squares that factor in the scatter matrix. Here each difference is normalised, so every
  term is the sine of an angle in ``[0, 1]`` and the whole objective stays a weighted flag
  median that the same IRLS solves; the pairwise sines enter the objective with weight
  ``lam / (n (n - 1))`` per ordered pair (``2 lam / (n (n - 1))`` per unordered pair).

Computation
-----------
No ``D x D`` (nor ``D x r`` in :func:`flag_aggregate`) matrix is formed. One chunked pass
builds the ``N x N`` Gram matrix ``X X^T`` (float64 accumulation); its eigen-decomposition
gives an orthonormal basis ``E`` of the span of the ``g_i`` (``D x k``, never materialised)
and the coordinates ``H`` (``k x N``) of the ``g_i`` in it. IRLS runs entirely on ``H``
(``k <= N``), and the output is one linear combination of the rows of ``X`` (a second pass).
Directions whose eigenvalue is below ``N * eps_dtype`` times the largest are treated as
numerical noise and dropped.

Zero-norm updates carry no direction: they are left out of the subspace fit, but they count
in the mean (as zero vectors, the mean divides by ``N``) and in the median of the norms.
Inputs must be finite, with squared norms representable in their dtype (the Flower adapters
drop non-finite replies before aggregation).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from pydantic import Field

from fedsim.algorithms.api import SyncStrategyBase
from fedsim.strategies.aggregate import check_updates, gram_matrix
from fedsim.strategies.base import FedsimStrategy
from fedsim.strategies.replies import ClientUpdate

__all__ = ["Flag", "FlagConfig", "FlagSubspace", "flag_aggregate", "flag_objective", "flag_subspace"]


class FlagConfig(SyncStrategyBase):
    """Flag Aggregator (Almasi et al., ICLR 2023): robust subspace of the updates by IRLS."""

    name: Literal["flag"] = "flag"
    r: int = Field(8, ge=1)
    lam: float = Field(0.0, ge=0)
    max_iter: int = Field(10, ge=1)
    tol: float = Field(1e-6, gt=0)


class FlagSubspace(NamedTuple):
    """Result of :func:`flag_subspace`.

    Attributes
    ----------
    basis : torch.Tensor
        Orthonormal basis ``Y`` of the fitted subspace, shape ``(D, r_eff)`` with
        ``r_eff = min(r, rank)``; dtype and device of the updates.
    objective_history : list of float
        Objective ``A(Y)`` at the PCA start and after every accepted IRLS step; never increasing.
    """

    basis: torch.Tensor
    objective_history: list[float]


class _Coordinates(NamedTuple):
    norms: torch.Tensor  # (N,) float64, original norms |x_i|
    inv_norms: torch.Tensor  # (N,) float64, 1/|x_i| or 0 for zero rows
    eigvecs: torch.Tensor  # (N, k) eigenvectors of the cosine Gram matrix
    sqrt_eigvals: torch.Tensor  # (k,) square roots of its eigenvalues, descending
    coords: torch.Tensor  # (k, N) coordinates of the g_i in the basis E


def _check_args(r: int, lam: float, max_iter: int, tol: float, eps: float, where: str) -> None:
    if r < 1:
        raise ValueError(f"{where}: r must be >= 1, got {r}")
    if lam < 0:
        raise ValueError(f"{where}: lam must be >= 0, got {lam}")
    if max_iter < 0:
        raise ValueError(f"{where}: max_iter must be >= 0, got {max_iter}")
    if tol < 0:
        raise ValueError(f"{where}: tol must be >= 0, got {tol}")
    if eps <= 0:
        raise ValueError(f"{where}: eps must be > 0, got {eps}")


def _coordinates(updates: torch.Tensor) -> _Coordinates:
    """Thin eigen-decomposition of the cosine Gram matrix of the (normalised) updates."""
    n = updates.shape[0]
    gram = gram_matrix(updates)
    norms = torch.diagonal(gram).clamp_min(0.0).sqrt()
    inv_norms = torch.where(norms > 0, 1.0 / norms, torch.zeros_like(norms))
    cosine = inv_norms[:, None] * gram * inv_norms[None, :]
    eigvals, eigvecs = torch.linalg.eigh(cosine)
    eigvals, eigvecs = eigvals.flip(0), eigvecs.flip(1)
    rtol = n * torch.finfo(updates.dtype).eps
    keep = eigvals > rtol * float(eigvals[0].clamp_min(0.0))
    eigvals, eigvecs = eigvals[keep], eigvecs[:, keep]
    sqrt_eigvals = eigvals.sqrt()
    # Unit columns for the non-zero updates (dropping the noise directions shortens them by
    # at most ~rtol), exact zeros for the zero ones (eigh leaves rounding noise there).
    coords = sqrt_eigvals[:, None] * eigvecs.T
    nonzero = norms > 0
    col_norms = coords.norm(dim=0)
    coords = torch.where(nonzero & (col_norms > 0), coords / col_norms.clamp_min(1e-300), 0.0)
    return _Coordinates(norms, inv_norms, eigvecs, sqrt_eigvals, coords)


def _data_points(coords: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm data points ``p_m`` (columns) and their objective weights ``a_m``."""
    points = coords[:, coords.norm(dim=0) > 0]
    n_dir = points.shape[1]
    weights = torch.ones(n_dir, dtype=points.dtype, device=points.device)
    if lam == 0 or n_dir < 2:
        return points, weights
    i, j = torch.triu_indices(n_dir, n_dir, offset=1, device=points.device)
    diffs = points[:, i] - points[:, j]
    diff_norms = diffs.norm(dim=0)
    distinct = diff_norms > 1e-12
    diffs = diffs[:, distinct] / diff_norms[distinct]
    pair_weight = 2.0 * lam / (n_dir * (n_dir - 1))
    pair_weights = torch.full((diffs.shape[1],), pair_weight, dtype=points.dtype, device=points.device)
    return torch.cat([points, diffs], dim=1), torch.cat([weights, pair_weights])


def _sines(basis_coords: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    cos_sq = (basis_coords.T @ points).square().sum(dim=0)
    return (1.0 - cos_sq).clamp_min(0.0).sqrt()


def _top_eigvecs(matrix: torch.Tensor, r: int) -> torch.Tensor:
    _, vecs = torch.linalg.eigh(matrix)
    return vecs[:, -r:].flip(1)


def _irls(
    coords: torch.Tensor, r: int, lam: float, max_iter: int, tol: float, eps: float
) -> tuple[torch.Tensor, list[float]]:
    """IRLS for the flag median in coordinates; returns ``(Y_coords (k, r_eff), history)``."""
    k = coords.shape[0]
    r_eff = min(r, k)
    # The coordinates are principal axes of the normalised updates, sorted by eigenvalue:
    # the first r_eff unit vectors are the top-r PCA subspace.
    basis = torch.eye(k, r_eff, dtype=coords.dtype, device=coords.device)
    points, point_weights = _data_points(coords, lam)
    objective = float((point_weights * _sines(basis, points)).sum())
    history = [objective]
    if r_eff == k:
        return basis, history
    for _ in range(max_iter):
        if objective <= 0.0:
            break
        irls_weights = point_weights / _sines(basis, points).clamp_min(eps)
        candidate = _top_eigvecs((points * irls_weights) @ points.T, r_eff)
        new_objective = float((point_weights * _sines(candidate, points)).sum())
        if new_objective >= objective:
            break
        converged = objective - new_objective <= tol * objective
        basis, objective = candidate, new_objective
        history.append(objective)
        if converged:
            break
    return basis, history


def _lift(updates: torch.Tensor, coord: _Coordinates, vectors: torch.Tensor) -> torch.Tensor:
    """Per-row coefficients ``c`` (``N x m``) with ``E @ vectors = X^T c``."""
    return coord.inv_norms[:, None] * (coord.eigvecs @ (vectors / coord.sqrt_eigvals[:, None]))


def flag_subspace(
    updates: torch.Tensor,
    r: int = 8,
    lam: float = 0.0,
    max_iter: int = 10,
    tol: float = 1e-6,
    eps: float = 1e-6,
) -> FlagSubspace:
    """Fit the Flag Aggregator subspace and return it with the IRLS objective trace.

    Parameters
    ----------
    updates : torch.Tensor
        Stacked client updates, shape ``(N, D)``.
    r : int, default 8
        Subspace dimension; capped at the rank of the normalised updates.
    lam : float, default 0.0
        Weight of the pairwise-difference term (see the module docstring).
    max_iter : int, default 10
        Maximum number of IRLS steps (0 returns the PCA start).
    tol : float, default 1e-6
        Stop when one step lowers the objective by at most ``tol`` times its value.
    eps : float, default 1e-6
        Lower bound on the sines in the IRLS weights ``1 / max(eps, sine)``.

    Returns
    -------
    FlagSubspace
        ``basis`` of shape ``(D, r_eff)`` and ``objective_history``.
    """
    check_updates(updates, "flag_subspace")
    _check_args(r, lam, max_iter, tol, eps, "flag_subspace")
    coord = _coordinates(updates)
    basis_coords, history = _irls(coord.coords, r, lam, max_iter, tol, eps)
    coefficients = _lift(updates, coord, basis_coords).to(updates.dtype)
    return FlagSubspace(updates.T @ coefficients, history)


def flag_objective(updates: torch.Tensor, basis: torch.Tensor, lam: float = 0.0) -> float:
    """Evaluate ``A(Y)`` directly (reference implementation, ``O(N^2 D)`` when ``lam > 0``).

    Parameters
    ----------
    updates : torch.Tensor
        Stacked client updates, shape ``(N, D)``; zero rows are skipped.
    basis : torch.Tensor
        Orthonormal basis ``Y``, shape ``(D, r)``.
    lam : float, default 0.0
        Weight of the pairwise-difference term.
    """
    check_updates(updates, "flag_objective")
    x = updates.to(torch.float64)
    y = basis.to(torch.float64)
    norms = x.norm(dim=1)
    g = x[norms > 0] / norms[norms > 0, None]

    def sines(v: torch.Tensor) -> torch.Tensor:
        return (1.0 - (v @ y).square().sum(dim=1)).clamp_min(0.0).sqrt()

    value = sines(g).sum()
    n = g.shape[0]
    if lam > 0 and n >= 2:
        i, j = torch.triu_indices(n, n, offset=1, device=g.device)
        d = g[i] - g[j]
        d_norms = d.norm(dim=1)
        d = d[d_norms > 1e-12] / d_norms[d_norms > 1e-12, None]
        value = value + 2.0 * lam / (n * (n - 1)) * sines(d).sum()
    return float(value)


def flag_aggregate(
    updates: torch.Tensor,
    r: int = 8,
    lam: float = 0.0,
    max_iter: int = 10,
    tol: float = 1e-6,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Flag Aggregator (Almasi et al., arXiv:2302.05865): ``median_i |x_i| * Y Y^T mean_i(x_i / |x_i|)``.

    ``Y`` is the flag-median subspace of the normalised updates fitted by IRLS from the
    top-``r`` PCA start (see the module docstring for the objective and the deviations from
    the authors' code).

    Parameters
    ----------
    updates : torch.Tensor
        Stacked client updates, shape ``(N, D)``.
    r : int, default 8
        Subspace dimension; capped at the rank of the normalised updates (with ``r >= rank``
        the projection is the identity and the result is the rescaled mean of the
        normalised updates).
    lam : float, default 0.0
        Weight of the pairwise-difference term.
    max_iter : int, default 10
        Maximum number of IRLS steps.
    tol : float, default 1e-6
        Relative decrease of the objective below which IRLS stops.
    eps : float, default 1e-6
        Lower bound on the sines in the IRLS weights.

    Returns
    -------
    torch.Tensor
        Shape ``(D,)``, dtype and device of ``updates``. All-zero input gives zeros.
    """
    check_updates(updates, "flag_aggregate")
    _check_args(r, lam, max_iter, tol, eps, "flag_aggregate")
    n = updates.shape[0]
    coord = _coordinates(updates)
    if coord.coords.shape[0] == 0:
        return torch.zeros(updates.shape[1], dtype=updates.dtype, device=updates.device)
    basis_coords, _ = _irls(coord.coords, r, lam, max_iter, tol, eps)
    mean_coords = coord.coords.sum(dim=1) / n
    projected = basis_coords @ (basis_coords.T @ mean_coords)
    scale = torch.quantile(coord.norms, 0.5)
    coefficients = scale * _lift(updates, coord, projected[:, None])[:, 0]
    return coefficients.to(updates.dtype) @ updates


class Flag(FedsimStrategy):
    """Flag Aggregator: :func:`flag_aggregate` of the updates, one vote per update::

        delta = median_i(|Delta_i|) * Y Y^T mean_i(g_i)

    Parameters
    ----------
    *args, **kwargs
        Flower FedAvg's arguments, ``min_successful`` and ``server_opt``.
    r : int, default 8
        Subspace dimension (capped at the rank of the round's updates).
    lam : float, default 0.0
        Weight of the paper's pairwise-difference term.
    max_iter : int, default 10
        Maximum number of IRLS steps.
    tol : float, default 1e-6
        IRLS stops when a step lowers the objective by at most ``tol`` times its value.
    """

    name = "flag"
    Config = FlagConfig
    description = "Flag Aggregator (Almasi et al. 2023): robust r-dimensional subspace of the updates by IRLS"

    def aggregate_updates(self, server_round: int, updates: list[ClientUpdate]) -> torch.Tensor:
        stacked = torch.stack([u.update for u in updates])
        cfg = self.cfg
        return flag_aggregate(stacked, r=cfg.r, lam=cfg.lam, max_iter=cfg.max_iter, tol=cfg.tol)

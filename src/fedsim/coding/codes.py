"""Gradient codes of Tandon et al., "Gradient Coding: Avoiding Stragglers in Distributed
Learning" (ICML 2017, arXiv 1612.03301), and the decoder every scheme shares.

The data is split into ``n`` parts with gradients ``g_1..g_n`` (rows of ``G``); worker ``i``
sends ``sum_j B_ij g_j`` (row ``i`` of the encoding matrix ``B``). Any ``n - s`` rows of a
code tolerating ``s`` stragglers span the all-ones vector, so with ``F`` the rows received the
master finds ``a`` with ``a^T B_F = 1^T`` and decodes ``a^T B_F G = sum_j g_j``.

- fractional repetition (``(s + 1) | n``): workers in groups of ``s + 1``; every worker of
  group ``k`` sends the sum of the ``s + 1`` parts of that group;
- cyclic repetition: worker ``i`` holds parts ``i, i+1, ..., i+s`` (mod n) with the
  coefficients of Tandon et al.'s Algorithm 2 (a random ``(s+1)``-sparse row space that
  contains 1 and meets every ``(n - s)``-subset; drawn from ``seed``, so it is reproducible).
"""

from __future__ import annotations

import numpy as np

__all__ = ["NotDecodable", "cyclic_code", "decoding_weights", "encoding_matrix", "fractional_repetition_code"]

DECODE_TOL = 1e-8
"""Largest residual ``||C^T a - 1||_inf`` of a decoding: above it, the rows do not decode."""


class NotDecodable(ValueError):
    """The rows received do not span the all-ones vector: the gradient cannot be decoded."""


def fractional_repetition_code(n: int, s: int) -> np.ndarray:
    """Tandon et al.'s fractional repetition code (Section 3.1): ``B`` of shape ``(n, n)``,
    ``B_ij = 1`` when parts ``j`` and worker ``i`` are in the same group of ``s + 1``."""
    if s < 0 or s >= n or n % (s + 1):
        raise ValueError(f"fractional repetition needs s + 1 to divide n; got n={n}, s={s}")
    group = np.arange(n) // (s + 1)
    return (group[:, None] == group[None, :]).astype(np.float64)


def cyclic_code(n: int, s: int, seed: int = 0) -> np.ndarray:
    """Tandon et al.'s cyclic repetition code (Algorithm 2): row ``i`` supported on parts
    ``i..i+s`` (mod n). ``H`` (``s x n``) is random with last column ``-sum`` of the others,
    so ``H 1 = 0``; each row ``b_i`` is the vector of its support in ``null(H)`` with
    ``b_ii = 1``, so every row lies in ``null(H)``, an ``(n - s)``-dimensional space holding 1;
    any ``n - s`` rows are independent (with probability 1) and span it."""
    if s < 0 or s >= n:
        raise ValueError(f"the cyclic code tolerates 0..n-1 stragglers; got n={n}, s={s}")
    B = np.zeros((n, n))
    if s == 0:
        return np.eye(n)
    rng = np.random.default_rng(seed)
    H = rng.standard_normal((s, n))
    H[:, -1] = -H[:, :-1].sum(axis=1)
    for i in range(n):
        support = [(i + k) % n for k in range(s + 1)]
        # b_i[support[0]] = 1; the other s entries solve H[:, rest] x = -H[:, support[0]]
        B[i, support[0]] = 1.0
        B[i, support[1:]] = np.linalg.solve(H[:, support[1:]], -H[:, support[0]])
    return B


def encoding_matrix(kind: str, n: int, s: int, seed: int = 0) -> np.ndarray:
    """``kind`` ``cyclic`` or ``fractional_repetition``; see the module docstring."""
    if kind == "fractional_repetition":
        return fractional_repetition_code(n, s)
    if kind == "cyclic":
        return cyclic_code(n, s, seed)
    raise ValueError(f"unknown gradient code {kind!r}; known: cyclic, fractional_repetition")


def decoding_weights(rows: np.ndarray, target: np.ndarray | None = None) -> np.ndarray:
    """``a`` with ``rows^T a = target`` (all ones by default) by least squares; raises
    :class:`NotDecodable` when the residual exceeds :data:`DECODE_TOL` (the rows do not span it)."""
    rows = np.asarray(rows, dtype=np.float64)
    target = np.ones(rows.shape[1]) if target is None else np.asarray(target, dtype=np.float64)
    if rows.shape[0] == 0:
        raise NotDecodable("no coded results received")
    a, *_ = np.linalg.lstsq(rows.T, target, rcond=None)
    residual = float(np.abs(rows.T @ a - target).max())
    if residual > DECODE_TOL:
        raise NotDecodable(f"{rows.shape[0]} coded results do not decode the gradient (residual {residual:.2g})")
    return a

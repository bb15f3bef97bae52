"""Straggler patterns: which of ``n`` workers are slow in each round, as a boolean matrix
``(rounds, n)``, drawn once from a seed (so a resumed run sees the same pattern).

- ``iid``: every worker straggles in every round with probability ``p``, independently;
- ``gilbert_elliott``: bursty stragglers, as in Krishnan et al.'s experiments: each worker is a
  two-state Markov chain, good -> bad with probability ``p_gb`` and bad -> good with
  ``p_bg``, and straggles while bad. The chain starts in its stationary law, so every round
  straggles with probability ``pi_bad = p_gb / (p_gb + p_bg)``, and a burst lasts
  ``1 / p_bg`` rounds on average (geometric lengths);
- ``trace``: a recorded pattern, a text file of 0/1 rows (one row per round, one column per
  worker; ``,`` or blanks between them; ``#`` comments); the rows repeat when a run is longer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["gilbert_elliott", "iid", "read_trace", "repeat_trace"]


def iid(rounds: int, n: int, p: float, seed: int) -> np.ndarray:
    """Independent stragglers: ``P(worker i straggles in round t) = p``."""
    return np.random.default_rng(seed).random((rounds, n)) < p


def gilbert_elliott(rounds: int, n: int, p_gb: float, p_bg: float, seed: int) -> np.ndarray:
    """Bursty stragglers: each worker a Gilbert-Elliott chain (bad = straggling), started in
    its stationary law ``P(bad) = p_gb / (p_gb + p_bg)``."""
    if not (0 < p_gb <= 1 and 0 < p_bg <= 1):
        raise ValueError(f"gilbert_elliott needs 0 < p_gb, p_bg <= 1; got {p_gb}, {p_bg}")
    rng = np.random.default_rng(seed)
    bad = np.zeros((rounds, n), dtype=bool)
    state = rng.random(n) < p_gb / (p_gb + p_bg)
    for t in range(rounds):
        bad[t] = state
        u = rng.random(n)
        state = np.where(state, u >= p_bg, u < p_gb)
    return bad


def read_trace(path: str | Path) -> np.ndarray:
    """A recorded pattern ``(rounds, workers)`` of booleans (see the module docstring)."""
    rows = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.split("#", 1)[0].replace(",", " ").split()
        if not line:
            continue
        if any(v not in ("0", "1") for v in line):
            raise ValueError(f"{path}:{number}: a straggler trace holds 0 and 1 only")
        rows.append([v == "1" for v in line])
    if not rows or len({len(r) for r in rows}) != 1:
        raise ValueError(f"{path}: a straggler trace needs rows of equal length, one column per worker")
    return np.array(rows, dtype=bool)


def repeat_trace(trace: np.ndarray, rounds: int) -> np.ndarray:
    """The trace's rows for ``rounds`` rounds, starting over at its end."""
    return trace[np.arange(rounds) % len(trace)]

"""Verdicts from paired per-seed comparisons: a claim holds, does not hold, or is inconclusive.

A claim compares a setting with a baseline (or a fixed bar) on one number. Both run the same
seeds, so each seed ``s`` gives a margin ``m_s``: how far the setting is past the claim's
threshold in that seed (positive: the claim holds in it; :func:`claim_margin`). Over the
``n`` seeds with both numbers:

- the claim **holds** when the one-sided paired t-test (Student 1908) rejects "mean margin
  <= 0" at level ``alpha``: ``t = mean(m) / (sd(m) / sqrt(n))``, ``p = P(T_{n-1} >= t)``;
- it **does not hold** when the same test rejects "mean margin >= 0";
- otherwise it is **inconclusive**: the seed spread overlaps the threshold.

Where a margin is infinite (a ``*_to_target`` a run never reached) the t statistic is
undefined and the sign test decides instead: every margin of one sign and ``2^-n <= alpha``
(so at least 5 seeds at ``alpha = 0.05``). Margins all equal (identical runs, ``sd = 0``) are
decided by their common value (0 holds: the claims are "at least").
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Literal

from scipy.stats import t as student_t

Outcome = Literal["HOLDS", "DOES NOT HOLD", "INCONCLUSIVE"]


def claim_margin(setting: float, baseline: float, by: float = 0.0, ratio: float | None = None,
                 lower_is_better: bool = False) -> float:
    """The margin of one seed: ``setting - (baseline + by)`` (higher is better) or
    ``(baseline - by) - setting`` (lower is better); with ``ratio`` instead
    ``setting - ratio x baseline`` or ``baseline - ratio x setting``. A setting that never
    reached a target (infinite, lower is better) gets ``-inf``: it beats nothing."""
    if lower_is_better and math.isinf(setting):
        return -math.inf
    if ratio is not None:
        return baseline - setting * ratio if lower_is_better else setting - baseline * ratio
    return baseline - by - setting if lower_is_better else setting - baseline - by


@dataclass(frozen=True)
class PairedVerdict:
    """The verdict on one comparison: its ``outcome``, the ``n`` paired seeds, in how many
    the claim held (``held``), and the test's one-sided ``p`` for the outcome's direction
    (for inconclusive, the smaller of the two)."""

    outcome: Outcome
    n: int
    held: int
    p: float

    def describe(self) -> str:
        """``held in 3/3 seeds, paired t p=0.012``-style summary."""
        return f"held in {self.held}/{self.n} seeds, p={self.p:.2g}"


def paired_verdict(margins: list[float], alpha: float = 0.05) -> PairedVerdict:
    """The outcome of the margins of the paired seeds (see the module docstring)."""
    n, held = len(margins), sum(1 for m in margins if m >= 0)
    if n == 0:
        return PairedVerdict("INCONCLUSIVE", 0, 0, 1.0)
    if any(math.isinf(m) for m in margins) or n == 1:
        p = 0.5 ** n
        if held == n and p <= alpha:
            return PairedVerdict("HOLDS", n, held, p)
        if held == 0 and p <= alpha:
            return PairedVerdict("DOES NOT HOLD", n, held, p)
        return PairedVerdict("INCONCLUSIVE", n, held, p if held in (0, n) else 1.0)
    mean, sd = statistics.mean(margins), statistics.stdev(margins)
    if sd == 0:
        return PairedVerdict("HOLDS" if mean >= 0 else "DOES NOT HOLD", n, held, 0.0)
    t = mean / (sd / math.sqrt(n))
    p_holds, p_fails = float(student_t.sf(t, n - 1)), float(student_t.cdf(t, n - 1))
    if p_holds <= alpha:
        return PairedVerdict("HOLDS", n, held, p_holds)
    if p_fails <= alpha:
        return PairedVerdict("DOES NOT HOLD", n, held, p_fails)
    return PairedVerdict("INCONCLUSIVE", n, held, min(p_holds, p_fails))

"""An empirical privacy audit: a lower bound on epsilon from a distinguishing test.

Jagielski, Ullman & Oprea, "Auditing Differentially Private Machine Learning: How Private is
Private SGD?" (arXiv 2006.07709), and Nasr et al. (arXiv 2101.04535): run the mechanism many
times on neighbouring inputs (with and without a canary), and let a threshold test guess which
one each output came from. Any (epsilon, delta)-DP mechanism keeps every test's false positive
rate FPR and false negative rate FNR on ``FPR + e^eps FNR >= 1 - delta`` (and symmetrically),
so with Clopper-Pearson upper bounds ``FPR^+``, ``FNR^+`` at the given confidence,

    eps >= max(ln((1 - delta - FNR^+) / FPR^+), ln((1 - delta - FPR^+) / FNR^+))

holds with that confidence. A bound above the accountant's epsilon means the mechanism is
not what the accountant was told (e.g. its noise is off).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import stats

__all__ = ["clopper_pearson_upper", "epsilon_lower_bound"]


def clopper_pearson_upper(errors: np.ndarray, trials: int, confidence: float) -> np.ndarray:
    """One-sided Clopper-Pearson upper bounds on rates of ``errors`` (an array) in ``trials``."""
    errors = np.asarray(errors)
    bound = stats.beta.ppf(confidence, errors + 1, np.maximum(trials - errors, 1))
    return np.where(errors >= trials, 1.0, bound)


def epsilon_lower_bound(without_canary: Sequence[float], with_canary: Sequence[float], delta: float,
                        confidence: float = 0.95) -> float:
    """The best lower bound on epsilon over every threshold on the scores (higher: canary)."""
    out, inside = np.sort(np.asarray(without_canary)), np.sort(np.asarray(with_canary))
    thresholds = np.unique(np.concatenate([out, inside]))
    fpr = clopper_pearson_upper(len(out) - np.searchsorted(out, thresholds, side="left"), len(out), confidence)
    fnr = clopper_pearson_upper(np.searchsorted(inside, thresholds, side="left"), len(inside), confidence)
    with np.errstate(divide="ignore", invalid="ignore"):
        bounds = np.concatenate([np.log((1 - delta - fnr) / fpr), np.log((1 - delta - fpr) / fnr)])
    finite = bounds[np.isfinite(bounds)]
    return float(max(0.0, finite.max(initial=0.0)))

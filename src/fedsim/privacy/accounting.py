"""Privacy accounting: the epsilon a run has spent, through maintained libraries.

A run's privacy cost is a *ledger*: how many times each :class:`GaussianRelease` happened
to the worst-off unit (a client for client-level DP, a record for DP-SGD). Its epsilon at a
``delta`` comes from one of three accountants:

- ``pld``: privacy loss distributions (Koskela et al. arXiv 1906.03049; Doroshenko et al.
  arXiv 2207.04380), dp-accounting's ``PLDAccountant``: tight up to its discretisation;
- ``rdp``: Renyi DP (Mironov, arXiv 1702.07476; Mironov et al. arXiv 1908.10530 for Poisson
  sampling; Wang et al. arXiv 1808.00087 for sampling without replacement), dp-accounting's
  ``RdpAccountant``: an upper bound, looser;
- ``prv``: privacy random variables (Gopi et al., "Numerical Composition of Differential
  Privacy", arXiv 2106.02848), prv-accountant's ``PRVAccountant``: its upper bound is used.

Amplification by sampling follows the participation model: Poisson sampling with
probability q (``PoissonSampledDpEvent``, add-or-remove-one neighbours), fixed-size sampling
of k of n without replacement (``SampledWithoutReplacementDpEvent``, replace-one neighbours,
which only the RDP accountant covers), or none.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import dp_accounting
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant
from scipy import optimize

__all__ = ["GaussianRelease", "calibrate_noise", "dp_event", "epsilon"]

NeighborRel = dp_accounting.NeighboringRelation

PRV_EPS_ERROR = 0.01
"""prv-accountant's allowed error in epsilon; the reported epsilon is its upper bound."""


@dataclass(frozen=True)
class GaussianRelease:
    """One Gaussian mechanism with noise multiplier ``noise_multiplier`` (noise std over the
    L2 sensitivity), applied to a sample of the units.

    Attributes
    ----------
    noise_multiplier : float
    sampling : {"none", "poisson", "fixed"}
        Every unit; each unit independently with ``probability``; ``sample_size`` of
        ``population`` without replacement.
    probability : float
    sample_size, population : int
    """

    noise_multiplier: float
    sampling: Literal["none", "poisson", "fixed"] = "none"
    probability: float = 1.0
    sample_size: int = 0
    population: int = 0

    @property
    def relation(self) -> NeighborRel:
        """The neighbouring relation its amplification holds for."""
        return NeighborRel.REPLACE_ONE if self.sampling == "fixed" else NeighborRel.ADD_OR_REMOVE_ONE


def dp_event(release: GaussianRelease) -> dp_accounting.DpEvent:
    """The dp-accounting event of ``release``."""
    gaussian = dp_accounting.GaussianDpEvent(release.noise_multiplier)
    if release.sampling == "poisson":
        return dp_accounting.PoissonSampledDpEvent(release.probability, gaussian)
    if release.sampling == "fixed":
        return dp_accounting.SampledWithoutReplacementDpEvent(release.population, release.sample_size, gaussian)
    return gaussian


def epsilon(ledger: Mapping[GaussianRelease, int], delta: float, accountant: str) -> float:
    """The epsilon at ``delta`` of composing each release of ``ledger`` its count of times."""
    items = tuple(sorted(((r, int(n)) for r, n in ledger.items() if n > 0), key=repr))
    return _epsilon(items, float(delta), accountant) if items else 0.0


@functools.lru_cache(maxsize=4096)
def _epsilon(items: tuple[tuple[GaussianRelease, int], ...], delta: float, accountant: str) -> float:
    if accountant == "prv":
        return _prv_epsilon(items, delta)
    return float(_composed(items, accountant).get_epsilon(delta))


@functools.lru_cache(maxsize=256)
def _composed(items: tuple[tuple[GaussianRelease, int], ...], accountant: str) -> dp_accounting.PrivacyAccountant:
    """A dp-accounting accountant that composed ``items`` (one per ledger, whatever the delta)."""
    relations = {release.relation for release, _ in items}
    if len(relations) > 1:
        raise ValueError("a ledger mixes sampling without replacement with other releases")
    relation = relations.pop()
    if accountant == "pld":
        if relation == NeighborRel.REPLACE_ONE:
            raise ValueError("the PLD accountant does not cover sampling without replacement; use rdp")
        acc = pld_privacy_accountant.PLDAccountant(relation)
    elif accountant == "rdp":
        acc = rdp_privacy_accountant.RdpAccountant(neighboring_relation=relation)
    else:
        raise ValueError(f"accountant {accountant!r}: known pld, rdp, prv")
    for release, count in items:
        acc.compose(dp_event(release), count)
    return acc


def _prv_epsilon(items: tuple[tuple[GaussianRelease, int], ...], delta: float) -> float:
    from prv_accountant import GaussianMechanism, PoissonSubsampledGaussianMechanism, PRVAccountant

    prvs = []
    for release, _ in items:
        if release.sampling == "fixed":
            raise ValueError("the PRV accountant does not cover sampling without replacement; use rdp")
        prvs.append(PoissonSubsampledGaussianMechanism(release.probability, release.noise_multiplier)
                    if release.sampling == "poisson" else GaussianMechanism(release.noise_multiplier))
    counts = [count for _, count in items]
    acc = PRVAccountant(prvs=prvs, max_self_compositions=counts, eps_error=PRV_EPS_ERROR, delta_error=delta / 1000)
    return float(acc.compute_epsilon(delta=delta, num_self_compositions=counts)[2])


def calibrate_noise(ledger_of: Callable[[float], Mapping[GaussianRelease, int]], target_epsilon: float,
                    delta: float, accountant: str, rtol: float = 1e-4) -> float:
    """The smallest noise multiplier z whose ledger ``ledger_of(z)`` spends at most
    ``target_epsilon`` at ``delta`` (Brent's method on log z; epsilon falls as z grows).

    Raises ValueError when no z in [0.05, 1e4] meets it."""
    def excess(log_z: float) -> float:
        return math.log(epsilon(ledger_of(math.exp(log_z)), delta, accountant)) - math.log(target_epsilon)

    hi = 0.0  # log z; the bracket grows by doubling z from 1
    while excess(hi) > 0:
        hi += math.log(2)
        if hi > math.log(1e4):
            raise ValueError(f"target_epsilon {target_epsilon:g}: unreachable with a noise multiplier up to 1e4")
    lo = hi - math.log(2)
    while excess(lo) <= 0:
        lo -= math.log(2)
        if lo < math.log(0.05):
            raise ValueError(f"target_epsilon {target_epsilon:g}: met by a noise multiplier below 0.05; "
                             "give privacy.noise_multiplier instead")
    log_z = optimize.brentq(excess, lo, hi, xtol=rtol * 1e-2)
    while excess(log_z) > 0:  # the upper end of the bracket Brent's method stopped in
        log_z += rtol * 1e-2
    return math.exp(log_z)

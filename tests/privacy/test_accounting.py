"""The accountants: fedsim's epsilon is dp-accounting's for the same event, PLD sits inside
prv-accountant's bracket, calibration reproduces its target, and the analytic Gaussian
mechanism is Balle & Wang's formula."""

import itertools
import math

import dp_accounting
import pytest
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant
from prv_accountant import PoissonSubsampledGaussianMechanism, PRVAccountant
from scipy.stats import norm

from fedsim.config import validate_config
from fedsim.privacy.accounting import GaussianRelease, calibrate_noise, epsilon
from fedsim.privacy.mechanisms import analytic_gaussian_epsilon, analytic_gaussian_sigma
from fedsim.privacy.server import ServerPrivacy

GRID = [(q, z, rounds, delta) for (q, z, rounds), delta in itertools.product(
    ((0.01, 2.0, 5), (0.1, 1.0, 40), (0.05, 1.5, 20), (1.0, 3.0, 10)), (1e-5, 1e-7))]
"""Sampling rates, noise multipliers, rounds (q = 1: no sampling) and deltas."""


def _reference(q, z, rounds, delta, accountant):
    acc = (pld_privacy_accountant.PLDAccountant() if accountant == "pld" else rdp_privacy_accountant.RdpAccountant())
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds)
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_epsilon_equals_dp_accountings_on_a_grid(accountant):
    for q, z, rounds, delta in GRID:
        ours = epsilon({GaussianRelease(z, "poisson", q): rounds}, delta, accountant)
        assert ours == pytest.approx(_reference(q, z, rounds, delta, accountant), rel=1e-9), (q, z, rounds, delta)


def test_a_runs_ledger_is_poisson_sampling_of_its_bernoulli_clients():
    cfg = validate_config({"rounds": 20, "partition": {"num_clients": 100},
                           "participation": {"model": "bernoulli", "p_low": 0.1, "p_high": 0.1},
                           "privacy": {"mechanism": "central", "noise_multiplier": 1.1, "delta": 1e-5}})
    privacy = ServerPrivacy(cfg, [10] * 100)
    for _ in range(20):
        privacy.spend([])
    assert privacy.epsilon() == pytest.approx(_reference(0.1, 1.1, 20, 1e-5, "pld"), rel=1e-9)


def test_the_issues_anchor_poisson_pld_against_unamplified_accounting():
    """1,000 clients, 100 per round, 200 rounds, z = 1, delta 1e-5 (issue 25)."""
    sampled = epsilon({GaussianRelease(1.0, "poisson", 0.1): 200}, 1e-5, "pld")
    unamplified = epsilon({GaussianRelease(1.0): 200}, 1e-5, "rdp")
    assert sampled == pytest.approx(9.97, abs=0.01)
    assert unamplified == pytest.approx(166, rel=0.01)


def test_pld_lies_within_prv_accountants_bracket():
    for q, z, rounds in ((0.01, 1.0, 100), (0.1, 1.0, 200)):
        pld = epsilon({GaussianRelease(z, "poisson", q): rounds}, 1e-5, "pld")
        prv = PRVAccountant(prvs=PoissonSubsampledGaussianMechanism(q, z), max_self_compositions=rounds,
                            eps_error=0.01, delta_error=1e-8)
        low, _, high = prv.compute_epsilon(delta=1e-5, num_self_compositions=[rounds])
        assert low <= pld <= high, (low, pld, high)
        assert epsilon({GaussianRelease(z, "poisson", q): rounds}, 1e-5, "prv") == pytest.approx(high)


@pytest.mark.parametrize(("accountant", "target"), [("pld", 1.0), ("rdp", 4.0), ("rdp", 8.0)])
def test_calibration_reproduces_the_target_epsilon(accountant, target):
    def ledger_of(z):
        return {GaussianRelease(z, "poisson", 0.05): 20}

    z = calibrate_noise(ledger_of, target, 1e-5, accountant)
    assert epsilon(ledger_of(z), 1e-5, accountant) == pytest.approx(target, rel=1e-3)
    assert epsilon(ledger_of(z), 1e-5, accountant) <= target


def test_analytic_gaussian_mechanism_meets_balle_and_wangs_delta():
    for eps, delta in ((0.5, 1e-5), (3.0, 1e-6), (10.0, 1e-5)):
        sigma = analytic_gaussian_sigma(eps, delta)
        exact = norm.cdf(1 / (2 * sigma) - eps * sigma) - math.exp(eps) * norm.cdf(-1 / (2 * sigma) - eps * sigma)
        assert exact == pytest.approx(delta, rel=1e-6)
        assert analytic_gaussian_epsilon(sigma, delta) == pytest.approx(eps, rel=1e-6)
    # smaller than the classic sqrt(2 ln(1.25 / delta)) / eps where that is valid (eps < 1)
    assert analytic_gaussian_sigma(0.5, 1e-5) < math.sqrt(2 * math.log(1.25 / 1e-5)) / 0.5


def test_local_composition_of_gaussians_is_one_gaussian():
    """c releases of multiplier z compose to one of z / sqrt(c): the analytic epsilon is PLD's."""
    z, count = 3.0, 25
    assert analytic_gaussian_epsilon(z / math.sqrt(count), 1e-5) == pytest.approx(
        epsilon({GaussianRelease(z): count}, 1e-5, "pld"), rel=1e-3)


def test_fixed_size_sampling_is_accounted_by_rdp_only():
    release = GaussianRelease(1.0, "fixed", 0.1, 10, 100)
    reference = rdp_privacy_accountant.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    reference.compose(dp_accounting.SampledWithoutReplacementDpEvent(100, 10, dp_accounting.GaussianDpEvent(1.0)), 20)
    assert epsilon({release: 20}, 1e-5, "rdp") == pytest.approx(reference.get_epsilon(1e-5), rel=1e-9)
    with pytest.raises(ValueError, match="rdp"):
        epsilon({release: 20}, 1e-5, "pld")

"""An empirical audit of the central mechanism with a canary client: its lower bound stays
below the accountant's epsilon, and rises above it when the noise is switched off."""

import torch

from fedsim.config import validate_config
from fedsim.privacy.audit import epsilon_lower_bound
from fedsim.privacy.server import ServerPrivacy
from fedsim.strategies.replies import ClientUpdate

TRIALS = 2000


def _scores(privacy, canary: bool):
    """The canary's coordinate of one round's aggregate, per trial; the other clients send
    updates of norm 3 clip norms away from it."""
    others = [ClientUpdate(i, 1, torch.tensor([0.0, 3.0, 0.0]), 0) for i in range(3)]
    canary_update = [ClientUpdate(99, 1, torch.tensor([5.0, 0.0, 0.0]), 0)] if canary else []
    return [float(privacy.aggregate(trial, others + canary_update)[0]) for trial in range(TRIALS)]


def _privacy():
    cfg = validate_config({"partition": {"num_clients": 4}, "strategy": {"fraction_train": 1.0},
                           "privacy": {"mechanism": "central", "noise_multiplier": 1.0, "delta": 1e-5}})
    privacy = ServerPrivacy(cfg, [10] * 4)
    privacy.spend([])
    return privacy


def test_the_audits_lower_bound_stays_below_the_accountants_epsilon():
    privacy = _privacy()
    claimed = privacy.epsilon()  # one unsampled Gaussian release of multiplier 1
    bound = epsilon_lower_bound(_scores(privacy, False), _scores(privacy, True), 1e-5)
    assert 0.5 < bound < claimed


def test_the_audit_flags_a_mechanism_whose_noise_is_off():
    privacy = _privacy()
    claimed = privacy.epsilon()
    privacy.noise_std = lambda: 0.0
    bound = epsilon_lower_bound(_scores(privacy, False), _scores(privacy, True), 1e-5)
    assert bound > claimed

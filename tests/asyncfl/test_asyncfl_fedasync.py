"""FedAsync: immediate mixing with polynomial staleness decay, hand-computed values."""

import math

import pytest
import torch

from fedsim.algorithms.fedasync import FedAsync, fedasync_mix, polynomial_staleness


def test_polynomial_staleness_hand_values():
    assert polynomial_staleness(0) == 1.0
    assert polynomial_staleness(3, a=0.5) == pytest.approx(0.5)
    assert polynomial_staleness(7, a=1.0) == pytest.approx(0.125)
    assert polynomial_staleness(5, a=0.0) == 1.0
    with pytest.raises(ValueError, match="staleness must be >= 0"):
        polynomial_staleness(-1)


def test_fedasync_mix_is_convex_combination():
    mixed = fedasync_mix(torch.tensor([0.0, 2.0]), torch.tensor([1.0, 0.0]), 0.25)
    torch.testing.assert_close(mixed, torch.tensor([0.25, 1.5]))


def test_fedasync_mixes_each_arrival_with_staleness_decay():
    server = FedAsync(alpha=0.6, a=0.5)
    model = torch.zeros(2)
    model = server.apply(model, torch.ones(2), base_version=0)  # fresh: alpha_t = 0.6
    torch.testing.assert_close(model, torch.full((2,), 0.6))
    assert server.version == 1

    # started from version 0, one update since: alpha_t = 0.6 / sqrt(2)
    alpha_t = 0.6 / math.sqrt(2.0)
    assert server.mixing_weight(0) == pytest.approx(alpha_t)
    model = server.apply(model, torch.full((2,), 2.0), base_version=0)
    torch.testing.assert_close(model, torch.full((2,), 0.6 + alpha_t * 1.4))

    server.apply(model, model, base_version=2)
    assert server.staleness(0) == 3
    assert server.mixing_weight(0) == pytest.approx(0.3)  # 0.6 * (1 + 3)^(-1/2)


def test_fedasync_rejects_versions_from_the_future_and_bad_alpha():
    server = FedAsync()
    with pytest.raises(ValueError, match="base_version 1 is not in"):
        server.apply(torch.zeros(1), torch.ones(1), base_version=1)
    with pytest.raises(ValueError, match="alpha must be in"):
        FedAsync(alpha=1.5)


def test_fedasync_mix_rejects_mismatched_shapes_and_weights():
    with pytest.raises(ValueError, match="does not match the global model"):
        fedasync_mix(torch.zeros(3), torch.zeros(2), 0.5)
    with pytest.raises(ValueError, match="alpha_t must be in"):
        fedasync_mix(torch.zeros(2), torch.zeros(2), 1.5)

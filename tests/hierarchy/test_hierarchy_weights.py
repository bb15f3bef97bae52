"""Hierarchical FL's association and weights (fedsim.strategies.hierarchy) on tiny cases
against plain computations."""

import numpy as np
import pytest
import torch

from fedsim.loops.hierarchical import accuracy_oscillation
from fedsim.strategies.aggregate import weighted_mean
from fedsim.strategies.hierarchy import (
    NO_CONTACT,
    association_shares,
    cloud_weights,
    edge_scale,
    orbit_contacts,
    static_contacts,
)


def test_static_association_puts_client_k_at_gateway_k_mod_g_at_every_time():
    assert static_contacts(5, 2, np.arange(3)).tolist() == [[0, 1, 0, 1, 0]] * 3


def test_orbits_pass_the_gateways_in_turn_with_gaps_between_their_arcs():
    # two gateways at positions 0 and 0.5 seeing arcs of width 0.2; period 4 edge rounds:
    # a client of phase 0 is at 0, 0.25, 0.5, 0.75 at t = 0..3
    contacts = orbit_contacts(np.array([0.0, 0.45]), 4.0, 2, 0.2, np.arange(4))
    # client 0: at gateway 0, in the gap, at gateway 1, in the gap
    # client 1 (phase 0.45): 0.45 (gw 1), 0.7 (gap), 0.95 (gw 0), 0.2 (gap)
    assert contacts.tolist() == [[0, 1], [NO_CONTACT, NO_CONTACT], [1, 0], [NO_CONTACT, NO_CONTACT]]


def test_association_shares_are_the_share_of_edge_rounds_with_each_gateway():
    contacts = np.array([[0, 1, NO_CONTACT], [0, 0, NO_CONTACT], [1, 0, 1], [0, 0, 1]])
    shares = association_shares(contacts, 2)
    assert shares.tolist() == [[0.75, 0.25], [0.75, 0.25], [0.0, 0.5]]


def test_semspacefl_weights_scale_samples_by_association_at_both_tiers():
    n = np.array([10.0, 30.0, 20.0])
    shares = np.array([[0.75, 0.25], [0.5, 0.5], [0.0, 0.5]])
    aggregated = np.array([[True, True], [True, True], [False, True]])
    assert edge_scale("semspacefl", shares, 1).tolist() == [0.25, 0.5, 0.5]
    assert edge_scale("samples", shares, 1).tolist() == [1.0, 1.0, 1.0]
    # W_0 = 10 * 0.75 + 30 * 0.5 = 22.5; W_1 = 10 * 0.25 + 30 * 0.5 + 20 * 0.5 = 27.5
    assert cloud_weights("semspacefl", n, shares, aggregated).tolist() == [22.5, 27.5]
    # samples: every client a gateway aggregated counts with all its samples
    assert cloud_weights("samples", n, shares, aggregated).tolist() == [40.0, 60.0]


def test_one_edge_round_with_full_association_and_sample_weights_is_flat_fedavg():
    torch.manual_seed(0)
    n = np.array([5.0, 17.0, 8.0, 30.0, 11.0])
    updates = torch.randn(5, 7, dtype=torch.float64)
    contacts = static_contacts(5, 2, np.arange(1))
    shares = association_shares(contacts, 2)
    aggregated = shares > 0
    edge = [weighted_mean(updates[contacts[0] == g], torch.tensor(n[contacts[0] == g] * edge_scale("samples", shares, g)
                                                                   [contacts[0] == g])) for g in range(2)]
    cloud = weighted_mean(torch.stack(edge), torch.tensor(cloud_weights("samples", n, shares, aggregated)))
    torch.testing.assert_close(cloud, weighted_mean(updates, torch.tensor(n)), rtol=1e-12, atol=1e-12)
    # so is semspacefl then: every a_kg is 0 or 1
    assert cloud_weights("semspacefl", n, shares, aggregated).tolist() == cloud_weights(
        "samples", n, shares, aggregated).tolist()


@pytest.mark.parametrize("width", [0.1, 0.25, 0.5])
def test_a_client_is_with_at_most_one_gateway_and_in_contact_for_about_the_covered_share(width):
    phases = np.random.default_rng(0).random(200)
    contacts = orbit_contacts(phases, 7.0, 4, width, np.arange(70))
    covered = min(1.0, 4 * width)
    assert abs((contacts != NO_CONTACT).mean() - covered) < 0.03
    assert set(np.unique(contacts)) <= {NO_CONTACT, 0, 1, 2, 3}


def test_accuracy_oscillation_is_the_mean_absolute_change_over_the_second_half():
    rows = [{"centralised_accuracy": a} for a in (0.1, 0.9, 0.5, 0.6, 0.4, 0.7)]
    # second half: 0.6, 0.4, 0.7 -> changes 0.2 and 0.3
    assert accuracy_oscillation(rows) == pytest.approx(0.25)
    assert accuracy_oscillation(rows[:2]) is None

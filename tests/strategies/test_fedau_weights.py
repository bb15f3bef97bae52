"""FedAU: online weights on a hand-written participation sequence, aggregation, state."""

import json

import numpy as np
import pytest
import torch

from fedsim.algorithms.fedau import FedAUWeights, fedau_aggregate


def test_fedau_weights_match_hand_computed_sequence():
    # K = 3, three clients, rounds 1..8 (round 7 not observed: nobody took part).
    # Gaps (rounds between participations, capped by closing at K) worked out by hand:
    #   r1 {0,2}: both first participations -> 1; close gap 1 for 0 and 2
    #   r2 {0,1}: 0 -> mean[1] = 1, 1 -> first = 1; close 1 (client 0) and 2 (client 1)
    #   r4: client 2's open gap reaches K = 3 -> closed as 3
    #   r5 {0}: 0 -> mean[1,1] = 1, then closes 3; client 1's open gap reaches 3 -> closed
    #   r6 {0,2}: 0 -> mean[1,1,3] = 5/3 (not the gap closing now), 2 -> mean[1,3] = 2
    #   r8 {1}: 1 -> mean[2,3] = 2.5
    fedau = FedAUWeights(num_clients=3, K=3)
    assert fedau.observe(1, [0, 2]) == {0: 1.0, 2: 1.0}
    assert fedau.observe(2, [1, 0]) == {0: 1.0, 1: 1.0}
    assert fedau.observe(3, []) == {}
    assert fedau.observe(4, []) == {}
    assert fedau.observe(5, [0]) == {0: 1.0}
    got = fedau.observe(6, [0, 2])
    assert got == pytest.approx({0: 5 / 3, 2: 2.0})
    assert fedau.observe(8, [1]) == pytest.approx({1: 2.5})
    np.testing.assert_allclose(fedau.omega(), [6 / 4, 8 / 3, 6 / 3])


def test_fedau_weight_estimates_inverse_participation_probability():
    rng = np.random.default_rng(0)
    p = np.array([0.1, 0.25, 0.5, 1.0])
    fedau = FedAUWeights(num_clients=4, K=10_000)
    for t in range(1, 4001):
        fedau.observe(t, np.flatnonzero(rng.random(4) < p).tolist())
    np.testing.assert_allclose(fedau.omega(), 1 / p, rtol=0.1)


def test_fedau_cutoff_caps_every_gap_at_k():
    fedau = FedAUWeights(num_clients=1, K=5)
    fedau.observe(1, [0])  # gap 1
    # Rounds 2..39 are absences: the open gap reaches K = 5 seven times (closed as 5 each),
    # 3 rounds stay open. Those closed gaps count before the client returns at round 40.
    assert fedau.observe(40, [0]) == pytest.approx({0: (1 + 7 * 5) / 8})
    assert fedau.omega()[0] == pytest.approx((1 + 7 * 5 + 4) / 9)  # round 40 closes 3 + 1


def test_fedau_state_dict_round_trip_continues_identically():
    rng = np.random.default_rng(1)
    rounds = [(t, np.flatnonzero(rng.random(6) < 0.3).tolist()) for t in range(1, 61)]
    full = FedAUWeights(num_clients=6, K=7)
    for t, ids in rounds[:30]:
        full.observe(t, ids)
    state = json.loads(json.dumps(full.state_dict()))  # plain, serialisable
    resumed = FedAUWeights(num_clients=6, K=7)
    resumed.load_state_dict(state)
    for t, ids in rounds[30:]:
        assert resumed.observe(t, ids) == full.observe(t, ids)


def test_fedau_clients_added_later_start_without_history_and_the_others_keep_theirs():
    fedau = FedAUWeights(num_clients=2, K=50)
    fedau.observe(1, [0])
    fedau.observe(2, [1])  # 0's gap stays open; 1 closes a gap of 2
    fedau.add_clients(1)  # client 2 joins before round 3
    assert fedau.num_clients == 3
    assert fedau.observe(3, [0, 1, 2]) == {0: 1.0, 1: 2.0, 2: 1.0}  # 2: first participation
    assert fedau.observe(5, [0, 2]) == {0: 1.5, 2: 1.0}  # 0: gaps 1, 2; 2: gap 1 from round 3
    with pytest.raises(ValueError, match="count must be >= 0"):
        fedau.add_clients(-1)


def test_fedau_observe_rejects_bad_input():
    fedau = FedAUWeights(num_clients=3)
    fedau.observe(5, [0])
    with pytest.raises(ValueError, match="not after"):
        fedau.observe(5, [1])
    with pytest.raises(ValueError, match="must be in"):
        fedau.observe(6, [3])
    with pytest.raises(ValueError, match="num_clients=3"):
        FedAUWeights(num_clients=4).load_state_dict(fedau.state_dict())


def test_fedau_aggregate_divides_by_total_number_of_clients():
    updates = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    out = fedau_aggregate(updates, [2.0, 0.5], num_clients=10)
    torch.testing.assert_close(out, torch.tensor([0.35, 0.6]))  # (2*[1,2] + 0.5*[3,4]) / 10
    torch.testing.assert_close(fedau_aggregate(updates, [2.0, 0.5], num_clients=10, eta_g=2.0),
                               torch.tensor([0.7, 1.2]))
    with pytest.raises(ValueError, match="weights"):
        fedau_aggregate(updates, [1.0], num_clients=10)

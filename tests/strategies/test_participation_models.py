"""Participation models: empirical frequencies, Markov stationarity, cyclic pattern, determinism."""

import numpy as np
import pytest

from fedsim.strategies.participation import (
    BernoulliParticipation,
    CyclicParticipation,
    MarkovParticipation,
    UniformSampler,
)

ROUNDS = 3000


def _frequencies(model, rounds: int = ROUNDS, start: int = 1) -> np.ndarray:
    counts = np.zeros(model.num_clients)
    for t in range(start, start + rounds):
        ids = model.sample(t)
        assert ids == sorted(set(ids))
        counts[ids] += 1
    return counts / rounds


def test_uniform_sampler_size_frequencies_and_determinism():
    sampler = UniformSampler(20, fraction=0.25, seed=3)
    assert len(sampler.sample(1)) == 5
    np.testing.assert_allclose(_frequencies(sampler), sampler.probabilities(), atol=0.03)
    assert sampler.sample(7) == UniformSampler(20, clients_per_round=5, seed=3).sample(7)
    assert sampler.sample(7) != UniformSampler(20, clients_per_round=5, seed=4).sample(7)
    with pytest.raises(ValueError, match="exactly one"):
        UniformSampler(20, clients_per_round=5, fraction=0.25)


def test_bernoulli_frequencies_match_probabilities():
    model = BernoulliParticipation([0.05, 0.2, 0.5, 0.9, 1.0, 0.0], seed=0)
    np.testing.assert_allclose(_frequencies(model), model.probabilities(), atol=0.03)
    drawn = BernoulliParticipation.from_uniform(8, low=0.1, high=0.3, seed=2)
    assert np.all((drawn.probabilities() >= 0.1) & (drawn.probabilities() <= 0.3))
    assert drawn.sample(11) == BernoulliParticipation.from_uniform(8, low=0.1, high=0.3, seed=2).sample(11)


def test_bernoulli_probabilities_tied_to_label_mix():
    # Two pure-class clients and one mixed client; the mapping is linear in the label mix.
    labels = np.array([[100, 0], [0, 100], [50, 50]])
    model = BernoulliParticipation.from_label_distribution(labels, mean_probability=0.3,
                                                           min_probability=0.0, concentration=1.0, seed=5)
    p = model.probabilities()
    assert p[2] == pytest.approx((p[0] + p[1]) / 2)
    assert np.mean(p) == pytest.approx(0.3)  # C * mean * <q, v> averages to mean when rows cover classes evenly
    assert not np.isclose(p[0], p[1])


def test_markov_stationary_probability_and_frequencies():
    model = MarkovParticipation(p_on_to_off=[0.1, 0.5, 0.02], p_off_to_on=[0.1, 0.1, 0.2], seed=1)
    np.testing.assert_allclose(model.probabilities(), [0.5, 1 / 6, 0.2 / 0.22])
    np.testing.assert_allclose(_frequencies(model, rounds=6000), model.probabilities(), atol=0.06)
    tied = MarkovParticipation.from_probabilities([0.1, 0.5, 0.9], p_off_to_on=0.2)
    np.testing.assert_allclose(tied.probabilities(), [0.1, 0.5, 0.9])
    assert np.all(tied.p_on_to_off <= 1.0)


def test_markov_is_deterministic_and_resumes_identically():
    def build():
        return MarkovParticipation(0.2, 0.1, num_clients=10, seed=7)

    full = build()
    history = [full.sample(t) for t in range(1, 41)]
    resumed = build()
    for t in range(1, 21):
        resumed.sample(t)
    state = resumed.state_dict()
    fresh = build()
    fresh.load_state_dict(state)
    assert [fresh.sample(t) for t in range(21, 41)] == history[20:]
    assert build().sample(33) == history[32]  # replay from scratch gives the same answer
    assert full.sample(5) == history[4]  # going back replays the chain


def test_cyclic_pattern():
    model = CyclicParticipation(10, num_groups=3, seed=0)
    groups = [model.sample(t) for t in range(3)]
    assert sorted(sum(groups, [])) == list(range(10))
    assert sorted(len(g) for g in groups) == [3, 3, 4]
    for t in range(3, 12):
        assert model.sample(t) == groups[t % 3]
    np.testing.assert_allclose(_frequencies(model, rounds=300, start=0), model.probabilities())
    assert CyclicParticipation(10, 3, seed=0).sample(4) == model.sample(4)

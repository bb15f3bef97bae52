"""Gossip steps: consensus at the mean; variance correction keeps per-layer variance."""

import math

import pytest
import torch

from fedsim.algorithms.gossip import (
    consensus_distance,
    gossip_mix,
    neighbour_average,
    variance_correct,
    variance_corrected_average,
)
from fedsim.topology import make_topology, mixing_matrix, neighbours

N = 16


def _node_layers(seed, shapes=((20, 10), (64,), (5, 3, 3))):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(N, *shape, generator=generator, dtype=torch.float64) for shape in shapes]


def _layer_variances(layer):
    return layer.reshape(layer.shape[0], -1).var(dim=1, correction=0)


def test_consensus_distance_hand_value_and_layer_split():
    models = torch.tensor([[0.0, 0.0, 1.0], [2.0, 0.0, 1.0]])
    assert consensus_distance(models) == pytest.approx(1.0)
    assert consensus_distance([models[:, :2], models[:, 2:]]) == pytest.approx(1.0)
    assert consensus_distance(torch.ones(4, 3)) == 0.0


def test_neighbour_average_hand_values():
    models = torch.tensor([[0.0], [3.0], [6.0]])
    mixed = neighbour_average(models, [[1], [0, 2], [1]])
    torch.testing.assert_close(mixed, torch.tensor([[1.5], [3.0], [4.5]]))
    torch.testing.assert_close(neighbour_average(models, [[], [], []]), models)
    with pytest.raises(ValueError, match="must be other nodes"):
        neighbour_average(models, [[0], [2], [1]])


@pytest.mark.parametrize(("name", "kw"), [("ring", {}), ("random_regular", {"degree": 4}),
                                          ("erdos_renyi", {})])
def test_plain_gossip_reaches_consensus_at_the_mean(name, kw):
    topology = make_topology(name, N, seed=0, **kw)
    W = mixing_matrix(topology.adjacency())
    models = _node_layers(0)
    means = [layer.mean(dim=0) for layer in models]
    start = consensus_distance(models)
    for _ in range(400):
        models = gossip_mix(models, W)
    assert consensus_distance(models) < 1e-10 * start
    for layer, mean in zip(models, means):
        torch.testing.assert_close(layer.mean(dim=0), mean)
        torch.testing.assert_close(layer, mean.expand_as(layer))


def test_paper_rule_on_regular_graph_preserves_the_mean():
    peers = neighbours(make_topology("random_regular", N, seed=1, degree=4))
    models = torch.randn(N, 50, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    mean = models.mean(dim=0)
    for _ in range(200):
        models = neighbour_average(models, peers)
    torch.testing.assert_close(models.mean(dim=0), mean)
    assert consensus_distance(models) < 1e-8


def test_variance_correct_hand_value():
    corrected = variance_correct(torch.tensor([0.0, 2.0]),
                                 [torch.tensor([0.0, 4.0]), torch.tensor([1.0, 1.0])], eps=0.0)
    # mean 1, var 1; target = (4 + 0) / 2 = 2
    torch.testing.assert_close(corrected, torch.tensor([1 - math.sqrt(2), 1 + math.sqrt(2)]))


def test_variance_correction_matches_the_mixed_models_average_variance():
    peers = neighbours(make_topology("random_regular", N, seed=0, degree=4))
    models = _node_layers(1)
    corrected = variance_corrected_average(models, peers)
    plain = neighbour_average(models, peers)
    for before, after, uncorrected in zip(models, corrected, plain):
        variances = _layer_variances(before)
        target = torch.stack([variances[[i, *peers[i]]].mean() for i in range(N)])
        torch.testing.assert_close(_layer_variances(after), target, rtol=1e-3, atol=0)
        torch.testing.assert_close(after.reshape(N, -1).mean(dim=1),
                                   uncorrected.reshape(N, -1).mean(dim=1))
        # 0.5 x_i + 0.125 sum of 4 peers keeps ~0.3125 of independent models' variance
        assert float(_layer_variances(uncorrected).mean()) < 0.5 * float(target.mean())


def test_variance_stays_near_initial_with_correction_and_vanishes_without():
    peers = neighbours(make_topology("random_regular", N, seed=2, degree=4))
    corrected = plain = _node_layers(2)
    initial = [float(_layer_variances(layer).mean()) for layer in plain]
    for _ in range(20):
        corrected = variance_corrected_average(corrected, peers)
        plain = neighbour_average(plain, peers)
    for start, with_fix, without in zip(initial, corrected, plain):
        assert float(_layer_variances(with_fix).mean()) == pytest.approx(start, rel=0.05)
        assert float(_layer_variances(without).mean()) < 0.1 * start


def test_single_tensor_models_are_treated_as_one_layer():
    peers = neighbours(make_topology("ring", N))
    models = torch.randn(N, 30, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    corrected = variance_corrected_average(models, peers)
    assert isinstance(corrected, torch.Tensor) and corrected.shape == models.shape


def test_bad_gossip_inputs_fail_clearly():
    models = torch.zeros(4, 3)
    with pytest.raises(ValueError, match="expected \\(4, 4\\)"):
        gossip_mix(models, torch.eye(3))
    with pytest.raises(ValueError, match="must stack the 4 nodes"):
        gossip_mix([models, torch.zeros(3, 2)], torch.eye(4))
    with pytest.raises(ValueError, match="must stack k >= 1 layers shaped"):
        variance_correct(torch.zeros(3), [torch.zeros(2)])
    with pytest.raises(ValueError, match="must stack k >= 1 layers shaped"):
        variance_correct(torch.zeros(3), [])

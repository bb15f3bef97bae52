"""Topologies and mixing matrices: doubly stochastic, symmetric, connected, right degrees."""

import math

import pytest
import torch

from fedsim.topology import (
    is_connected,
    make_topology,
    mixing_matrix,
    neighbours,
    one_peer_exponential,
    random_regular,
    ring,
    torus,
)

N = 16
STATIC = [
    ("ring", {}),
    ("torus", {}),
    ("random_regular", {"degree": 3}),
    ("random_regular", {"degree": 4}),
    ("erdos_renyi", {}),
    ("erdos_renyi", {"p": 0.3}),
    ("fully_connected", {}),
]


def _assert_doubly_stochastic(W):
    n = W.shape[0]
    assert bool((W >= 0).all())
    torch.testing.assert_close(W.sum(dim=1), torch.ones(n, dtype=W.dtype))
    torch.testing.assert_close(W.sum(dim=0), torch.ones(n, dtype=W.dtype))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("name", "kw"), STATIC)
def test_static_topologies_give_symmetric_doubly_stochastic_metropolis(name, kw, seed):
    topology = make_topology(name, N, seed=seed, **kw)
    adjacency = topology.adjacency()
    assert topology.num_nodes == N and topology.period == 1
    assert torch.equal(adjacency, adjacency.T)
    assert not bool(adjacency.diagonal().any())
    assert is_connected(adjacency)
    W = mixing_matrix(adjacency)
    torch.testing.assert_close(W, W.T)
    _assert_doubly_stochastic(W)


def test_degrees_of_regular_families():
    def degrees(topology):
        return set(topology.adjacency().sum(dim=1).tolist())

    assert degrees(ring(N)) == {2}
    assert degrees(torus(N)) == {4}
    assert degrees(torus(50)) == {4}  # 5 x 10
    for seed in range(3):
        assert degrees(random_regular(N, 3, seed=seed)) == {3}
    assert degrees(random_regular(50, 8, seed=0)) == {8}  # the paper's default graph


def test_random_graphs_are_seeded():
    a = make_topology("random_regular", N, seed=4, degree=4).adjacency()
    assert torch.equal(a, make_topology("random_regular", N, seed=4, degree=4).adjacency())
    assert not torch.equal(a, make_topology("random_regular", N, seed=5, degree=4).adjacency())
    b = make_topology("erdos_renyi", N, seed=4).adjacency()
    assert torch.equal(b, make_topology("erdos_renyi", N, seed=4).adjacency())


def test_metropolis_hand_values_on_a_path():
    path = torch.tensor([[0, 1, 0], [1, 0, 1], [0, 1, 0]], dtype=torch.bool)
    W = mixing_matrix(path)
    expected = torch.tensor([[2 / 3, 1 / 3, 0], [1 / 3, 1 / 3, 1 / 3], [0, 1 / 3, 2 / 3]],
                            dtype=torch.float64)
    torch.testing.assert_close(W, expected)
    assert not is_connected(torch.zeros(3, 3, dtype=torch.bool))


@pytest.mark.parametrize("n", [2, 8, 16, 32])
def test_one_peer_exponential_averages_exactly_over_a_period(n):
    topology = one_peer_exponential(n)
    assert topology.period == int(math.log2(n))
    product = torch.eye(n, dtype=torch.float64)
    union = torch.zeros(n, n, dtype=torch.bool)
    for t in range(topology.period):
        adjacency = topology.adjacency(t)
        assert adjacency.sum(dim=1).tolist() == [1] * n  # one peer each
        W = mixing_matrix(adjacency, rule="uniform")
        _assert_doubly_stochastic(W)
        product = W @ product
        union |= adjacency
    torch.testing.assert_close(product, torch.full((n, n), 1.0 / n, dtype=torch.float64))
    assert is_connected(union)
    assert neighbours(topology, 0)[0] == [1]
    assert neighbours(topology, topology.period + 1)[0] == [2 ** (1 % topology.period) % n]


def test_bad_arguments_fail_with_clear_errors():
    with pytest.raises(ValueError, match="known: ring, torus"):
        make_topology("star", N)
    with pytest.raises(ValueError, match="degree"):
        make_topology("ring", N, degree=3)
    with pytest.raises(ValueError, match="num_nodes \\* degree even"):
        random_regular(15, 3)
    with pytest.raises(ValueError, match="both sides >= 3"):
        torus(14)
    with pytest.raises(ValueError, match="raise p"):
        make_topology("erdos_renyi", 40, p=0.01, max_tries=5)
    with pytest.raises(ValueError, match="symmetric"):
        mixing_matrix(one_peer_exponential(8).adjacency(0))
    with pytest.raises(ValueError, match="known: metropolis, uniform"):
        mixing_matrix(ring(4).adjacency(), rule="max_degree")

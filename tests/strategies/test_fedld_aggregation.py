"""FedLD: norm-preserving rebuild, identical updates, sign alignment, hand values, regulariser."""

import math

import pytest
import torch

from fedsim.algorithms.fedld import (
    fedld_aggregate,
    fedld_directions,
    fedld_rebuild,
    fedld_regulariser,
)


def test_fedld_rebuilt_updates_keep_their_norms():
    gen = torch.Generator().manual_seed(0)
    layer = torch.randn(6, 4, 5, generator=gen, dtype=torch.float64)
    rebuilt = fedld_rebuild(layer, keep=0.8)
    assert rebuilt.shape == layer.shape
    torch.testing.assert_close(rebuilt.flatten(1).norm(dim=1), layer.flatten(1).norm(dim=1))
    # ceil(0.8 * 6) = 5 kept directions; the rebuilt updates lie in their span.
    directions = fedld_directions(layer, keep=0.8).directions
    assert directions.shape == (5, 20)
    flat = rebuilt.flatten(1)
    torch.testing.assert_close(flat @ directions.T @ directions, flat)
    assert not torch.allclose(flat, layer.flatten(1))  # the discarded direction is gone


def test_fedld_identical_updates_aggregate_to_that_update():
    gen = torch.Generator().manual_seed(1)
    conv = torch.randn(3, 2, 3, generator=gen)
    bias = torch.randn(3, generator=gen)
    layers = [conv.expand(7, 3, 2, 3).clone(), bias.expand(7, 3).clone()]
    out = fedld_aggregate(layers, weights=[1, 2, 3, 4, 5, 6, 7])
    torch.testing.assert_close(out[0], conv)
    torch.testing.assert_close(out[1], bias)


def test_fedld_sign_alignment_flips_a_direction_most_clients_oppose():
    u = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    w = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    # Four clients point along -u, one strongly along +u: the top direction is +-u.
    stack = torch.stack([-u + 0.1 * w, -u - 0.1 * w, -1.2 * u, -0.9 * u + 0.05 * w, 3.0 * u])
    for x, expected_sign in ((stack, -1.0), (-stack, 1.0)):
        top = fedld_directions(x, keep=0.5).directions[0]
        assert float(top @ u) == pytest.approx(expected_sign, abs=0.05)
        projections = x @ top
        assert int((projections >= 0).sum()) >= 3  # agrees with the majority
    # The Gram matrix (hence its eigenvector) is the same for x and -x, so one of the two
    # cases above needed the flip.


def test_fedld_hand_computed_example():
    # x1 = (3, 4), x2 = (3, -4), x3 = (0, 1): X^T X = diag(18, 33), top direction (0, 1).
    # keep = 0.5 of rank 2 -> 1 direction. Rebuilt: (0, 4), (0, -4), (0, 1); rescaled to the
    # original norms 5, 5, 1: (0, 5), (0, -5), (0, 1). Weights 1, 1, 2 -> (0, 2/4).
    stack = torch.tensor([[3.0, 4.0], [3.0, -4.0], [0.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(fedld_rebuild(stack, keep=0.5),
                               torch.tensor([[0.0, 5.0], [0.0, -5.0], [0.0, 1.0]], dtype=torch.float64))
    (out,) = fedld_aggregate([stack], weights=[1, 1, 2], keep=0.5)
    torch.testing.assert_close(out, torch.tensor([0.0, 0.5], dtype=torch.float64))
    # A client with nothing in the kept span rebuilds to zero: x = (2,0), (0,1), (1,0).
    stack = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    (out,) = fedld_aggregate([stack], keep=0.5)
    torch.testing.assert_close(out, torch.tensor([1.0, 0.0], dtype=torch.float64))


def test_fedld_kept_count_is_ceil_of_keep_times_rank():
    gen = torch.Generator().manual_seed(2)
    basis = torch.randn(3, 10, generator=gen, dtype=torch.float64)
    rank_three = torch.randn(8, 3, generator=gen, dtype=torch.float64) @ basis  # N = 8, rank 3
    assert fedld_directions(rank_three, keep=0.8).directions.shape[0] == 3  # ceil(2.4)
    assert fedld_directions(rank_three, keep=0.5).directions.shape[0] == 2  # ceil(1.5)
    assert fedld_directions(rank_three, keep=0.01).directions.shape[0] == 1


def test_fedld_aggregate_is_weighted_mean_of_rebuilt_updates_and_full_keep_is_fedavg():
    gen = torch.Generator().manual_seed(3)
    layers = [torch.randn(5, 4, 3, generator=gen, dtype=torch.float64),
              torch.randn(5, 7, generator=gen, dtype=torch.float64)]
    weights = torch.tensor([10.0, 20.0, 30.0, 5.0, 35.0], dtype=torch.float64)
    out = fedld_aggregate(layers, weights=weights, keep=0.8)
    for layer, agg in zip(layers, out):
        expected = torch.einsum("n,n...->...", weights / weights.sum(), fedld_rebuild(layer, keep=0.8))
        torch.testing.assert_close(agg, expected)
    full = fedld_aggregate(layers, weights=weights, keep=1.0)
    for layer, agg in zip(layers, full):
        torch.testing.assert_close(agg, torch.einsum("n,n...->...", weights / weights.sum(), layer))


def test_fedld_rejects_bad_arguments():
    with pytest.raises(ValueError, match="keep"):
        fedld_aggregate([torch.ones(3, 2)], keep=0.0)
    with pytest.raises(ValueError, match="clients"):
        fedld_aggregate([torch.ones(3, 2), torch.ones(4, 2)])
    with pytest.raises(ValueError, match="weights"):
        fedld_aggregate([torch.ones(3, 2)], weights=[1.0, 2.0])


def test_fedld_regulariser_hand_value_and_gradient():
    logits = torch.zeros(2, 4, requires_grad=True)
    # softmax = 1/4 everywhere: ||P||_F^2 = 8 / 16 = 0.5
    value = fedld_regulariser(logits, beta=0.03)
    assert float(value.detach()) == pytest.approx(0.03 * math.log(1.5))
    peaked = torch.tensor([[10.0, 0.0, 0.0, 0.0], [0.0, 10.0, 0.0, 0.0]])
    assert float(fedld_regulariser(peaked)) > float(value.detach())  # confident batches are penalised more
    value.backward()
    assert logits.grad is not None and logits.grad.shape == (2, 4)


def test_fedld_aggregates_updates_whose_inner_products_overflow_as_their_scaled_down_copies():
    # a client diverging before its update turns NaN: float32 entries of 1e25 overflow <x_i, x_j>
    gen = torch.Generator().manual_seed(4)
    layers = [torch.randn(5, 4, 3, generator=gen), torch.randn(5, 7, generator=gen)]
    big = [layer * 1e25 for layer in layers]
    assert not torch.isfinite(big[0].flatten(1) @ big[0].flatten(1).T).all()
    for small, large in zip(fedld_aggregate(layers, keep=0.8), fedld_aggregate(big, keep=0.8), strict=True):
        assert torch.isfinite(large).all()
        torch.testing.assert_close(large / 1e25, small, rtol=1e-4, atol=1e-6)

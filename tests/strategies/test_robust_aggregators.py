"""Coordinate median, trimmed mean, Krum, Multi-Krum: hand values and Flower agreement."""

import numpy as np
import pytest
import torch
from flwr.server.strategy.aggregate import (
    aggregate_krum,
    aggregate_median,
    aggregate_trimmed_avg,
)

from fedsim.algorithms.krum import krum, krum_max_byzantine, krum_scores, multi_krum
from fedsim.algorithms.median import coordinate_median
from fedsim.algorithms.trimmed_mean import trimmed_mean
from fedsim.strategies.aggregate import gram_matrix, pairwise_sq_distances, weighted_mean


def test_coordinate_median_hand_values():
    x = torch.tensor([[1.0, 5.0], [2.0, 3.0], [10.0, -1.0]])
    torch.testing.assert_close(coordinate_median(x), torch.tensor([2.0, 3.0]))
    even = torch.tensor([[1.0], [2.0], [3.0], [10.0]])
    torch.testing.assert_close(coordinate_median(even), torch.tensor([2.5]))  # not torch's 2.0


def test_trimmed_mean_hand_values():
    x = torch.tensor([1.0, 2, 3, 4, 5, 6, 7, 8, 9, 100])[:, None]
    torch.testing.assert_close(trimmed_mean(x, beta=0.1), torch.tensor([5.5]))  # drops 1 and 100
    torch.testing.assert_close(trimmed_mean(x, beta=0.05), x.mean(dim=0))  # floor(0.5) = 0
    with pytest.raises(ValueError, match="beta"):
        trimmed_mean(x, beta=0.5)


def test_krum_and_multi_krum_hand_values():
    x = torch.tensor([[0.0], [1.0], [3.0], [100.0]])
    # f = 0: each score sums the n - f - 2 = 2 smallest squared distances to the others.
    torch.testing.assert_close(krum_scores(x, 0),
                               torch.tensor([1 + 9, 1 + 4, 4 + 9, 97**2 + 99**2], dtype=torch.float64))
    torch.testing.assert_close(krum(x, 0), torch.tensor([1.0]))
    torch.testing.assert_close(multi_krum(x, 0, m=2), torch.tensor([0.5]))  # mean of x1, x0
    torch.testing.assert_close(multi_krum(x, 1), torch.tensor([4.0 / 3.0]))  # m = n - f = 3
    with pytest.raises(ValueError, match="num_byzantine"):
        krum(x, 4)


def test_krum_max_byzantine_is_the_largest_f_with_n_above_2f_plus_2():
    assert [krum_max_byzantine(n) for n in range(1, 11)] == [0, 0, 0, 0, 1, 1, 2, 2, 3, 3]
    for n in range(3, 40):
        f = krum_max_byzantine(n)
        assert n > 2 * f + 2 and not n > 2 * (f + 1) + 2


def test_krum_picks_a_benign_update_under_attack():
    gen = torch.Generator().manual_seed(0)
    honest = torch.ones(15, 50) + 0.1 * torch.randn(15, 50, generator=gen)
    updates = torch.cat([honest, -10 * honest[:5]])
    chosen = krum(updates, num_byzantine=5)
    assert any(torch.equal(chosen, row) for row in honest)
    assert float((multi_krum(updates, 5) - honest.mean(dim=0)).norm()) < 0.2


def test_krum_excludes_finite_updates_whose_inner_products_overflow_float32():
    # clients diverging before their updates turn NaN: float32 entries of 1e25 overflow <x_i, x_j>
    gen = torch.Generator().manual_seed(3)
    honest = torch.ones(8, 40) + 0.1 * torch.randn(8, 40, generator=gen)
    updates = torch.cat([honest, 1e25 * torch.randn(2, 40, generator=gen)])
    assert not torch.isfinite(updates @ updates.T).all()
    wide = updates.double()
    torch.testing.assert_close(gram_matrix(updates), wide @ wide.T)
    assert torch.isfinite(pairwise_sq_distances(updates)).all()
    chosen = krum(updates, num_byzantine=2)
    assert any(torch.equal(chosen, row) for row in honest)
    assert float((multi_krum(updates, 2) - honest.mean(dim=0)).norm()) < 0.2


def test_robust_aggregators_agree_with_flower():
    rng = np.random.default_rng(1)
    arrays = [[rng.normal(size=(3, 4)), rng.normal(size=5)] for _ in range(9)]
    arrays[2] = [50 * a for a in arrays[2]]  # an outlier
    results = [(a, 10) for a in arrays]
    stacked = torch.tensor(np.stack([np.concatenate([p.ravel() for p in a]) for a in arrays]))

    def flat(layers):
        return torch.tensor(np.concatenate([np.asarray(p).ravel() for p in layers]))

    torch.testing.assert_close(coordinate_median(stacked), flat(aggregate_median(results)))
    torch.testing.assert_close(coordinate_median(stacked[:8]), flat(aggregate_median(results[:8])))
    torch.testing.assert_close(trimmed_mean(stacked, beta=0.2), flat(aggregate_trimmed_avg(results, 0.2)))
    torch.testing.assert_close(krum(stacked, 2), flat(aggregate_krum(results, num_malicious=2, to_keep=0)))
    torch.testing.assert_close(multi_krum(stacked, 2, m=4),
                               flat(aggregate_krum(results, num_malicious=2, to_keep=4)))


def test_shared_helpers():
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0]])
    torch.testing.assert_close(pairwise_sq_distances(x),
                               torch.tensor([[0.0, 25, 100], [25, 0, 25], [100, 25, 0]], dtype=torch.float64))
    torch.testing.assert_close(weighted_mean(x, [1, 0, 1]), torch.tensor([3.0, 4.0]))
    with pytest.raises(ValueError, match="weights"):
        weighted_mean(x, [0, 0, 0])


@pytest.mark.parametrize("n", [7, 50])
def test_median_and_trimmed_mean_equal_a_full_torch_sort_exactly(n):
    """The chunked, numpy-sorted rules give bit for bit what sorting each column with torch
    gives (several chunks of columns, odd and even N)."""
    updates = torch.randn(n, 40_000, generator=torch.Generator().manual_seed(n))
    ordered = updates.sort(dim=0).values
    median = ordered[n // 2] if n % 2 else ordered[n // 2 - 1] * 0.5 + ordered[n // 2] * 0.5
    torch.testing.assert_close(coordinate_median(updates), median, rtol=0, atol=0)
    k = int(0.2 * n)
    torch.testing.assert_close(trimmed_mean(updates, beta=0.2), ordered[k : n - k].T.contiguous().mean(dim=1),
                               rtol=0, atol=0)

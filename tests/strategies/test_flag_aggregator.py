"""Flag Aggregator: robustness, reduction to the mean, IRLS monotonicity, scale, memory."""

import math

import pytest
import torch

from fedsim.algorithms.flag import flag_aggregate, flag_objective, flag_subspace


def _angle_deg(a: torch.Tensor, b: torch.Tensor) -> float:
    cos = float(a.double() @ b.double() / (a.double().norm() * b.double().norm()))
    return math.degrees(math.acos(max(-1.0, min(1.0, cos))))


def _honest(n: int, d: int, spread: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    direction = torch.randn(d, generator=gen)
    direction /= direction.norm()
    return direction + spread * torch.randn(n, d, generator=gen) / math.sqrt(d)


def test_flag_stays_near_honest_mean_under_sign_flip_attack():
    honest = _honest(20, 2000, spread=0.5, seed=0)
    attackers = -5.0 * honest[:6]
    updates = torch.cat([honest, attackers])
    target = honest.mean(dim=0)
    assert _angle_deg(updates.mean(dim=0), target) > 90  # FedAvg is reversed
    assert _angle_deg(flag_aggregate(updates), target) < 15


def test_flag_stays_near_honest_mean_under_large_norm_noise_attack():
    honest = _honest(20, 2000, spread=0.5, seed=1)
    gen = torch.Generator().manual_seed(2)
    attackers = 100.0 * torch.randn(6, 2000, generator=gen)
    updates = torch.cat([honest, attackers])
    target = honest.mean(dim=0)
    assert _angle_deg(updates.mean(dim=0), target) > 60
    out = flag_aggregate(updates)
    assert _angle_deg(out, target) < 15
    # Output at gradient scale: no larger than the median norm (the projection shrinks).
    assert float(out.norm()) <= float(updates.norm(dim=1).median()) * (1 + 1e-5)


def test_flag_is_scale_equivariant_even_where_float32_inner_products_overflow():
    # clients diverging before their updates turn NaN: float32 entries of 1e25 overflow <x_i, x_j>
    honest = _honest(20, 2000, spread=0.5, seed=3)
    updates = torch.cat([honest, -5.0 * honest[:6]])
    big = updates * 1e25
    assert not torch.isfinite(big @ big.T).all()
    torch.testing.assert_close(flag_aggregate(big) / 1e25, flag_aggregate(updates), rtol=1e-4, atol=1e-6)


def test_flag_equals_plain_mean_without_attack_when_r_covers_the_rank():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 40, generator=gen, dtype=torch.float64)
    x = 2.5 * x / x.norm(dim=1, keepdim=True)  # equal norms
    torch.testing.assert_close(flag_aggregate(x, r=8), x.mean(dim=0), rtol=1e-10, atol=1e-12)
    x32 = x.float()
    torch.testing.assert_close(flag_aggregate(x32, r=5), x32.mean(dim=0), rtol=1e-5, atol=1e-6)


def test_flag_output_is_rescaled_by_the_median_norm_not_divided_by_r():
    direction = torch.tensor([0.6, 0.8, 0.0], dtype=torch.float64)
    norms = torch.tensor([1.0, 2.0, 3.0, 4.0, 1e6], dtype=torch.float64)  # one huge attacker
    updates = norms[:, None] * direction
    torch.testing.assert_close(flag_aggregate(updates, r=8), 3.0 * direction)


def _outlier_updates(seed: int) -> torch.Tensor:
    honest = _honest(12, 300, spread=2.0, seed=seed).double()
    gen = torch.Generator().manual_seed(seed + 100)
    return torch.cat([honest, 10 * torch.randn(5, 300, generator=gen, dtype=torch.float64)])


@pytest.mark.parametrize("lam", [0.0, 0.5])
def test_flag_irls_objective_never_increases(lam):
    updates = _outlier_updates(seed=4)
    result = flag_subspace(updates, r=3, lam=lam, max_iter=30, tol=0.0)
    history = result.objective_history
    assert len(history) > 3  # IRLS actually moved away from the PCA start
    assert all(b <= a for a, b in zip(history, history[1:]))
    # The reported objective is the objective of the returned subspace (independent formula).
    assert flag_objective(updates, result.basis, lam=lam) == pytest.approx(history[-1], rel=1e-9)
    # The start is the top-r PCA of the normalised updates (computed independently here).
    g = updates / updates.norm(dim=1, keepdim=True)
    pca = torch.linalg.svd(g.T, full_matrices=False).U[:, :3]
    assert flag_objective(updates, pca, lam=lam) == pytest.approx(history[0], rel=1e-9)
    # More iterations never give a worse subspace.
    values = [flag_objective(updates, flag_subspace(updates, r=3, lam=lam, max_iter=t).basis, lam=lam)
              for t in range(6)]
    assert all(b <= a + 1e-12 for a, b in zip(values, values[1:]))
    assert values[-1] < values[0]


def test_flag_basis_is_orthonormal_and_capped_at_the_rank():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 50, generator=gen, dtype=torch.float64)
    result = flag_subspace(x, r=8)
    assert result.basis.shape == (50, 3)  # N < r
    torch.testing.assert_close(result.basis.T @ result.basis, torch.eye(3, dtype=torch.float64))
    rank_two = torch.stack([x[0], x[1], x[0] + x[1], 2 * x[0]])
    assert flag_subspace(rank_two, r=8).basis.shape == (50, 2)


def test_flag_handles_zero_norm_updates():
    direction = torch.tensor([1.0, 0.0, 0.0, 0.0])
    updates = torch.stack([2 * direction, 4 * direction, torch.zeros(4), 3 * direction])
    # Mean of normalised updates = 3/4 direction; median norm = 2.5.
    torch.testing.assert_close(flag_aggregate(updates), 0.75 * 2.5 * direction)
    # Zero rows are left out of the subspace fit but count in the mean and the median norm.
    gen = torch.Generator().manual_seed(7)
    nonzero = torch.randn(5, 30, generator=gen, dtype=torch.float64)
    with_zeros = torch.cat([nonzero[:2], torch.zeros(2, 30, dtype=torch.float64), nonzero[2:]])
    norms, all_norms = nonzero.norm(dim=1), with_zeros.norm(dim=1)
    expected = flag_aggregate(nonzero, r=2) / norms.median() * all_norms.quantile(0.5) * 5 / 7
    torch.testing.assert_close(flag_aggregate(with_zeros, r=2), expected)
    zeros = torch.zeros(4, 6)
    out = flag_aggregate(zeros)
    assert torch.equal(out, torch.zeros(6))
    assert flag_subspace(zeros).basis.shape == (6, 0)


def test_flag_runs_at_d_1e5_without_a_d_by_d_matrix():
    # A D x D float32 matrix at D = 1e5 would need 40 GB; the Gram formulation needs N x N.
    gen = torch.Generator().manual_seed(6)
    updates = torch.randn(30, 100_000, generator=gen)
    out = flag_aggregate(updates, r=8)
    assert out.shape == (100_000,) and out.dtype == torch.float32
    assert bool(torch.isfinite(out).all())


def test_flag_rejects_bad_arguments():
    with pytest.raises(ValueError, match="r must be"):
        flag_aggregate(torch.ones(3, 4), r=0)
    with pytest.raises(ValueError, match="shape"):
        flag_aggregate(torch.ones(4))
    with pytest.raises(ValueError, match="lam"):
        flag_aggregate(torch.ones(3, 4), lam=-1.0)

"""Update and data attacks: each formula on a hand example, ALIE's z, input left untouched."""

import math
from statistics import NormalDist

import pytest
import torch

from fedsim.attacks import (
    alie,
    alie_z,
    byzantine_mask,
    gaussian_noise,
    ipm,
    label_flip,
    scaled_update,
    sign_flip,
)

UPDATES = torch.tensor([[1.0, 2.0], [3.0, 6.0], [5.0, 10.0], [-1.0, 4.0]])
BYZ = [3]  # the last row is Byzantine; benign rows are the first three


def test_sign_flip_and_scaled_update_replace_only_byzantine_rows():
    original = UPDATES.clone()
    torch.testing.assert_close(sign_flip(UPDATES, BYZ), torch.tensor([[1.0, 2], [3, 6], [5, 10], [1, -4]]))
    torch.testing.assert_close(sign_flip(UPDATES, [0, 3], scale=2.0),
                               torch.tensor([[-2.0, -4], [3, 6], [5, 10], [2, -8]]))
    torch.testing.assert_close(scaled_update(UPDATES, BYZ), torch.tensor([[1.0, 2], [3, 6], [5, 10], [-10, 40]]))
    assert torch.equal(UPDATES, original)  # inputs are not modified


def test_byzantine_rows_accept_masks_and_indices():
    mask = torch.tensor([False, True, False, True])
    assert torch.equal(byzantine_mask([1, 3], 4), mask)
    assert torch.equal(byzantine_mask(mask, 4), mask)
    torch.testing.assert_close(sign_flip(UPDATES, mask), sign_flip(UPDATES, [1, 3]))
    with pytest.raises(ValueError, match="indices"):
        sign_flip(UPDATES, [4])
    with pytest.raises(ValueError, match="shape"):
        sign_flip(UPDATES, torch.tensor([True, False]))


def test_gaussian_noise_replaces_byzantine_rows_with_seeded_noise():
    big = torch.zeros(3, 20000)
    out = gaussian_noise(big, [1, 2], std=3.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[0], big[0])
    assert float(out[1:].std()) == pytest.approx(3.0, rel=0.02)
    assert float(out[1:].mean()) == pytest.approx(0.0, abs=0.05)
    again = gaussian_noise(big, [1, 2], std=3.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_alie_z_formula_from_the_paper():
    # n = 50, f = 12: s = floor(26) - 12 = 14, z = Phi^-1((50 - 14) / 50) = Phi^-1(0.72)
    assert alie_z(50, 12) == pytest.approx(NormalDist().inv_cdf(0.72))
    assert alie_z(50, 12) == pytest.approx(0.5828, abs=1e-4)
    # n = 10, f = 1: s = 5, z = Phi^-1(0.5) = 0 (a single attacker cannot shift the median)
    assert alie_z(10, 1) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="undefined"):
        alie_z(10, 6)


def test_alie_sends_benign_mean_minus_z_std():
    # benign rows: mean (3, 6), sample std (2, 4)
    out = alie(UPDATES, BYZ, z=1.5)
    torch.testing.assert_close(out[3], torch.tensor([3.0 - 1.5 * 2.0, 6.0 - 1.5 * 4.0]))
    torch.testing.assert_close(out[:3], UPDATES[:3])
    z = alie_z(4, 1)  # s = 2, Phi^-1(0.5) = 0: the benign mean
    assert z == pytest.approx(0.0, abs=1e-12)
    torch.testing.assert_close(alie(UPDATES, BYZ)[3], torch.tensor([3.0, 6.0]))
    with pytest.raises(ValueError, match="2 benign"):
        alie(UPDATES, [1, 2, 3], z=1.0)


def test_ipm_sends_minus_epsilon_times_benign_mean():
    out = ipm(UPDATES, BYZ, epsilon=0.5)
    torch.testing.assert_close(out[3], torch.tensor([-1.5, -3.0]))
    assert math.isclose(float(ipm(UPDATES, BYZ)[3, 0]), -0.3, rel_tol=1e-6)
    torch.testing.assert_close(ipm(UPDATES, []), UPDATES)


def test_label_flip_maps_y_to_c_minus_1_minus_y():
    labels = torch.tensor([0, 1, 2, 9, 5])
    assert torch.equal(label_flip(labels, 10), torch.tensor([9, 8, 7, 0, 4]))
    assert torch.equal(label_flip(label_flip(labels, 10), 10), labels)
    with pytest.raises(ValueError, match="in \\[0, 3\\)"):
        label_flip(labels, 3)

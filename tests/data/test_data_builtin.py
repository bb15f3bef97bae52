import numpy as np
import pytest

from fedsim.data import generate_synthetic, load_digits


def test_digits_shape_range_and_stratified_split():
    train, test = load_digits(seed=0, test_fraction=0.2)
    assert train.x.shape[1:] == (1, 8, 8) and train.x.dtype == np.float32
    assert len(train) + len(test) == 1797 and len(test) == 360
    assert train.x.min() == 0.0 and train.x.max() == 1.0
    assert train.num_classes == 10 and train.groups is None
    assert set(np.unique(test.y)) == set(range(10))


def test_digits_split_depends_on_seed_only():
    first, _ = load_digits(seed=1)
    again, _ = load_digits(seed=1)
    other, _ = load_digits(seed=2)
    np.testing.assert_array_equal(first.x, again.x)
    assert not np.array_equal(first.y, other.y)


def test_synthetic_shapes_groups_and_per_device_split():
    train, test = generate_synthetic(alpha=0.5, beta=0.5, num_devices=6, seed=0)
    assert train.x.shape[1] == 60 and train.x.dtype == np.float32
    assert train.num_classes == 10 and train.y.max() < 10
    assert set(np.unique(train.groups)) == set(range(6)) == set(np.unique(test.groups))
    for device in range(6):
        num_train = np.sum(train.groups == device)
        num_test = np.sum(test.groups == device)
        assert num_train + num_test >= 50
        assert num_test == round(0.2 * (num_train + num_test))


def test_synthetic_is_seeded():
    first, _ = generate_synthetic(num_devices=4, seed=5)
    again, _ = generate_synthetic(num_devices=4, seed=5)
    other, _ = generate_synthetic(num_devices=4, seed=6)
    np.testing.assert_array_equal(first.x, again.x)
    np.testing.assert_array_equal(first.y, again.y)
    assert first.x.shape != other.x.shape or not np.array_equal(first.x, other.x)


def test_synthetic_inputs_follow_the_decaying_diagonal_covariance():
    train, _ = generate_synthetic(num_devices=10, dim=8, seed=0)
    # Within a device x ~ N(v_k, diag(j^-1.2)): centre per device, pool the variances.
    centred = np.concatenate(
        [train.x[train.groups == k] - train.x[train.groups == k].mean(axis=0) for k in range(10)]
    )
    assert len(centred) > 1000
    np.testing.assert_allclose(centred.var(axis=0), np.arange(1, 9) ** -1.2, rtol=0.15)


def test_synthetic_rejects_bad_settings():
    with pytest.raises(ValueError, match="alpha and beta must be >= 0"):
        generate_synthetic(alpha=-1.0)
    with pytest.raises(ValueError, match="num_devices"):
        generate_synthetic(num_devices=0)

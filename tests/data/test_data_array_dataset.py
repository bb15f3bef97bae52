import numpy as np
import pytest

from fedsim.data import ArrayDataset, split_train_test


def _dataset(n=20, num_classes=2, groups=None):
    return ArrayDataset(
        x=np.arange(n * 3, dtype=np.float32).reshape(n, 3),
        y=np.arange(n, dtype=np.int64) % num_classes,
        num_classes=num_classes,
        name="toy",
        groups=groups,
    )


def test_subset_takes_rows_of_x_y_and_groups():
    data = _dataset(groups=np.arange(20, dtype=np.int64) // 5)
    part = data.subset(np.array([3, 7]))
    np.testing.assert_array_equal(part.x, data.x[[3, 7]])
    np.testing.assert_array_equal(part.y, [1, 1])
    np.testing.assert_array_equal(part.groups, [0, 1])
    assert part.input_shape == (3,) and len(part) == 2 and part.num_classes == 2


def test_rejects_wrong_dtypes_lengths_and_labels():
    with pytest.raises(ValueError, match="float32"):
        ArrayDataset(np.zeros((2, 1)), np.zeros(2, np.int64), 2, "toy")
    with pytest.raises(ValueError, match="int64"):
        ArrayDataset(np.zeros((2, 1), np.float32), np.zeros(2, np.int32), 2, "toy")
    with pytest.raises(ValueError, match="3 samples but y has 2"):
        ArrayDataset(np.zeros((3, 1), np.float32), np.zeros(2, np.int64), 2, "toy")
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        ArrayDataset(np.zeros((2, 1), np.float32), np.array([0, 2]), 2, "toy")
    with pytest.raises(ValueError, match="groups"):
        _dataset(groups=np.zeros(3, np.int64))


def test_split_train_test_is_stratified_disjoint_and_seeded():
    data = _dataset(n=40)
    train, test = split_train_test(data, 0.25, seed=3)
    assert len(train) == 30 and len(test) == 10
    assert np.bincount(test.y).tolist() == [5, 5]
    rows = {tuple(row) for row in np.concatenate([train.x, test.x])}
    assert len(rows) == 40
    again, _ = split_train_test(data, 0.25, seed=3)
    np.testing.assert_array_equal(train.x, again.x)


def test_split_train_test_rejects_bad_fraction():
    with pytest.raises(ValueError, match=r"test_fraction: 1\.5 is not in"):
        split_train_test(_dataset(), 1.5, seed=0)

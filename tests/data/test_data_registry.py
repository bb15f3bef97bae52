import numpy as np
import pytest

from fedsim.data import DATASETS, load_dataset


def test_known_names():
    assert DATASETS == ("digits", "synthetic", "mnist", "cifar10", "npz", "hf", "shakespeare")


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="'mnst' is not a dataset; known: digits, synthetic"):
        load_dataset("mnst")


def test_unknown_option_lists_the_dataset_options():
    with pytest.raises(ValueError, match="'alpah' is not an option of dataset synthetic; known"):
        load_dataset("synthetic", alpah=1.0)


def test_path_rules():
    with pytest.raises(ValueError, match="dataset mnist needs a path"):
        load_dataset("mnist")
    with pytest.raises(ValueError, match="dataset digits takes no path"):
        load_dataset("digits", path="/tmp")
    with pytest.raises(ValueError, match="exactly one of hf_id"):
        load_dataset("hf")


def test_options_reach_the_generator():
    train, _ = load_dataset("synthetic", seed=2, num_devices=3, dim=5, num_classes=4)
    assert train.x.shape[1] == 5 and train.num_classes == 4
    assert set(np.unique(train.groups)) == {0, 1, 2}


def test_npz_through_load_dataset(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.ones((10, 3)), y=np.arange(10) % 2)
    train, test = load_dataset("npz", path=tmp_path / "d.npz", test_fraction=0.5)
    assert len(train) == len(test) == 5

"""Datasets named in the config reach the clients: Hugging Face (local folder), NPZ, Synthetic."""

import datasets
import numpy as np
import pytest
from sklearn.datasets import load_digits

from fedsim.config import ConfigError, validate_config
from fedsim.sim.components import federated_data


def _cfg(tmp_path, data, **partition):
    return validate_config({"data": data, "partition": {"num_clients": 4, "scheme": "iid", **partition},
                            "output": {"dir": str(tmp_path)}})


def test_hugging_face_dataset_from_a_local_folder_is_partitioned(tmp_path):
    digits = load_digits()
    features = datasets.Features({"pixels": datasets.Sequence(datasets.Value("float32")),
                                  "label": datasets.ClassLabel(num_classes=10)})
    ds = datasets.Dataset.from_dict({"pixels": (digits.data[:300] / 16).tolist(),
                                     "label": digits.target[:300].tolist()}, features=features)
    ds.save_to_disk(str(tmp_path / "hf"))
    cfg = _cfg(tmp_path, {"name": "hf", "path": str(tmp_path / "hf"), "hf_image_key": "pixels"})
    data = federated_data(cfg)
    assert data.train.num_classes == 10
    assert len(data.train.y) + len(data.test.y) == 300
    sizes = [len(a) + len(b) for a, b in zip(data.client_train, data.client_test, strict=True)]
    assert sum(sizes) == len(data.train.y) and min(sizes) > 0
    assert data.train.x.shape[1:] == (64,) and np.isclose(data.train.x.max(), 1.0)
    # every sample is one of the digits rows, scaled as written
    row = data.train.x[0]
    assert np.isclose(np.abs(digits.data[:300] / 16 - row).sum(axis=1), 0, atol=1e-6).any()


def test_hf_needs_exactly_one_source():
    with pytest.raises(ConfigError, match="exactly one of data.hf_id"):
        validate_config({"data": {"name": "hf"}})
    with pytest.raises(ConfigError, match="exactly one of data.hf_id"):
        validate_config({"data": {"name": "hf", "hf_id": "ylecun/mnist", "path": "/x"}})


def test_npz_file_named_in_the_config_is_loaded(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.random((80, 5)).astype(np.float32), y=rng.integers(0, 3, 80))
    data = federated_data(_cfg(tmp_path, {"name": "npz", "path": str(tmp_path / "d.npz")}))
    assert data.train.num_classes == 3 and data.train.x.shape[1:] == (5,)


def test_synthetic_uses_its_natural_partition(tmp_path):
    cfg = _cfg(tmp_path, {"name": "synthetic"}, scheme="natural", num_clients=30)
    data = federated_data(cfg)
    for pid in range(30):
        train, _ = data.client(pid)
        assert set(np.unique(train.groups)) == {pid}


def test_hugging_face_writer_column_gives_natural_clients(tmp_path):
    digits = load_digits()
    features = datasets.Features({"pixels": datasets.Sequence(datasets.Value("float32")),
                                  "label": datasets.ClassLabel(num_classes=10),
                                  "writer_id": datasets.Value("string")})
    writers = [f"f{i % 5:04d}" for i in range(200)]
    ds = datasets.DatasetDict({split: datasets.Dataset.from_dict(
        {"pixels": (digits.data[:200] / 16).tolist(), "label": digits.target[:200].tolist(), "writer_id": writers},
        features=features) for split in ("train", "test")})
    ds.save_to_disk(str(tmp_path / "hf"))
    cfg = _cfg(tmp_path, {"name": "hf", "path": str(tmp_path / "hf"), "hf_image_key": "pixels",
                          "hf_partition_by": "writer_id"}, scheme="natural", num_clients=5)
    data = federated_data(cfg)
    for i, (train, test) in enumerate(zip(data.client_train, data.client_test, strict=True)):
        rows = np.concatenate([train, test])
        assert len(rows) == 40 and set(rows % 5) == {i}  # writer f000i wrote rows i, i + 5, ...


def test_feature_noise_reaches_the_clients_and_spares_the_server_test_set(tmp_path):
    clean = federated_data(_cfg(tmp_path, {"name": "digits"}, scheme="iid"))
    noisy = federated_data(_cfg(tmp_path, {"name": "digits"}, scheme="feature_noise", noise_std=0.3))
    np.testing.assert_array_equal(noisy.test.x, clean.test.x)
    np.testing.assert_array_equal(noisy.train.x, clean.train.x)
    for client in range(4):  # the same IID indices; client i's noise std is 0.3 * i / 3
        np.testing.assert_array_equal(noisy.client_train[client], clean.client_train[client])
        seen, reference = noisy.client(client, server_round=1), clean.client(client)
        diff = np.concatenate([a.x - b.x for a, b in zip(seen, reference, strict=True)])
        np.testing.assert_allclose(diff.std(), 0.1 * client, rtol=0.05, atol=1e-7)
    assert not np.array_equal(noisy.client(3, server_round=1)[0].x, noisy.client(3, server_round=2)[0].x)


def test_a_single_split_hf_dataset_holds_out_its_test_set_when_told(tmp_path):
    digits = load_digits()
    features = datasets.Features({"pixels": datasets.Sequence(datasets.Value("float32")),
                                  "label": datasets.ClassLabel(num_classes=10)})
    only_train = datasets.DatasetDict({"train": datasets.Dataset.from_dict(
        {"pixels": (digits.data[:200] / 16).tolist(), "label": digits.target[:200].tolist()}, features=features)})
    only_train.save_to_disk(str(tmp_path / "hf"))
    source = {"name": "hf", "path": str(tmp_path / "hf"), "hf_image_key": "pixels"}
    with pytest.raises(ValueError, match="'test' is not a split; known: train"):
        federated_data(_cfg(tmp_path, source))
    data = federated_data(_cfg(tmp_path, {**source, "hf_test_split": None, "test_fraction": 0.25}))
    assert (len(data.train.y), len(data.test.y)) == (150, 50)

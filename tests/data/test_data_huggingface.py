"""Hugging Face conversion, on tiny in-memory datasets (no network)."""

import datasets
import huggingface_hub.constants
import numpy as np
import pytest
from PIL import Image

from fedsim.data import load_dataset, load_hf

_LABELS = datasets.ClassLabel(names=["a", "b", "c"])


def _grey_images(n):
    pixels = [np.arange(20, dtype=np.uint8).reshape(5, 4) * (i + 1) for i in range(n)]
    table = datasets.Dataset.from_dict(
        {"image": [Image.fromarray(p) for p in pixels], "label": [i % 3 for i in range(n)]},
        features=datasets.Features({"image": datasets.Image(), "label": _LABELS}),
    )
    return table, np.stack(pixels)


def test_grey_pil_images_become_nchw_floats():
    table, pixels = _grey_images(6)
    train, test = load_hf(datasets.DatasetDict({"train": table, "test": table.select([0, 1])}))
    assert train.x.shape == (6, 1, 5, 4) and train.x.dtype == np.float32
    np.testing.assert_allclose(train.x[:, 0], pixels / 255.0, atol=1e-7)
    np.testing.assert_array_equal(train.y, [0, 1, 2, 0, 1, 2])
    np.testing.assert_array_equal(test.y, [0, 1])
    assert train.num_classes == 3


def test_rgb_images_are_moved_to_channels_first():
    rgb = np.arange(2 * 3 * 2 * 3, dtype=np.uint8).reshape(2, 3, 2, 3)  # N, H, W, C
    table = datasets.Dataset.from_dict(
        {"img": [Image.fromarray(a) for a in rgb], "fine": [2, 0]},
        features=datasets.Features({"img": datasets.Image(), "fine": _LABELS}),
    )
    splits = datasets.DatasetDict({"train": table, "test": table})
    train, _ = load_hf(splits, image_key="img", label_key="fine")
    assert train.x.shape == (2, 3, 3, 2)
    np.testing.assert_allclose(train.x, rgb.transpose(0, 3, 1, 2) / 255.0, atol=1e-7)


def test_single_dataset_of_feature_vectors_is_split_seeded():
    vectors = np.arange(40, dtype=np.float32).reshape(10, 4)
    table = datasets.Dataset.from_dict({"image": vectors, "label": np.arange(10) % 2})
    train, test = load_hf(table, seed=1, test_fraction=0.2)
    assert train.x.shape == (8, 4) and test.x.shape == (2, 4)
    assert train.num_classes == 2
    rows = np.concatenate([train.x, test.x])
    np.testing.assert_array_equal(np.sort(rows[:, 0]), vectors[:, 0])


def test_missing_column_and_split_are_named():
    table, _ = _grey_images(3)
    with pytest.raises(ValueError, match="'pixels' is not a column; known: image, label"):
        load_hf(table, image_key="pixels")
    with pytest.raises(ValueError, match="'validation' is not a split; known: train"):
        load_hf(datasets.DatasetDict({"train": table}), test_split="validation")


def test_saved_dataset_loads_offline_through_load_dataset(tmp_path):
    table, pixels = _grey_images(6)
    datasets.DatasetDict({"train": table, "test": table}).save_to_disk(tmp_path / "saved")
    _, test = load_dataset("hf", path=tmp_path / "saved")
    np.testing.assert_allclose(test.x[:, 0], pixels / 255.0, atol=1e-7)


def test_hub_id_offline_says_what_to_do_instead(monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError, match=r"'ylecun/mnist' could not be loaded.*'npz'"):
        load_dataset("hf", hf_id="ylecun/mnist")


def test_a_group_column_becomes_natural_client_ids():
    vectors = np.arange(24, dtype=np.float32).reshape(6, 4)
    writers = ["w7", "w2", "w7", "w9", "w2", "w7"]
    table = datasets.Dataset.from_dict({"image": vectors, "label": [0, 1, 0, 1, 0, 1], "writer": writers})
    train, test = load_hf(datasets.DatasetDict({"train": table, "test": table}), group_key="writer")
    np.testing.assert_array_equal(train.groups, [1, 0, 1, 2, 0, 1])  # sorted: w2, w7, w9
    assert test.groups is None
    with pytest.raises(ValueError, match="'author' is not a column"):
        load_hf(table, group_key="author")


def test_a_hub_id_with_the_hub_unreachable_is_refused_at_once(monkeypatch):
    import time

    from fedsim.data import huggingface as hf

    monkeypatch.setattr(hf, "hub_reachable", lambda timeout_s=3.0: False)
    start = time.monotonic()
    with pytest.raises(OSError, match=r"'ylecun/mnist' could not be loaded \(https://\S+ cannot be reached"):
        load_dataset("hf", hf_id="ylecun/mnist")
    assert time.monotonic() - start < 20
    assert not datasets.config.HF_HUB_OFFLINE  # offline mode only for that load

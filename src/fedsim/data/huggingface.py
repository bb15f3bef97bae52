"""Hugging Face datasets, by hub id through flwr-datasets or as local objects."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
from collections.abc import Iterator
from urllib.parse import urlsplit

import datasets
import huggingface_hub
import numpy as np
from flwr_datasets import FederatedDataset

from fedsim.data.array_dataset import ArrayDataset, split_train_test


def load_hf(
    source: str | datasets.Dataset | datasets.DatasetDict,
    *,
    image_key: str = "image",
    label_key: str = "label",
    train_split: str = "train",
    test_split: str | None = "test",
    group_key: str | None = None,
    seed: int = 0,
    test_fraction: float = 0.2,
) -> tuple[ArrayDataset, ArrayDataset]:
    """Convert a Hugging Face dataset into train and test ``ArrayDataset``.

    Parameters
    ----------
    source : str or datasets.Dataset or datasets.DatasetDict
        A hub id (e.g. ``"ylecun/mnist"``), loaded with flwr-datasets'
        ``FederatedDataset`` (needs the network or the local Hugging Face cache),
        or a dataset already in memory, e.g. from ``datasets.load_from_disk``.
    image_key : str, default "image"
        Column of the inputs: images (PIL or arrays) or fixed-length feature vectors.
    label_key : str, default "label"
        Column of the integer labels.
    train_split : str, default "train"
        Split used for training when ``source`` has splits.
    test_split : str or None, default "test"
        Split used for testing when ``source`` has splits; None to hold out
        ``test_fraction`` of the train split instead. A single ``Dataset`` is always
        split that way.
    group_key : str or None, default None
        Column of the natural client id of every training sample (e.g. FEMNIST's
        ``writer_id``), for natural partitions; its distinct values, sorted, become the
        ``groups`` 0, 1, ... of the train set.
    seed : int, default 0
        Seed of the hub shuffle and of the held-out split.
    test_fraction : float, default 0.2
        Fraction held out when there is no test split.

    Returns
    -------
    tuple[ArrayDataset, ArrayDataset]
        ``(train, test)``. Images become ``(N, C, H, W)``; uint8 pixels are scaled to
        [0, 1].
    """
    name = source if isinstance(source, str) else "hf"
    if isinstance(source, str):
        train, test = _load_hub(source, train_split, test_split, seed)
    elif isinstance(source, datasets.DatasetDict):
        _check_split(source, train_split)
        train = source[train_split]
        test = None
        if test_split is not None:
            _check_split(source, test_split)
            test = source[test_split]
    elif isinstance(source, datasets.Dataset):
        train, test = source, None
    else:
        raise TypeError(
            f"hf: source is a {type(source).__name__}; expected a hub id (str), "
            "datasets.Dataset or datasets.DatasetDict"
        )
    splits = [_to_arrays(part, image_key, label_key) for part in (train, test) if part is not None]
    label_feature = train.features[label_key]
    if isinstance(label_feature, datasets.ClassLabel):
        num_classes = label_feature.num_classes
    else:
        num_classes = 1 + max(int(y.max(initial=-1)) for _, y in splits)
    train_set, *test_set = (
        ArrayDataset(x=x, y=y, num_classes=num_classes, name=name) for x, y in splits
    )
    if group_key is not None:
        train_set = dataclasses.replace(train_set, groups=_group_ids(train, group_key))
    if not test_set:
        return split_train_test(train_set, test_fraction, seed)
    return train_set, test_set[0]


def _load_hub(
    hf_id: str, train_split: str, test_split: str | None, seed: int
) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """Load the splits of a hub dataset through ``FederatedDataset``; where the hub cannot be
    reached, from the local cache only (Hugging Face would retry for a minute)."""
    online = hub_reachable()
    federated = FederatedDataset(dataset=hf_id, partitioners={train_split: 1}, seed=seed)
    try:
        with contextlib.nullcontext() if online else _offline():
            train = federated.load_split(train_split)
            test = None if test_split is None else federated.load_split(test_split)
    except OSError as err:  # ConnectionError offline, FileNotFoundError for a bad id
        where = "" if online else f"{huggingface_hub.constants.ENDPOINT} cannot be reached and it is not cached; "
        raise OSError(
            f"hf: the dataset '{hf_id}' could not be loaded ({where}{' '.join(str(err).split())}); offline, save "
            "it with datasets' save_to_disk and pass its path, or use the 'npz' dataset"
        ) from err
    return train, test


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers at its endpoint's host and port (True where a
    proxy or offline mode decides it instead)."""
    if huggingface_hub.constants.HF_HUB_OFFLINE or any(
            os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy")):
        return True
    endpoint = urlsplit(huggingface_hub.constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname or "huggingface.co", port), timeout=timeout_s):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """Hugging Face datasets and hub in offline mode (the local cache only) for the block."""
    saved = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved


def _group_ids(table: datasets.Dataset, group_key: str) -> np.ndarray:
    """The natural client id of every row: the index of its ``group_key`` value among the
    sorted distinct values."""
    if group_key not in table.column_names:
        raise ValueError(f"hf: '{group_key}' is not a column; known: {', '.join(table.column_names)}")
    _, ids = np.unique(np.asarray(table[group_key]), return_inverse=True)
    return ids.astype(np.int64).reshape(-1)


def _check_split(source: datasets.DatasetDict, split: str) -> None:
    if split not in source:
        raise ValueError(f"hf: '{split}' is not a split; known: {', '.join(source)}")


def _to_arrays(
    table: datasets.Dataset, image_key: str, label_key: str
) -> tuple[np.ndarray, np.ndarray]:
    """Convert one split to float32 inputs and int64 labels."""
    for key in (image_key, label_key):
        if key not in table.column_names:
            raise ValueError(f"hf: '{key}' is not a column; known: {', '.join(table.column_names)}")
    columns = table.select_columns([image_key, label_key]).with_format("numpy")[:]
    inputs, labels = columns[image_key], columns[label_key]
    if inputs.dtype == object:
        raise ValueError(
            f"hf: column '{image_key}' has samples of different shapes; resize them first"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"hf: column '{label_key}' has dtype {labels.dtype}; expected integers")
    is_image = isinstance(table.features[image_key], datasets.Image)
    x = inputs.astype(np.float32)
    if inputs.dtype == np.uint8:
        x /= 255.0
    if is_image and x.ndim == 3:
        x = x[:, None, :, :]
    elif is_image and x.ndim == 4:
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    return x, labels.astype(np.int64)

"""CIFAR-10 from the python version of its batches ("cifar-10-batches-py")."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from fedsim.data.array_dataset import ArrayDataset

_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_TEST_BATCH = "test_batch"


def load_cifar10(path: str | Path) -> tuple[ArrayDataset, ArrayDataset]:
    """Load CIFAR-10 from a directory of pickled batches, with its official test split.

    The batches are pickles, so only load a directory from a source you trust.

    Parameters
    ----------
    path : str or Path
        Directory with ``data_batch_1`` ... ``data_batch_5`` and ``test_batch``.

    Returns
    -------
    tuple[ArrayDataset, ArrayDataset]
        ``(train, test)`` with ``x`` of shape ``(N, 3, 32, 32)`` in [0, 1].
    """
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"cifar10: {directory} is not a directory")
    train = [_read_batch(directory / name) for name in _TRAIN_BATCHES]
    test_x, test_y = _read_batch(directory / _TEST_BATCH)
    return (
        _to_dataset(np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train])),
        _to_dataset(test_x, test_y),
    )


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one batch: uint8 images ``(N, 3072)`` and labels ``(N,)``."""
    if not path.is_file():
        raise FileNotFoundError(f"cifar10: batch file {path} is missing")
    with path.open("rb") as handle:
        try:
            batch = pickle.load(handle, encoding="bytes")
        except (pickle.UnpicklingError, EOFError) as err:
            raise ValueError(f"cifar10: {path} is not a pickled CIFAR batch ({err})") from err
    if not isinstance(batch, dict):
        raise ValueError(f"cifar10: {path} holds a {type(batch).__name__}, not a batch dict")
    # Batches pickled by Python 2 have bytes keys, re-pickled ones str keys.
    batch = {key.decode() if isinstance(key, bytes) else key: value for key, value in batch.items()}
    missing = [key for key in ("data", "labels") if key not in batch]
    if missing:
        raise ValueError(f"cifar10: {path} lacks the keys {missing}; has {sorted(batch)}")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch["labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(
            f"cifar10: {path} data is {data.dtype} of shape {data.shape}; "
            "expected uint8 of shape (N, 3072)"
        )
    if labels.shape != (len(data),):
        raise ValueError(
            f"cifar10: {path} has {len(data)} images but labels of shape {labels.shape}"
        )
    return data, labels


def _to_dataset(data: np.ndarray, labels: np.ndarray) -> ArrayDataset:
    """Reshape rows of channel-major pixels to ``(N, 3, 32, 32)`` floats in [0, 1]."""
    return ArrayDataset(
        x=(data.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0),
        y=labels.astype(np.int64),
        num_classes=10,
        name="cifar10",
    )

"""scikit-learn's 8x8 handwritten digits, shipped with scikit-learn (no download)."""

from __future__ import annotations

import numpy as np
from sklearn.datasets import load_digits as sklearn_load_digits

from fedsim.data.array_dataset import ArrayDataset, split_train_test


def load_digits(*, seed: int = 0, test_fraction: float = 0.2) -> tuple[ArrayDataset, ArrayDataset]:
    """Load the UCI optical digits (1,797 images of 8x8 pixels, 10 classes).

    Parameters
    ----------
    seed : int, default 0
        Seed of the stratified train/test split.
    test_fraction : float, default 0.2
        Fraction of samples held out for testing.

    Returns
    -------
    tuple[ArrayDataset, ArrayDataset]
        ``(train, test)`` with ``x`` of shape ``(N, 1, 8, 8)`` in [0, 1].
    """
    bunch = sklearn_load_digits()
    # Pixel values are integers 0..16.
    x = (bunch.images / 16.0).astype(np.float32)[:, None, :, :]
    full = ArrayDataset(x=x, y=bunch.target.astype(np.int64), num_classes=10, name="digits")
    return split_train_test(full, test_fraction, seed)

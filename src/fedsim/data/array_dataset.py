"""In-memory labelled arrays, the one dataset type the rest of fedsim consumes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)
class ArrayDataset:
    """A labelled dataset held as numpy arrays (compared by identity, not value).

    Parameters
    ----------
    x : np.ndarray
        float32 inputs, shape ``(N, *input_shape)``; images are ``(N, C, H, W)``; or int64
        token indices, e.g. ``(N, 80)`` character windows of Shakespeare.
    y : np.ndarray
        int64 class labels in ``[0, num_classes)``, shape ``(N,)``.
    num_classes : int
        Number of classes of the task (labels absent from this split still count).
    name : str
        Name of the source dataset, e.g. ``"digits"``.
    groups : np.ndarray or None, default None
        int64 natural client id of every sample, shape ``(N,)`` (e.g. the device of
        the Synthetic generator), or None when the data has no natural clients.
    """

    x: np.ndarray
    y: np.ndarray
    num_classes: int
    name: str
    groups: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.x.dtype not in (np.float32, np.int64):
            raise ValueError(f"{self.name}: x must be float32 (features) or int64 (token indices); got {self.x.dtype}")
        if self.y.dtype != np.int64 or self.y.ndim != 1:
            raise ValueError(
                f"{self.name}: y must be a 1-D int64 array; got {self.y.ndim}-D {self.y.dtype}"
            )
        if len(self.x) != len(self.y):
            raise ValueError(f"{self.name}: x has {len(self.x)} samples but y has {len(self.y)}")
        if len(self.y) and (self.y.min() < 0 or self.y.max() >= self.num_classes):
            raise ValueError(
                f"{self.name}: labels must lie in [0, {self.num_classes}); "
                f"got range [{self.y.min()}, {self.y.max()}]"
            )
        if self.groups is not None and (
            self.groups.dtype != np.int64 or self.groups.shape != self.y.shape
        ):
            raise ValueError(
                f"{self.name}: groups must be int64 of shape {self.y.shape}; "
                f"got {self.groups.dtype} of shape {self.groups.shape}"
            )

    def __len__(self) -> int:
        return len(self.y)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample, e.g. ``(1, 8, 8)``."""
        return tuple(self.x.shape[1:])

    def subset(self, idx: np.ndarray) -> ArrayDataset:
        """Return the samples at ``idx`` (integer indices or a boolean mask)."""
        return ArrayDataset(
            x=self.x[idx],
            y=self.y[idx],
            num_classes=self.num_classes,
            name=self.name,
            groups=None if self.groups is None else self.groups[idx],
        )


def split_train_test(
    dataset: ArrayDataset, test_fraction: float, seed: int
) -> tuple[ArrayDataset, ArrayDataset]:
    """Split a dataset into a seeded train and held-out test part.

    The split is stratified by label whenever every present class can appear on both
    sides; otherwise (tiny datasets) it is a plain seeded random split.

    Parameters
    ----------
    dataset : ArrayDataset
        The data to split.
    test_fraction : float
        Fraction of samples in the test part, in (0, 1).
    seed : int
        Seed of the split.

    Returns
    -------
    tuple[ArrayDataset, ArrayDataset]
        ``(train, test)``.
    """
    from sklearn.model_selection import (
        train_test_split,  # scikit-learn takes seconds to import
    )

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction: {test_fraction} is not in (0, 1)")
    if len(dataset) < 2:
        raise ValueError(f"{dataset.name}: {len(dataset)} sample(s) cannot be split in two")
    indices = np.arange(len(dataset))
    num_test = int(np.ceil(test_fraction * len(dataset)))
    class_counts = np.bincount(dataset.y)
    present = int(np.count_nonzero(class_counts))
    stratifiable = (
        class_counts[class_counts > 0].min() >= 2
        and num_test >= present
        and len(dataset) - num_test >= present
    )
    train_idx, test_idx = train_test_split(
        indices,
        test_size=test_fraction,
        random_state=seed,
        stratify=dataset.y if stratifiable else None,
    )
    return dataset.subset(np.sort(train_idx)), dataset.subset(np.sort(test_idx))

"""Datasets as numpy arrays, and their partitions among clients.

Knows nothing of federation or configuration: loaders return ``ArrayDataset``
pairs, partitioners return index arrays.
"""

from fedsim.data.array_dataset import ArrayDataset, split_train_test
from fedsim.data.cifar10 import load_cifar10
from fedsim.data.digits import load_digits
from fedsim.data.huggingface import load_hf
from fedsim.data.mnist import load_mnist, read_idx
from fedsim.data.npz import load_npz
from fedsim.data.partition import (
    PARTITIONS,
    label_histograms,
    partition_indices,
    plot_label_histograms,
    split_client,
)
from fedsim.data.registry import DATASETS, load_dataset
from fedsim.data.synthetic import generate_synthetic

__all__ = [
    "DATASETS",
    "PARTITIONS",
    "ArrayDataset",
    "generate_synthetic",
    "label_histograms",
    "load_cifar10",
    "load_dataset",
    "load_digits",
    "load_hf",
    "load_mnist",
    "load_npz",
    "partition_indices",
    "plot_label_histograms",
    "read_idx",
    "split_client",
    "split_train_test",
]

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
from fedsim.data.heterogeneity import heterogeneity, label_tv_distances, partition_report, plot_partition
from fedsim.data.partition import (
    PARTITIONS,
    PartitionError,
    feature_noise,
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
    "PartitionError",
    "feature_noise",
    "generate_synthetic",
    "heterogeneity",
    "label_histograms",
    "label_tv_distances",
    "load_cifar10",
    "load_dataset",
    "load_digits",
    "load_hf",
    "load_mnist",
    "load_npz",
    "partition_indices",
    "partition_report",
    "plot_label_histograms",
    "plot_partition",
    "read_idx",
    "split_client",
    "split_train_test",
]

"""Datasets as numpy arrays, and their partitions among clients.

Knows nothing of federation or configuration: loaders return ``ArrayDataset``
pairs, partitioners return index arrays.

The names below are importable from ``fedsim.data`` directly; each loads its module on
first use, so that a client importing ``ArrayDataset`` does not pay for scikit-learn,
Hugging Face ``datasets`` or matplotlib (seconds per process, and a deployed ClientApp
is a new process per message).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ArrayDataset": "fedsim.data.array_dataset",
    "split_train_test": "fedsim.data.array_dataset",
    "load_cifar10": "fedsim.data.cifar10",
    "load_digits": "fedsim.data.digits",
    "load_hf": "fedsim.data.huggingface",
    "load_mnist": "fedsim.data.mnist",
    "read_idx": "fedsim.data.mnist",
    "load_npz": "fedsim.data.npz",
    "heterogeneity": "fedsim.data.skew",
    "label_tv_distances": "fedsim.data.skew",
    "partition_report": "fedsim.data.skew",
    "plot_partition": "fedsim.data.skew",
    "PARTITIONS": "fedsim.data.partition",
    "PartitionError": "fedsim.data.partition",
    "feature_noise": "fedsim.data.partition",
    "label_histograms": "fedsim.data.partition",
    "partition_indices": "fedsim.data.partition",
    "plot_label_histograms": "fedsim.data.partition",
    "split_client": "fedsim.data.partition",
    "DATASETS": "fedsim.data.registry",
    "load_dataset": "fedsim.data.registry",
    "generate_synthetic": "fedsim.data.synthetic",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'fedsim.data' has no attribute {name!r}")

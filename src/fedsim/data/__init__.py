"""Datasets as numpy arrays, and their partitions among clients.

Knows nothing of federation or configuration: loaders return ``ArrayDataset``
pairs, partitioners return index arrays.

The names below are importable from ``fedsim.data`` directly; each loads its module on
first use (``lazy_loader``, PEP 562), so that a client importing ``ArrayDataset`` does not
pay for scikit-learn, Hugging Face ``datasets`` or matplotlib (seconds per process, and a
deployed ClientApp is a new process per message).
"""

from __future__ import annotations

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(__name__, submod_attrs={
    "array_dataset": ["ArrayDataset", "split_train_test"],
    "cifar10": ["load_cifar10"],
    "digits": ["load_digits"],
    "huggingface": ["load_hf"],
    "mnist": ["load_mnist", "read_idx"],
    "npz": ["load_npz"],
    "skew": ["heterogeneity", "label_tv_distances", "partition_report", "plot_partition"],
    "partition": ["PARTITIONS", "FeatureNoise", "PartitionError", "label_histograms", "noise_scales",
                  "partition_indices", "plot_label_histograms", "split_client"],
    "registry": ["DATASETS", "load_dataset"],
    "shakespeare": ["load_shakespeare"],
    "synthetic": ["generate_synthetic"],
})

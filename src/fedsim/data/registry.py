"""``load_dataset``: every dataset fedsim knows, by name."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from fedsim.data.array_dataset import ArrayDataset

DATASETS = ("digits", "synthetic", "mnist", "cifar10", "npz", "hf", "shakespeare")

_OPTIONS = {
    "digits": (),
    "synthetic": ("alpha", "beta", "num_devices", "dim", "num_classes"),
    "mnist": (),
    "cifar10": (),
    "npz": (),
    "hf": ("image_key", "label_key", "train_split", "test_split", "group_key"),
    "shakespeare": ("min_samples", "stride", "tokenizer", "seq_len"),
}
_NEEDS_PATH = ("mnist", "cifar10", "npz", "shakespeare")
# Each loader's module, imported when its dataset is loaded: scikit-learn (digits) and
# Hugging Face datasets (hf) take seconds to import, and a process needs one loader at most.
_LOADERS = {
    "digits": ("fedsim.data.digits", "load_digits"),
    "synthetic": ("fedsim.data.synthetic", "generate_synthetic"),
    "mnist": ("fedsim.data.mnist", "load_mnist"),
    "cifar10": ("fedsim.data.cifar10", "load_cifar10"),
    "npz": ("fedsim.data.npz", "load_npz"),
    "hf": ("fedsim.data.huggingface", "load_hf"),
    "shakespeare": ("fedsim.data.shakespeare", "load_shakespeare"),
}


def _loader(name: str):
    module, function = _LOADERS[name]
    return getattr(importlib.import_module(module), function)


def load_dataset(
    name: str,
    *,
    path: str | Path | None = None,
    hf_id: str | None = None,
    seed: int = 0,
    test_fraction: float = 0.2,
    **options: Any,
) -> tuple[ArrayDataset, ArrayDataset]:
    """Load a dataset by name as ``(train, held-out test)``.

    Parameters
    ----------
    name : str
        One of ``DATASETS``: ``"digits"`` (built in), ``"synthetic"`` (generated),
        ``"mnist"`` (directory of idx files), ``"cifar10"`` (directory of python
        batches), ``"npz"`` (archive with ``x``, ``y``), ``"hf"`` (Hugging Face
        hub id, or a directory written by ``save_to_disk``) or ``"shakespeare"``
        (LEAF's JSON, or play text with speaker lines; one group per speaking role).
    path : str or Path or None, default None
        The file or directory of ``mnist``, ``cifar10``, ``npz``, ``shakespeare`` and ``hf``.
    hf_id : str or None, default None
        Hub id of ``hf``, instead of ``path``.
    seed : int, default 0
        Seed of generation and of train/test splits.
    test_fraction : float, default 0.2
        Held-out fraction for datasets without an official test split
        (``mnist`` and ``cifar10`` use theirs).
    **options
        Dataset-specific: ``synthetic`` takes alpha, beta, num_devices, dim,
        num_classes (see ``generate_synthetic``); ``hf`` takes image_key,
        label_key, train_split, test_split, group_key (see ``load_hf``);
        ``shakespeare`` takes min_samples, stride (see ``load_shakespeare``), or min_samples,
        tokenizer, seq_len for token blocks (see ``fedsim.data.tokens.load_shakespeare_tokens``).

    Returns
    -------
    tuple[ArrayDataset, ArrayDataset]
        ``(train, test)``.
    """
    if name not in DATASETS:
        raise ValueError(f"'{name}' is not a dataset; known: {', '.join(DATASETS)}")
    for option in options:
        if option not in _OPTIONS[name]:
            known = ", ".join(_OPTIONS[name]) or "none"
            raise ValueError(f"'{option}' is not an option of dataset {name}; known: {known}")
    if hf_id is not None and name != "hf":
        raise ValueError(f"hf_id is only for dataset hf; got it for {name}")
    if path is not None and name not in (*_NEEDS_PATH, "hf"):
        raise ValueError(f"dataset {name} takes no path; got {path}")
    if name in _NEEDS_PATH and path is None:
        raise ValueError(f"dataset {name} needs a path")
    if name in ("digits", "synthetic"):
        return _loader(name)(seed=seed, test_fraction=test_fraction, **options)
    if name in ("mnist", "cifar10"):
        return _loader(name)(path)
    if name == "npz":
        return _loader(name)(path, seed=seed, test_fraction=test_fraction)
    if name == "shakespeare" and "tokenizer" in options:
        from fedsim.data.tokens import load_shakespeare_tokens

        return load_shakespeare_tokens(path, test_fraction=test_fraction, **options)
    if name == "shakespeare":
        return _loader(name)(path, test_fraction=test_fraction, **options)
    if (hf_id is None) == (path is None):
        raise ValueError("dataset hf needs exactly one of hf_id (hub id) or path (save_to_disk)")
    if hf_id is None:
        import datasets

        source = datasets.load_from_disk(str(path))
    else:
        source = hf_id
    return _loader(name)(source, seed=seed, test_fraction=test_fraction, **options)

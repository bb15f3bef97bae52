"""Shared fixtures for the loss tests: sklearn digits, split once, as float32 tensors."""

from dataclasses import dataclass

import pytest
import torch
from sklearn.datasets import load_digits


@dataclass(frozen=True)
class Digits:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


@pytest.fixture(scope="session")
def digits() -> Digits:
    features, labels = load_digits(return_X_y=True)
    x = torch.tensor(features / 16.0, dtype=torch.float32)
    y = torch.tensor(labels, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = order[:1297], order[1297:]
    return Digits(x[train], y[train], x[test], y[test])


@pytest.fixture(autouse=True)
def _one_thread():
    """The tests run beside other workers on two cores; one thread each keeps them fast."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

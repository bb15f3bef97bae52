"""Shared fixtures of the fedsim.quant tests: sklearn digits and a short training loop."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Run on one intra-op thread.

    These tests use small tensors; on a shared CPU a second thread waiting on a busy core
    makes them tens of times slower.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def digits() -> dict[str, torch.Tensor]:
    """8x8 digits as 64 features in [0, 1], fixed 1400 / 397 train/test split."""
    bunch = load_digits()
    x = torch.tensor(bunch.data / 16.0, dtype=torch.float32)
    y = torch.tensor(bunch.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1400], perm[1400:]
    return {"x_train": x[train], "y_train": y[train], "x_test": x[test], "y_test": y[test]}


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


@pytest.fixture(scope="session")
def make_mlp() -> Callable[[], nn.Module]:
    """Factory of the 64-64-10 MLP, same initial weights every call."""
    return _mlp


@pytest.fixture(scope="session")
def train_digits(digits) -> Callable[..., float]:
    """``train_digits(model, on_step=None) -> test accuracy`` after 15 epochs of Adam."""

    def train(model: nn.Module, on_step: Callable[[], None] | None = None) -> float:
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
        order = torch.Generator().manual_seed(1)
        x, y = digits["x_train"], digits["y_train"]
        for _ in range(15):
            perm = torch.randperm(len(x), generator=order)
            for start in range(0, len(x), 50):
                idx = perm[start : start + 50]
                loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                if on_step is not None:
                    on_step()
        with torch.no_grad():
            return (model(digits["x_test"]).argmax(1) == digits["y_test"]).float().mean().item()

    return train


@pytest.fixture(scope="module")
def float_accuracy(one_thread, train_digits, make_mlp) -> float:
    """Test accuracy of the float MLP trained by ``train_digits``."""
    return train_digits(make_mlp())

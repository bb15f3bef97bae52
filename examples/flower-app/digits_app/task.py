"""The model, the data and the training loop: plain PyTorch, nothing federated."""

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Net(nn.Module):
    """A multilayer perceptron for 8x8 digit images."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def _digits(split: str) -> TensorDataset:
    """scikit-learn's digits (shipped with it, no download), 80% train / 20% test."""
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        (x / 16.0).astype(np.float32), y, test_size=0.2, random_state=0, stratify=y
    )
    x, y = (x_train, y_train) if split == "train" else (x_test, y_test)
    return TensorDataset(torch.from_numpy(x), torch.from_numpy(y))


def load_data(partition_id: int, num_partitions: int, split: str = "train") -> DataLoader:
    """Every ``num_partitions``-th sample of ``split``, starting at ``partition_id``."""
    part = TensorDataset(*_digits(split)[partition_id::num_partitions])
    return DataLoader(part, batch_size=32, shuffle=split == "train")


def load_test_data() -> DataLoader:
    """The whole test split, for the server's evaluation."""
    return DataLoader(_digits("test"), batch_size=512)


def train(net: nn.Module, loader: DataLoader, epochs: int, lr: float) -> float:
    """SGD on ``loader`` for ``epochs`` epochs; returns the mean training loss."""
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    net.train()
    total, batches = 0.0, 0
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(net(x), y)
            loss.backward()
            optimizer.step()
            total, batches = total + loss.item(), batches + 1
    return total / batches


def test(net: nn.Module, loader: DataLoader) -> tuple[float, float]:
    """Mean loss and accuracy on ``loader``."""
    net.eval()
    loss, correct, count = 0.0, 0, 0
    with torch.no_grad():
        for x, y in loader:
            logits = net(x)
            loss += nn.functional.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(1) == y).sum().item()
            count += len(y)
    return loss / count, correct / count

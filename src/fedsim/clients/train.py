"""The local training loop and evaluation, free of Flower.

``train_local`` is a plain function of (model, data, settings, objective, generator):
the Flower ClientApp calls it once per client, and a batched backend can replace the
loop over clients without touching it. Batches are cut from tensors held in memory (a
seeded permutation per epoch) rather than through a DataLoader: the client datasets are
small and the DataLoader's per-iteration overhead would dominate.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fedsim.clients.objective import ClientObjective
from fedsim.config import ClientConfig
from fedsim.data import ArrayDataset


@dataclass(frozen=True)
class TrainResult:
    """What one local training call reports."""

    num_examples: int
    steps: int
    loss: float
    accuracy: float


@dataclass(frozen=True)
class EvalResult:
    """Loss and accuracy of a model on a dataset."""

    num_examples: int
    loss: float
    accuracy: float


def build_optimizer(model: nn.Module, cfg: ClientConfig) -> torch.optim.Optimizer:
    """The client optimizer named in the config."""
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def train_local(
    model: nn.Module,
    data: ArrayDataset,
    cfg: ClientConfig,
    objective: ClientObjective,
    generator: torch.Generator,
    device: torch.device,
    grad_transform: Callable[[nn.Module], None] | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``data`` for the configured epochs or steps.

    Hooks in ``objective.hooks`` add loss terms and transform gradients; ``grad_transform``
    is a last gradient transform (FedLEx's guidance mask) applied before each step.
    """
    n = len(data.y)
    if n == 0:
        raise ValueError("client has no training examples")
    x_all = torch.from_numpy(data.x).to(device)
    y_all = torch.from_numpy(data.y).to(device)
    optimizer = build_optimizer(model, cfg)
    batches_per_epoch = (n + cfg.batch_size - 1) // cfg.batch_size
    total_steps = cfg.local_steps or cfg.local_epochs * batches_per_epoch
    model.train()
    loss_sum, correct, seen, step = 0.0, 0, 0, 0
    while step < total_steps:
        order = torch.randperm(n, generator=generator).to(device)
        for start in range(0, n, cfg.batch_size):
            if step >= total_steps:
                break
            idx = order[start : start + cfg.batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss, logits = objective(model, x_all[idx], y_all[idx], idx, generator)
            loss.backward()
            for hook in objective.hooks:
                hook.before_step(model)
            if grad_transform is not None:
                grad_transform(model)
            optimizer.step()
            loss_sum += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == y_all[idx]).sum())
            seen += len(idx)
            step += 1
    return TrainResult(num_examples=n, steps=step, loss=loss_sum / seen, accuracy=correct / seen)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: ArrayDataset,
    device: torch.device,
    batch_size: int = 512,
    predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> EvalResult:
    """Cross-entropy loss and accuracy of ``model`` on ``data``.

    ``predict(embeddings, classifier) -> labels`` overrides argmax-of-logits for losses
    that change the decision rule (HarmonicLoss predicts the nearest class centre).
    """
    model.eval()
    n = len(data.y)
    if n == 0:
        return EvalResult(0, float("nan"), float("nan"))
    loss_sum, correct = 0.0, 0
    for start in range(0, n, batch_size):
        x = torch.from_numpy(data.x[start : start + batch_size]).to(device)
        y = torch.from_numpy(data.y[start : start + batch_size]).to(device)
        embeddings = model.features(x)
        logits = model.head(embeddings)
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        labels = predict(embeddings, model.head.weight) if predict else logits.argmax(1)
        correct += int((labels == y).sum())
    return EvalResult(num_examples=n, loss=loss_sum / n, accuracy=correct / n)


"""The local training loop and evaluation, free of Flower.

``train_local`` is a plain function of (model, data, settings, objective, generator): the
ClientApp calls it for one client; :mod:`fedsim.clients.batched` trains many clients at once
on the same :func:`batch_schedule`, so both give the same numbers. Batches are cut from
tensors held in memory (a seeded permutation per epoch) rather than through a DataLoader:
the client datasets are small and the DataLoader's per-iteration overhead would dominate.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
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
    rows: int = 0
    """Predictions trained on: samples, or a causal language model's tokens (0: not counted)."""


@dataclass(frozen=True)
class EvalResult:
    """Loss and accuracy of a model on a dataset."""

    num_examples: int
    loss: float
    accuracy: float


def build_optimizer(parameters: Iterable[torch.Tensor], cfg: ClientConfig) -> torch.optim.Optimizer:
    """The client optimizer named in the config, over ``parameters``."""
    if cfg.optimizer == "adam":
        return torch.optim.Adam(parameters, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(parameters, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def local_steps(num_examples: int, cfg: ClientConfig) -> int:
    """Optimizer steps of one local training run: ``local_steps``, else ``local_epochs``
    passes over the data in batches of ``batch_size`` (the last batch of an epoch may be short)."""
    return cfg.local_steps or cfg.local_epochs * -(-num_examples // cfg.batch_size)


def batch_schedule(num_examples: int, cfg: ClientConfig, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """The index batches of one local training run, in order: each epoch a seeded
    permutation of the client's examples cut into batches of ``batch_size``, until
    :func:`local_steps` batches were given. Lazy, so draws from ``generator`` interleave with
    the training's own (a contrastive loss's augmentations) exactly as the loop runs."""
    total, step = local_steps(num_examples, cfg), 0
    while step < total:
        order = torch.randperm(num_examples, generator=generator)
        for start in range(0, num_examples, cfg.batch_size):
            if step >= total:
                return
            yield order[start : start + cfg.batch_size]
            step += 1


def train_local(
    model: nn.Module,
    data: ArrayDataset,
    cfg: ClientConfig,
    objective: ClientObjective,
    generator: torch.Generator,
    device: torch.device,
) -> TrainResult:
    """Train ``model`` in place on ``data`` for the configured epochs or steps.

    Hooks in ``objective.hooks`` replace the batch's inputs (``perturb_inputs``), add loss
    terms and transform gradients (``before_step`` runs between ``backward`` and the
    optimizer step) or weights (``after_step``, after it).
    """
    n = len(data.y)
    if n == 0:
        raise ValueError("client has no training examples")
    x_all = torch.from_numpy(data.x).to(device)
    y_all = torch.from_numpy(data.y).to(device)
    optimizer = build_optimizer(model.parameters(), cfg)
    model.train()
    loss_sum, correct, seen, steps = 0.0, 0, 0, 0
    for batch in batch_schedule(n, cfg, generator):
        idx = batch.to(device)
        optimizer.zero_grad(set_to_none=True)
        x, y = x_all[idx], y_all[idx]
        for hook in objective.hooks:
            x = hook.perturb_inputs(model, x, y)
        loss, predictions = objective(model, x, y, idx, generator)
        loss.backward()
        for hook in objective.hooks:
            hook.before_step(model)
        optimizer.step()
        for hook in objective.hooks:
            hook.after_step(model)
        targets = model.targets(x_all[idx], y_all[idx])
        loss_sum += float(loss.detach()) * len(targets)
        correct += int((predictions == targets).sum())
        seen += len(targets)
        steps += 1
    return TrainResult(num_examples=n, steps=steps, loss=loss_sum / seen, accuracy=correct / seen, rows=seen)


@torch.no_grad()
def evaluate_many(
    model: nn.Module,
    datasets: Sequence[ArrayDataset],
    device: torch.device,
    batch_size: int = 512,
    predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> list[EvalResult]:
    """Cross-entropy loss and accuracy of ``model`` on each of ``datasets``, means over the
    rows ``model.features`` gives (a sample each, or a causal language model's every position:
    its loss is then the mean token negative log-likelihood).

    The datasets are evaluated as one concatenation, in batches of ``batch_size``, and the
    per-row losses and hits summed per dataset: many small client test sets cost one
    pass, not one per client. ``predict(embeddings, classifier) -> labels`` overrides
    argmax-of-logits for losses that change the decision rule (HarmonicLoss predicts the
    nearest class centre). An empty dataset gets NaN loss and accuracy.
    """
    model.eval()
    sizes = [len(d.y) for d in datasets]
    x = datasets[0].x if len(datasets) == 1 else np.concatenate([d.x for d in datasets])
    y = datasets[0].y if len(datasets) == 1 else np.concatenate([d.y for d in datasets])
    owner = torch.repeat_interleave(torch.arange(len(datasets)), torch.tensor(sizes)).to(device)
    loss_sums = torch.zeros(len(datasets), dtype=torch.float64, device=device)
    hits = torch.zeros(len(datasets), dtype=torch.float64, device=device)
    rows_per_sample = 1
    for start in range(0, len(y), batch_size):
        xb = torch.from_numpy(x[start : start + batch_size]).to(device)
        embeddings = model.features(xb)
        yb = model.targets(xb, torch.from_numpy(y[start : start + batch_size]).to(device))
        logits = model.head(embeddings)
        labels = predict(embeddings, model.head.weight) if predict else logits.argmax(1)
        rows_per_sample = len(yb) // len(xb)
        rows = owner[start : start + batch_size].repeat_interleave(rows_per_sample)
        loss_sums.index_add_(0, rows, F.cross_entropy(logits, yb, reduction="none").double())
        hits.index_add_(0, rows, (labels == yb).double())
    return [EvalResult(n, float(loss) / (n * rows_per_sample), float(hit) / (n * rows_per_sample)) if n
            else EvalResult(0, float("nan"), float("nan"))
            for n, loss, hit in zip(sizes, loss_sums.tolist(), hits.tolist(), strict=True)]


def evaluate(
    model: nn.Module,
    data: ArrayDataset,
    device: torch.device,
    batch_size: int = 512,
    predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> EvalResult:
    """Cross-entropy loss and accuracy of ``model`` on ``data`` (see :func:`evaluate_many`)."""
    return evaluate_many(model, [data], device, batch_size, predict)[0]

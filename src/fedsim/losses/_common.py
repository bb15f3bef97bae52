"""Argument checks and small tensor helpers shared by the loss modules."""

from __future__ import annotations

import torch
from torch import Tensor

REDUCTIONS = ("mean", "sum", "none")


def check_reduction(reduction: str) -> str:
    """Return ``reduction`` if it is one of ``mean``, ``sum``, ``none``; raise otherwise."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: {reduction!r} is not a reduction; known: {', '.join(REDUCTIONS)}")
    return reduction


def check_positive(name: str, value: float) -> float:
    """Return ``value`` as a float if it is strictly positive; raise ``ValueError`` otherwise."""
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return float(value)


def check_non_negative(name: str, value: float) -> float:
    """Return ``value`` as a float if it is >= 0; raise ``ValueError`` otherwise."""
    if not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return float(value)


def check_num_samples(num_samples: int) -> int:
    """Return ``num_samples`` if it is a positive int; raise ``ValueError`` otherwise."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int (the size of the client's dataset), got {num_samples!r}")
    return num_samples


def check_targets(targets: Tensor, batch_size: int, where: str) -> None:
    """Check that ``targets`` is an integer vector of length ``batch_size``."""
    if targets.dim() != 1 or targets.shape[0] != batch_size:
        raise ValueError(f"{where}: targets must have shape ({batch_size},), got {tuple(targets.shape)}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise ValueError(f"{where}: targets must be an integer tensor of class labels, got {targets.dtype}")


def check_logits(logits: Tensor, targets: Tensor, where: str) -> None:
    """Check ``logits`` (B, C) floating point and ``targets`` (B,) integer."""
    if logits.dim() != 2:
        raise ValueError(f"{where}: logits must have shape (B, C), got {tuple(logits.shape)}")
    if not logits.dtype.is_floating_point:
        raise ValueError(f"{where}: logits must be floating point, got {logits.dtype}")
    check_targets(targets, logits.shape[0], where)


def check_embeddings(embeddings: Tensor, where: str, name: str = "embeddings") -> None:
    """Check that ``embeddings`` is a floating point (B, d) matrix."""
    if embeddings.dim() != 2:
        raise ValueError(f"{where}: {name} must have shape (B, d), got {tuple(embeddings.shape)}")
    if not embeddings.dtype.is_floating_point:
        raise ValueError(f"{where}: {name} must be floating point, got {embeddings.dtype}")


def check_indices(indices: Tensor, batch_size: int, num_samples: int, where: str) -> None:
    """Check per-sample ``indices`` (B,) int64 for a loss that keeps state for ``num_samples`` samples."""
    if indices.dim() != 1 or indices.shape[0] != batch_size:
        raise ValueError(f"{where}: indices must have shape ({batch_size},), got {tuple(indices.shape)}")
    if indices.dtype != torch.int64:
        raise ValueError(f"{where}: indices must be int64 sample indices, got {indices.dtype}")
    if not indices.is_meta and indices.numel() > 0:
        low, high = int(indices.min()), int(indices.max())
        if low < 0 or high >= num_samples:
            raise ValueError(
                f"{where}: indices must lie in [0, num_samples={num_samples}), got values in [{low}, {high}]"
            )


def one_hot_like(logits: Tensor, targets: Tensor) -> Tensor:
    """One-hot matrix of ``targets`` with the shape, dtype and device of ``logits``.

    A comparison rather than ``scatter_``: the same values, and ``torch.func.vmap`` (the
    batched trainer) has a batching rule for it."""
    classes = torch.arange(logits.shape[1], device=logits.device)
    return (targets.unsqueeze(1) == classes).to(logits.dtype)


def reduce(loss: Tensor, reduction: str) -> Tensor:
    """Apply ``mean``, ``sum`` or ``none`` to a per-sample loss vector."""
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def binary_scores(logits: Tensor, where: str) -> Tensor:
    """Real-valued scores (B,) for a binary problem from a model's logits.

    Accepts logits of shape (B,) or (B, 1) (the score is the logit) or (B, 2) (the score is
    ``logits[:, 1] - logits[:, 0]``, the log-odds of class 1 under a softmax), so a model with a
    one- or a two-output head can be trained with a binary loss.
    """
    if not logits.dtype.is_floating_point:
        raise ValueError(f"{where}: logits must be floating point, got {logits.dtype}")
    if logits.dim() == 1:
        return logits
    if logits.dim() == 2 and logits.shape[1] == 1:
        return logits[:, 0]
    if logits.dim() == 2 and logits.shape[1] == 2:
        return logits[:, 1] - logits[:, 0]
    raise ValueError(f"{where}: binary logits must have shape (B,), (B, 1) or (B, 2), got {tuple(logits.shape)}")


def check_binary_targets(targets: Tensor, batch_size: int, where: str) -> None:
    """Check that ``targets`` are (B,) integer labels in {0, 1}."""
    check_targets(targets, batch_size, where)
    if not targets.is_meta and targets.numel() > 0 and bool(((targets != 0) & (targets != 1)).any()):
        raise ValueError(f"{where}: binary targets must be 0 or 1")

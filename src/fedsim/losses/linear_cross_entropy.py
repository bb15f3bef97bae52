"""Cross-entropy of a linear classifier without materialising the logit matrix (Cut Cross-Entropy)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ._common import check_reduction

DEFAULT_CHUNK_SIZE = 4096


def _logit_block(embeddings: Tensor, classifier_rows: Tensor, softcap: float | None, accumulate: torch.dtype) -> Tensor:
    """Logits of one chunk of classes, (N, chunk), in the accumulation dtype, soft-capped in place."""
    block = (embeddings @ classifier_rows.T).to(accumulate)
    if softcap is not None:
        block.div_(softcap).tanh_().mul_(softcap)
    return block


def _chunk_targets(targets: Tensor, valid: Tensor, start: int, width: int) -> tuple[Tensor, Tensor]:
    """Column of each row's target inside the chunk [start, start + width) and whether it is there."""
    column = targets - start
    inside = valid & (column >= 0) & (column < width)
    return column.clamp(0, width - 1).unsqueeze(1), inside


def _row_weights(grad_output: Tensor, valid: Tensor, reduction: str, dtype: torch.dtype) -> Tensor:
    """d(reduced loss)/d(per-row loss) times the incoming gradient, 0 for ignored rows; shape (N,)."""
    grad_output = grad_output.to(dtype)
    if reduction == "mean":
        grad_output = grad_output / valid.sum().to(dtype)
    return torch.where(valid, grad_output, torch.zeros((), dtype=dtype, device=valid.device))


def _forward_chunk(
    embeddings: Tensor,
    rows: Tensor,
    start: int,
    targets: Tensor,
    valid: Tensor,
    softcap: float | None,
    state: tuple[Tensor, Tensor, Tensor],
) -> tuple[Tensor, Tensor, Tensor]:
    """Fold one chunk of classes into the online log-sum-exp ``(running max, running sum, target logit)``.

    The chunk's logits live only inside this call, so one chunk is alive at a time.
    """
    running_max, running_sum, target_logit = state
    block = _logit_block(embeddings, rows, softcap, running_max.dtype)
    column, inside = _chunk_targets(targets, valid, start, block.shape[1])
    target_logit = torch.where(inside, block.gather(1, column).squeeze(1), target_logit)
    new_max = torch.maximum(running_max, block.amax(dim=1))
    block_sum = block.sub_(new_max.unsqueeze(1)).exp_().sum(dim=1)
    return new_max, running_sum * torch.exp(running_max - new_max) + block_sum, target_logit


def _backward_chunk(
    embeddings: Tensor,
    rows: Tensor,
    start: int,
    targets: Tensor,
    valid: Tensor,
    softcap: float | None,
    log_normalizer: Tensor,
    weights: Tensor,
    grad_embeddings: Tensor | None,
    grad_rows: Tensor | None,
) -> None:
    """Recompute one chunk of logits, turn it in place into its gradient, and accumulate.

    Adds ``G @ rows`` to ``grad_embeddings`` and writes ``G^T @ embeddings`` into ``grad_rows``
    (when they are not None), with ``G = (softmax - onehot) * weights`` (times ``1 - tanh^2``
    with softcap).
    """
    accumulate = log_normalizer.dtype
    block = (embeddings @ rows.T).to(accumulate)
    if softcap is not None:
        tanh = block.div_(softcap).tanh_()
        block = tanh * softcap
    column, inside = _chunk_targets(targets, valid, start, block.shape[1])
    grad_block = block.sub_(log_normalizer.unsqueeze(1)).exp_()
    grad_block.scatter_add_(1, column, -inside.to(accumulate).unsqueeze(1))
    grad_block.mul_(weights.unsqueeze(1))
    if softcap is not None:
        grad_block.mul_(tanh.square_().neg_().add_(1.0))
    if grad_embeddings is not None:
        grad_embeddings.addmm_(grad_block, rows.to(accumulate))
    if grad_rows is not None:
        torch.mm(grad_block.T, embeddings.to(accumulate), out=grad_rows)


class _LinearCrossEntropy(torch.autograd.Function):
    """Chunked forward with an online log-sum-exp; backward recomputes each chunk of logits."""

    @staticmethod
    def forward(
        ctx,
        embeddings: Tensor,
        classifier: Tensor,
        targets: Tensor,
        ignore_index: int,
        softcap: float | None,
        reduction: str,
        chunk_size: int,
    ) -> Tensor:
        accumulate = torch.promote_types(embeddings.dtype, torch.float32)
        num_rows = embeddings.shape[0]
        valid = targets != ignore_index
        state = (
            torch.full((num_rows,), float("-inf"), dtype=accumulate, device=embeddings.device),
            torch.zeros(num_rows, dtype=accumulate, device=embeddings.device),
            torch.zeros(num_rows, dtype=accumulate, device=embeddings.device),
        )
        for start in range(0, classifier.shape[0], chunk_size):
            rows = classifier[start : start + chunk_size]
            state = _forward_chunk(embeddings, rows, start, targets, valid, softcap, state)
        running_max, running_sum, target_logit = state
        log_normalizer = running_max + running_sum.log()
        loss = torch.where(valid, log_normalizer - target_logit, torch.zeros_like(target_logit))
        ctx.save_for_backward(embeddings, classifier, targets, log_normalizer)
        ctx.ignore_index, ctx.softcap, ctx.reduction, ctx.chunk_size = ignore_index, softcap, reduction, chunk_size
        if reduction == "mean":
            loss = loss.sum() / valid.sum().to(accumulate)
        elif reduction == "sum":
            loss = loss.sum()
        return loss.to(embeddings.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor):
        embeddings, classifier, targets, log_normalizer = ctx.saved_tensors
        accumulate = log_normalizer.dtype
        valid = targets != ctx.ignore_index
        weights = _row_weights(grad_output, valid, ctx.reduction, accumulate)
        grad_embeddings = (
            torch.zeros(embeddings.shape, dtype=accumulate, device=embeddings.device)
            if ctx.needs_input_grad[0]
            else None
        )
        grad_classifier = (
            torch.empty(classifier.shape, dtype=accumulate, device=classifier.device)
            if ctx.needs_input_grad[1]
            else None
        )
        for start in range(0, classifier.shape[0], ctx.chunk_size):
            stop = start + ctx.chunk_size
            _backward_chunk(
                embeddings,
                classifier[start:stop],
                start,
                targets,
                valid,
                ctx.softcap,
                log_normalizer,
                weights,
                grad_embeddings,
                None if grad_classifier is None else grad_classifier[start:stop],
            )
        if grad_embeddings is not None:
            grad_embeddings = grad_embeddings.to(embeddings.dtype)
        if grad_classifier is not None:
            grad_classifier = grad_classifier.to(classifier.dtype)
        return grad_embeddings, grad_classifier, None, None, None, None, None


def linear_cross_entropy(
    e: Tensor,
    c: Tensor,
    targets: Tensor,
    ignore_index: int = -100,
    softcap: float | None = None,
    reduction: str = "mean",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """Cross-entropy of the logits ``e @ c.T`` without ever holding the (N, C) logit matrix.

    Cut Cross-Entropy (Wijmans et al., 2024, "Cut Your Losses in Large-Vocabulary Language
    Models", arXiv:2411.09009). The loss of row i is

        loss_i = logsumexp_k z_ik - z_i,t_i,     z = e @ c^T,  or  z = softcap * tanh(e @ c^T / softcap),

    equal to ``F.cross_entropy(z, targets, ignore_index=..., reduction=...)`` in value and in
    gradient. The classes are processed in chunks of ``chunk_size``: the forward keeps an
    online log-sum-exp (running max and rescaled running sum) and picks each row's target
    logit out of the chunk that holds it; the backward recomputes each chunk of logits and
    turns it in place into its gradient ``(softmax - onehot) * weight`` (times
    ``1 - tanh^2`` with softcap), accumulating ``dE += G @ C_chunk`` and writing
    ``dC_chunk = G^T @ E``. Only the (N,) log-normalisers are saved between the passes, so the
    extra memory beyond the inputs and their gradients is one (N, chunk_size) block (two with
    softcap), never (N, C). Sums run in at least float32 (float64 stays float64).

    Parameters
    ----------
    e : Tensor
        (..., d) embeddings (the classifier's input).
    c : Tensor
        (C, d) classifier weight; no bias (use a bias-free head).
    targets : Tensor
        (...) int64 class indices, the leading shape of ``e``.
    ignore_index : int, default -100
        Rows with this target contribute 0 and are left out of the mean.
    softcap : float or None, default None
        If set (> 0), logits are ``softcap * tanh(logits / softcap)``.
    reduction : {"mean", "sum", "none"}, default "mean"
        ``mean`` averages over the rows not ignored; ``none`` returns the leading shape of ``e``.
    chunk_size : int, default 4096
        Classes per chunk.

    Returns
    -------
    Tensor
        Scalar, or per-row losses for ``reduction="none"``, in ``e``'s dtype.
    """
    check_reduction(reduction)
    if e.dim() < 1 or c.dim() != 2 or e.shape[-1] != c.shape[1]:
        raise ValueError(
            f"linear_cross_entropy: e must be (..., d) and c (C, d) with the same d, got {tuple(e.shape)} and "
            f"{tuple(c.shape)}"
        )
    if e.dtype != c.dtype or not e.dtype.is_floating_point:
        raise ValueError(f"linear_cross_entropy: e and c must share a floating dtype, got {e.dtype} and {c.dtype}")
    if targets.shape != e.shape[:-1] or targets.dtype != torch.int64:
        raise ValueError(
            f"linear_cross_entropy: targets must be int64 of shape {tuple(e.shape[:-1])}, got {targets.dtype} "
            f"{tuple(targets.shape)}"
        )
    if softcap is not None and not softcap > 0:
        raise ValueError(f"linear_cross_entropy: softcap must be > 0 or None, got {softcap!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"linear_cross_entropy: chunk_size must be a positive int, got {chunk_size!r}")
    flat_targets = targets.reshape(-1)
    if not flat_targets.is_meta:
        out_of_range = (flat_targets != ignore_index) & ((flat_targets < 0) | (flat_targets >= c.shape[0]))
        if bool(out_of_range.any()):
            raise ValueError(
                f"linear_cross_entropy: targets must lie in [0, {c.shape[0]}) or equal ignore_index={ignore_index}"
            )
    loss = _LinearCrossEntropy.apply(
        e.reshape(-1, e.shape[-1]), c, flat_targets, ignore_index, softcap, reduction, chunk_size
    )
    return loss.reshape(targets.shape) if reduction == "none" else loss


class LinearCrossEntropy(nn.Module):
    """Module twin of :func:`linear_cross_entropy` (Cut Cross-Entropy, arXiv:2411.09009).

    Takes the model's features and its head's weight instead of the logits, so the (B, C)
    logit matrix is never held; worth it when C is large. The head must be bias-free (a bias
    is not part of this loss and would stay untrained); the model's logits ``e @ c.T`` give
    its class predictions.

    Parameters
    ----------
    ignore_index : int, default -100
    softcap : float or None, default None
    reduction : {"mean", "sum", "none"}, default "mean"
    chunk_size : int, default 4096
    """

    inputs = ("embeddings", "classifier", "targets")
    # not per_sample: its chunk loop branches on tensor values, which torch.func.vmap cannot batch
    per_sample = False
    task = "classification"

    def __init__(
        self,
        ignore_index: int = -100,
        softcap: float | None = None,
        reduction: str = "mean",
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        super().__init__()
        if softcap is not None and not softcap > 0:
            raise ValueError(f"softcap must be > 0 or None, got {softcap!r}")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        self.ignore_index = int(ignore_index)
        self.softcap = None if softcap is None else float(softcap)
        self.reduction = check_reduction(reduction)
        self.chunk_size = chunk_size

    def forward(self, embeddings: Tensor, classifier: Tensor, targets: Tensor) -> Tensor:
        return linear_cross_entropy(
            embeddings, classifier, targets, self.ignore_index, self.softcap, self.reduction, self.chunk_size
        )

    def extra_repr(self) -> str:
        return (
            f"ignore_index={self.ignore_index}, softcap={self.softcap}, reduction={self.reduction!r}, "
            f"chunk_size={self.chunk_size}"
        )

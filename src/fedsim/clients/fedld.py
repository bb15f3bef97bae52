"""FedLD client objective: cross-entropy plus a margin regulariser on the batch's softmax.

Reference
---------
S. Zeng, P. Guo, S. Wang, J. Wang, Y. Zhou, L. Qu, "Tackling Data Heterogeneity in Federated
Learning via Loss Decomposition", MICCAI 2024
(https://papers.miccai.org/miccai-2024/paper/1348_paper.pdf). The server half is
:func:`fedsim.strategies.fedld.fedld_aggregate`.

The client minimises ``CE(logits, y) + fedld_regulariser(logits, beta)``.
"""

from __future__ import annotations

import torch

from fedsim.clients.hooks import ClientHook

__all__ = ["fedld_regulariser", "stacked_fedld_regulariser"]


def fedld_regulariser(logits: torch.Tensor, beta: float = 0.03) -> torch.Tensor:
    """FedLD's margin term ``beta * log(1 + ||softmax(logits)||_F^2)``.

    The softmax is taken over the class dimension (dim 1) and the Frobenius norm over the
    whole batch's probability matrix (every sample and class at once), as in the paper.

    Parameters
    ----------
    logits : torch.Tensor
        Shape ``(B, C)`` (or ``(B, C, ...)``, the class dimension second).
    beta : float, default 0.03
        Weight of the term.

    Returns
    -------
    torch.Tensor
        A scalar, differentiable in ``logits``.
    """
    if logits.dim() < 2:
        raise ValueError(f"fedld_regulariser: logits must have shape (B, C, ...), got {tuple(logits.shape)}")
    probs = torch.softmax(logits, dim=1)
    return beta * torch.log1p(probs.square().sum())


def stacked_fedld_regulariser(logits: torch.Tensor, mask: torch.Tensor, beta: float = 0.03) -> torch.Tensor:
    """:func:`fedld_regulariser` of K clients' padded batches at once.

    Parameters
    ----------
    logits : torch.Tensor
        Shape ``(K, B, C)``: client k's batch, padded to B rows.
    mask : torch.Tensor
        Shape ``(K, B)``: 1 on the real rows, 0 on the padding (which adds nothing).
    beta : float, default 0.03
        Weight of the term.

    Returns
    -------
    torch.Tensor
        Shape ``(K,)``, client k's term on its real rows.
    """
    probs = torch.softmax(logits, dim=-1) * mask.unsqueeze(-1)
    return beta * torch.log1p(probs.square().sum(dim=(1, 2)))


class FedLDRegulariser(ClientHook):
    """FedLD's client term as a hook: adds :func:`fedld_regulariser` of the batch logits."""

    def __init__(self, beta: float) -> None:
        self.beta = beta

    def extra_loss(self, model: torch.nn.Module, logits: torch.Tensor) -> torch.Tensor:
        return fedld_regulariser(logits, self.beta)

    def stacked_extra_loss(self, params: dict[str, torch.Tensor], logits: torch.Tensor,
                           mask: torch.Tensor) -> torch.Tensor:
        return stacked_fedld_regulariser(logits, mask, self.beta)

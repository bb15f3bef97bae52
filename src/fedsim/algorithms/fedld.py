"""FedLD: per-layer principal directions with majority-aligned signs on the server, a margin
regulariser on the batch's softmax in the clients.

Reference
---------
S. Zeng, P. Guo, S. Wang, J. Wang, Y. Zhou, L. Qu, "Tackling Data Heterogeneity in Federated
Learning via Loss Decomposition", MICCAI 2024
(https://papers.miccai.org/miccai-2024/paper/1348_paper.pdf). The client half (margin
regulariser) is :func:`fedld_regulariser`: each client minimises
``CE(logits, y) + beta * log(1 + ||softmax(logits)||_F^2)``.

Definition implemented (per layer ``l``)
----------------------------------------
Stack the clients' flattened layer updates into ``X`` (``N x D_l``) with thin SVD
``X = U S V^T`` and numerical rank ``q`` (singular values above ``N * eps_dtype`` relative to
the largest, on the squared scale).

1. Keep the top ``k = ceil(keep * q)`` right singular directions ``v_1..v_k`` (by singular
   value). "80%" therefore means 80% of the directions the stack actually spans, rounded up:
   at least one direction is always kept and ``keep = 1`` keeps them all. The authors' code
   uses ``int(keep * N)``, which counts zero-singular-value directions when ``N`` exceeds the
   rank and keeps none at ``N = 1``; both rules agree when ``X`` has full row rank and
   ``keep * N`` is an integer (e.g. ``N = 10``).
2. Flip the sign of each ``v_j`` so that it agrees with the majority of the clients'
   projections: if ``#{i : <x_i, v_j> < 0} > #{i : <x_i, v_j> >= 0}``, ``v_j <- -v_j``.
3. Rebuild each client's update from the kept directions,
   ``x_i' = sum_{j<=k} <x_i, v_j> v_j``, and rescale it to the original norm,
   ``x_i'' = x_i' * |x_i| / |x_i'|`` (0 if ``x_i'`` is 0).
4. Return the weighted mean ``sum_i w_i x_i'' / sum_i w_i`` (weights: example counts).

Note on step 2: the rebuild in step 3 is the orthogonal projection onto ``span(v_1..v_k)``,
which does not depend on the signs of the ``v_j``, so the alignment changes the returned
directions (:func:`fedld_directions`) but not the aggregate. The same holds in the authors'
code, whose per-direction rebuild ``(<x_i, w>/<w, w>) w`` is also sign-invariant.

The authors' code also scales each direction's component by ``s_j / sum(s)`` before the norm
rescaling and keeps a moving average of past aggregates; neither is part of the method as
specified here. Its runs use a wrong learning-rate argument (lr 1e-4 for every method); that
is a training-loop trap and has no counterpart in this pure function.

Computation: per layer one chunked pass for the ``N x N`` Gram matrix ``X X^T`` (its
eigenvectors are ``U``, its eigenvalues ``S^2``), all the steps above as ``N x N`` algebra
(``X' = U_k U_k^T X``), and one pass for the final combination ``c^T X``.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Sequence
from typing import Literal, NamedTuple

import torch
from flwr.app import Message
from pydantic import Field

from fedsim.algorithms.api import SyncStrategyBase
from fedsim.clients.features import ClientContext, ClientFeature
from fedsim.clients.hooks import ClientHook
from fedsim.strategies.aggregate import as_weights, check_updates, gram_matrix
from fedsim.strategies.base import FedsimStrategy
from fedsim.strategies.replies import ClientUpdate

__all__ = ["BETA_KEY", "FedLD", "FedLDConfig", "FedLDDirections", "fedld_aggregate", "fedld_directions",
           "fedld_rebuild", "fedld_regulariser", "stacked_fedld_regulariser"]

BETA_KEY = "fedld-beta"
"""The training message's config entry with ``beta``, for a Flower app's ClientApp."""


class FedLDConfig(SyncStrategyBase):
    """FedLD: SVD-filtered, sign-aligned, norm-preserving aggregation; clients add
    beta * log(1 + ||softmax(logits)||_F^2) to their loss."""

    name: Literal["fedld"] = "fedld"
    keep: float = Field(0.8, gt=0, le=1)
    beta: float = Field(0.03, ge=0)


class FedLDDirections(NamedTuple):
    """Kept principal directions of one layer (see :func:`fedld_directions`).

    Attributes
    ----------
    directions : torch.Tensor
        Unit right singular vectors ``v_j`` as rows, sign-aligned, shape ``(k, D)``.
    singular_values : torch.Tensor
        Their singular values, descending, float64, shape ``(k,)``.
    """

    directions: torch.Tensor
    singular_values: torch.Tensor


class _LayerSpectrum(NamedTuple):
    left: torch.Tensor  # (N, k) sign-aligned left singular vectors u_j of the kept directions
    singular_values: torch.Tensor  # (k,) float64
    norms: torch.Tensor  # (N,) float64 original norms |x_i|


def _check_keep(keep: float, where: str) -> None:
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"{where}: keep must be in (0, 1], got {keep}")


def _spectrum(stack: torch.Tensor, keep: float) -> _LayerSpectrum:
    """Kept, sign-aligned left singular vectors of ``stack`` (``N x D``) via its Gram matrix."""
    n = stack.shape[0]
    gram = gram_matrix(stack)
    norms = torch.diagonal(gram).clamp_min(0.0).sqrt()
    eigvals, eigvecs = torch.linalg.eigh(gram)
    eigvals, eigvecs = eigvals.flip(0), eigvecs.flip(1)
    rtol = n * torch.finfo(stack.dtype).eps
    rank = int((eigvals > rtol * float(eigvals[0].clamp_min(0.0))).sum())
    num_kept = min(rank, math.ceil(keep * rank - 1e-9))
    left = eigvecs[:, :num_kept]
    singular_values = eigvals[:num_kept].sqrt()
    # <x_i, v_j> = <x_i, X^T u_j> / s_j = (X X^T u_j)_i / s_j; through the Gram matrix a zero
    # update projects to exactly 0 (counted with the non-negative side, as in the authors' code).
    projections = (gram @ left) / singular_values[None, :]
    negative = (projections < 0).sum(dim=0)
    flip = negative > (n - negative)
    left = torch.where(flip[None, :], -left, left)
    return _LayerSpectrum(left, singular_values, norms)


def _rebuild_coefficients(spec: _LayerSpectrum) -> torch.Tensor:
    """``C`` (``N x N``, float64) with rebuilt-and-rescaled updates ``X'' = C X``."""
    projector = spec.left @ spec.left.T  # X' = U_k U_k^T X
    rebuilt_sq_norms = (spec.left.square() * spec.singular_values.square()).sum(dim=1)
    rebuilt_norms = rebuilt_sq_norms.sqrt()
    scale = torch.where(rebuilt_norms > 0, spec.norms / rebuilt_norms, torch.zeros_like(rebuilt_norms))
    return scale[:, None] * projector


def _flatten(layer: torch.Tensor, where: str) -> torch.Tensor:
    if not isinstance(layer, torch.Tensor) or layer.dim() < 1:
        raise ValueError(f"{where}: each layer must be a tensor of shape (N, *layer_shape)")
    stack = layer.reshape(layer.shape[0], -1)
    check_updates(stack, where)
    return stack


def fedld_directions(layer_updates: torch.Tensor, keep: float = 0.8) -> FedLDDirections:
    """The kept, majority-sign-aligned principal directions of one layer's updates.

    Parameters
    ----------
    layer_updates : torch.Tensor
        Clients' updates of one layer, shape ``(N, *layer_shape)``.
    keep : float, default 0.8
        Fraction of the numerical rank kept, ``k = ceil(keep * rank)``.

    Returns
    -------
    FedLDDirections
        ``directions`` ``(k, D)`` (dtype of the input) and ``singular_values`` ``(k,)``.
    """
    _check_keep(keep, "fedld_directions")
    stack = _flatten(layer_updates, "fedld_directions")
    spec = _spectrum(stack, keep)
    # v_j = X^T u_j / s_j
    coefficients = (spec.left / spec.singular_values[None, :]).to(stack.dtype)
    return FedLDDirections(coefficients.T @ stack, spec.singular_values)


def fedld_rebuild(layer_updates: torch.Tensor, keep: float = 0.8) -> torch.Tensor:
    """Each client's layer update rebuilt from the kept directions, rescaled to its own norm.

    Parameters
    ----------
    layer_updates : torch.Tensor
        Clients' updates of one layer, shape ``(N, *layer_shape)``.
    keep : float, default 0.8
        Fraction of the numerical rank kept, ``k = ceil(keep * rank)``.

    Returns
    -------
    torch.Tensor
        Rebuilt updates ``x_i''``, same shape and dtype as ``layer_updates``.
    """
    _check_keep(keep, "fedld_rebuild")
    stack = _flatten(layer_updates, "fedld_rebuild")
    coefficients = _rebuild_coefficients(_spectrum(stack, keep)).to(stack.dtype)
    return (coefficients @ stack).reshape(layer_updates.shape)


def fedld_aggregate(
    layer_updates: Sequence[torch.Tensor],
    weights: torch.Tensor | Sequence[float] | None = None,
    keep: float = 0.8,
) -> list[torch.Tensor]:
    """FedLD aggregate (Zeng et al., MICCAI 2024): per layer, the weighted mean of the rebuilt,
    norm-rescaled updates (definition in the module docstring).

    Parameters
    ----------
    layer_updates : sequence of torch.Tensor
        One tensor per layer, shape ``(N, *layer_shape)``, the same ``N`` clients in the same
        order in every layer.
    weights : torch.Tensor or sequence of float or None, default None
        Non-negative per-client weights (example counts); ``None`` means uniform.
    keep : float, default 0.8
        Fraction of each layer's numerical rank kept, ``k = ceil(keep * rank)``.

    Returns
    -------
    list of torch.Tensor
        One tensor of shape ``layer_shape`` per layer (dtype and device of that layer).
    """
    _check_keep(keep, "fedld_aggregate")
    layers = list(layer_updates)
    if not layers:
        raise ValueError("fedld_aggregate: layer_updates is empty")
    stacks = [_flatten(layer, f"fedld_aggregate (layer {index})") for index, layer in enumerate(layers)]
    n = stacks[0].shape[0]
    w = as_weights(weights, n, "fedld_aggregate")
    out = []
    for index, (layer, stack) in enumerate(zip(layers, stacks)):
        if stack.shape[0] != n:
            raise ValueError(f"fedld_aggregate: layer {index} has {stack.shape[0]} clients, layer 0 has {n}")
        coefficients = w.to(stack.device) @ _rebuild_coefficients(_spectrum(stack, keep))
        out.append((coefficients.to(stack.dtype) @ stack).reshape(layer.shape[1:]))
    return out


# ------------------------------------------------------------------ client half
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


class FedLDClient(ClientFeature):
    """FedLD's client half: the margin regulariser with ``strategy.beta``."""

    def key(self, ctx: ClientContext) -> Hashable:
        return ctx.cfg.strategy.beta

    def hooks(self, ctx: ClientContext, start: dict[str, torch.Tensor]) -> tuple[ClientHook, ...]:
        return (FedLDRegulariser(ctx.cfg.strategy.beta),)


class FedLD(FedsimStrategy):
    """FedLD: :func:`fedld_aggregate` per layer on the server (example weights); clients add
    :func:`fedld_regulariser` to their loss.

    In a Flower app every training message carries ``beta`` as the config entry
    ``"fedld-beta"`` (:data:`BETA_KEY`), for the ClientApp's loss.

    Parameters
    ----------
    *args, **kwargs
        Flower FedAvg's arguments, ``min_successful`` and ``server_opt``.
    keep : float, default 0.8
        Fraction of each layer's directions kept, in ``(0, 1]``.
    beta : float, default 0.03
        The clients' regulariser strength.
    """

    name = "fedld"
    Config = FedLDConfig
    description = "FedLD (Zeng et al. 2024): per-layer SVD-filtered, norm-preserving mean; clients add a margin term"
    client = FedLDClient()

    def prepare_messages(self, server_round: int, messages: list[Message], clients: list[int]) -> None:
        for message in messages:
            message.content["config"][BETA_KEY] = self.cfg.beta

    def aggregate_updates(self, server_round: int, updates: Iterable[ClientUpdate]) -> torch.Tensor:
        updates = list(updates)
        layers = self.spec.split_layers(torch.stack([u.update for u in updates]))
        weights = torch.tensor([u.num_examples for u in updates], dtype=torch.float32)
        return self.spec.join_layers(fedld_aggregate(layers, weights, keep=self.cfg.keep))

"""Gossip averaging steps for decentralised training, plain and variance-corrected.

There is no server model: every node keeps its own. The functions here are pure and act on
the models of all n nodes at once, given either as one stacked tensor of shape (n, ...)
(e.g. (n, D) flat models; treated as a single layer) or as a per-layer list whose k-th
entry stacks layer k of every node, shape (n, *layer_shape). The result has the same form.

Variance correction follows "Vanishing Variance Problem in Fully Decentralized
Neural-Network Systems" (the paper behind fedsim's variance-corrected gossip): averaging
independent models shrinks each layer's weight variance; rescaling every layer of the mixed
model around its mean, to the average variance of the models that were mixed, undoes it.
"""

from collections.abc import Sequence

import torch
from torch import Tensor

NodeModels = Tensor | Sequence[Tensor]


def _layers(models: NodeModels) -> list[Tensor]:
    layers = [models] if isinstance(models, Tensor) else list(models)
    if not layers:
        raise ValueError("gossip: no layers given")
    n = layers[0].shape[0]
    for k, layer in enumerate(layers):
        if layer.ndim < 1 or layer.shape[0] != n:
            raise ValueError(f"gossip: layer {k} has shape {tuple(layer.shape)}; every layer "
                             f"must stack the {n} nodes along dim 0")
    return layers


def _like(models: NodeModels, layers: list[Tensor]) -> NodeModels:
    return layers[0] if isinstance(models, Tensor) else layers


def gossip_mix(models: NodeModels, W: Tensor) -> NodeModels:
    """One gossip step ``x_i <- sum_j W_ij x_j`` for every node, i.e. ``X <- W @ X``.

    Parameters
    ----------
    models : Tensor (n, ...) or sequence of Tensor (n, ...)
        Stacked node models, or per-layer stacks.
    W : Tensor (n, n)
        Mixing matrix (e.g. ``fedsim.sim.topology.mixing_matrix``); cast to each layer's
        dtype.
    """
    layers = _layers(models)
    n = layers[0].shape[0]
    if W.shape != (n, n):
        raise ValueError(f"gossip_mix: W has shape {tuple(W.shape)}, expected ({n}, {n})")
    mixed = [(W.to(layer.dtype) @ layer.reshape(n, -1)).reshape(layer.shape)
             for layer in layers]
    return _like(models, mixed)


def neighbour_average_matrix(neighbours: Sequence[Sequence[int]],
                             dtype: torch.dtype = torch.float64) -> Tensor:
    """The matrix of ``x_i <- 0.5 x_i + 0.5 mean_{j in N(i)} x_j`` (a node with no
    neighbours keeps its model). Row stochastic; doubly stochastic, hence mean-preserving,
    when the graph is regular."""
    n = len(neighbours)
    W = torch.zeros(n, n, dtype=dtype)
    for i, peers in enumerate(neighbours):
        peers = list(peers)
        if any(not 0 <= j < n or j == i for j in peers):
            raise ValueError(f"neighbour_average: node {i} has neighbours {peers}; they must "
                             f"be other nodes in 0..{n - 1}")
        if peers:
            W[i, i] = 0.5
            W[i, peers] = 0.5 / len(peers)
        else:
            W[i, i] = 1.0
    return W


def neighbour_average(models: NodeModels,
                      neighbours: Sequence[Sequence[int]]) -> NodeModels:
    """Plain gossip as in the vanishing-variance paper:
    ``x_i <- 0.5 * x_i + 0.5 * mean(x_j, j in N(i))`` for every node at once.

    Parameters
    ----------
    models : Tensor (n, ...) or sequence of Tensor (n, ...)
        Stacked node models, or per-layer stacks.
    neighbours : sequence of sequence of int
        ``neighbours[i]`` lists the nodes i mixes in (``fedsim.sim.topology.neighbours``).
    """
    return gossip_mix(models, neighbour_average_matrix(neighbours))


def variance_correct(layer_after_mix: Tensor, layers_mixed: Sequence[Tensor] | Tensor,
                     eps: float = 1e-4) -> Tensor:
    """Rescale one node's mixed layer to the average variance of the layers it mixed.

        w <- mean(w) + (w - mean(w)) * sqrt(target_var / (var(w) + eps)),
        target_var = (1/k) * sum_m var(layer_m)

    over the k layers that were mixed (the node's own and its neighbours', before mixing).
    ``mean`` and ``var`` run over all elements of the layer; ``var`` is the population
    variance (divides by the element count). The mean is kept; the variance becomes
    ``target_var * var(w) / (var(w) + eps)``, i.e. ``target_var`` up to the eps guard.

    Parameters
    ----------
    layer_after_mix : Tensor
        The node's layer after averaging.
    layers_mixed : sequence of Tensor, or Tensor of shape (k, *layer.shape)
        The k layers that went into the average, each shaped like ``layer_after_mix``.
    eps : float, default 1e-4
        The paper's guard against dividing by a vanishing variance.
    """
    if isinstance(layers_mixed, Tensor):
        stacked = layers_mixed
    else:
        stacked = torch.stack(list(layers_mixed)) if len(layers_mixed) else torch.empty(0)
    if stacked.shape[0] == 0 or stacked.shape[1:] != layer_after_mix.shape:
        raise ValueError(f"variance_correct: layers_mixed of shape {tuple(stacked.shape)} "
                         f"must stack k >= 1 layers shaped {tuple(layer_after_mix.shape)}")
    target_var = stacked.reshape(stacked.shape[0], -1).var(dim=1, correction=0).mean()
    mean = layer_after_mix.mean()
    var = layer_after_mix.var(correction=0)
    return mean + (layer_after_mix - mean) * torch.sqrt(target_var / (var + eps))


def variance_corrected_average(models: NodeModels, neighbours: Sequence[Sequence[int]],
                               eps: float = 1e-4) -> NodeModels:
    """Variance-corrected gossip step: :func:`neighbour_average`, then
    :func:`variance_correct` of every node's every layer against the layers it mixed
    (its own and its neighbours', before the step)."""
    layers = _layers(models)
    mixed = _layers(neighbour_average(models, neighbours))
    corrected = []
    for before, after in zip(layers, mixed):
        corrected.append(torch.stack([
            variance_correct(after[i], before[[i, *peers]], eps)
            for i, peers in enumerate(neighbours)
        ]))
    return _like(models, corrected)


def mix_node(layers: Sequence[Tensor], weights: Tensor, correct: Sequence[bool],
             eps: float = 1e-4) -> list[Tensor]:
    """One node's gossip step, as the node itself runs it: ``x_i <- sum_m w_m x_m`` over
    the models it mixes, then (where ``correct[k]``) :func:`variance_correct` of layer k
    against the k-th layers that were mixed.

    This is row i of :func:`gossip_mix` (``w = W[i, [i, *peers]]``) followed by the
    correction of :func:`variance_corrected_average`, computed from node i's own model and
    the models its neighbours sent it, with no view of the rest of the graph.

    Parameters
    ----------
    layers : sequence of Tensor (m, ...)
        Layer k of the m models being mixed, stacked on dim 0: the node's own first, then
        its neighbours'.
    weights : Tensor (m,)
        The mixing weights of those models (the node's row of W, restricted to them).
    correct : sequence of bool
        Per layer, whether to restore its variance after mixing.
    eps : float, default 1e-4
        The guard of :func:`variance_correct`.
    """
    if len(correct) != len(layers):
        raise ValueError(f"mix_node: {len(correct)} correction flags for {len(layers)} layers")
    m = weights.shape[0]
    mixed = []
    for layer, corrected in zip(_layers(layers), correct, strict=True):
        if layer.shape[0] != m:
            raise ValueError(f"mix_node: {m} weights for {layer.shape[0]} stacked models")
        after = torch.tensordot(weights.to(layer.dtype), layer, dims=1)
        mixed.append(variance_correct(after, layer, eps) if corrected else after)
    return mixed


def consensus_distance(models: NodeModels) -> float:
    """How far the nodes are from agreeing: ``(1/n) sum_i ||x_i - x_bar||^2``, with
    ``x_bar`` the average model and the squared norm summed over all layers. Zero iff all
    nodes hold the same model."""
    layers = _layers(models)
    return float(sum(((layer - layer.mean(dim=0, keepdim=True)) ** 2).sum()
                     for layer in layers) / layers[0].shape[0])

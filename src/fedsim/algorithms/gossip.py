"""Decentralised gossip: plain or variance-corrected model averaging between neighbours.

There is no server model: every node keeps its own. The functions here are pure and act on
the models of all n nodes at once, given either as one stacked tensor of shape (n, ...)
(e.g. (n, D) flat models; treated as a single layer) or as a per-layer list whose k-th
entry stacks layer k of every node, shape (n, *layer_shape). The result has the same form.

Variance correction follows "Vanishing Variance Problem in Fully Decentralized
Neural-Network Systems" (the paper behind fedsim's variance-corrected gossip): averaging
independent models shrinks each layer's weight variance; rescaling every layer of the mixed
model around its mean, to the average variance of the models that were mixed, undoes it.

The server loop is fedsim's gossip loop (:mod:`fedsim.loops.gossip`, server-relayed
gossip); each node keeps its own model in its Context (:mod:`fedsim.clients.gossip_node`)
and mixes it with :meth:`GossipNode.mix`, this algorithm's client half.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, MutableMapping, Sequence
from typing import TYPE_CHECKING, ClassVar, Literal

import numpy as np
import torch
from flwr.app import MetricRecord, RecordDict
from pydantic import Field
from torch import Tensor

from fedsim.algorithms.api import Algorithm, Family, StrategySection
from fedsim.clients.features import ClientFeature
from fedsim.clients.gossip_node import (
    MIXED_RECORD,
    held_model,
    keep_model,
    version,
    weight_layers,
)
from fedsim.params import ParamSpec
from fedsim.quant import codecs
from fedsim.records import to_numpy, to_record
from fedsim.topology import erdos_renyi, neighbour_average_matrix

if TYPE_CHECKING:
    from fedsim.config import ExperimentConfig

__all__ = ["Gossip", "GossipConfig", "consensus_distance", "gossip_mix", "mix_node", "neighbour_average", "variance_correct", "variance_corrected_average"]


class GossipConfig(StrategySection):
    """Decentralised gossip (plain or variance-corrected, Tian et al., "Vanishing Variance
    Problem in Fully Decentralized Neural-Network Systems"); ``rounds`` gossip rounds."""

    family: ClassVar[Family] = "gossip"
    name: Literal["gossip"] = "gossip"
    topology: Literal["ring", "torus", "regular", "erdos_renyi", "full", "exponential"] = "regular"
    degree: int = Field(8, ge=1, description="for topology: regular")
    p: float | None = Field(None, gt=0, le=1, description="edge probability, erdos_renyi")
    mixing: Literal["half", "metropolis", "uniform"] = Field(
        "half", description="half: x_i <- (x_i + mean of neighbours) / 2")
    variance_correction: bool = True
    eps: float = Field(1e-4, gt=0)


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
        Mixing matrix (e.g. ``fedsim.topology.mixing_matrix``); cast to each layer's
        dtype.
    """
    layers = _layers(models)
    n = layers[0].shape[0]
    if W.shape != (n, n):
        raise ValueError(f"gossip_mix: W has shape {tuple(W.shape)}, expected ({n}, {n})")
    mixed = [(W.to(layer.dtype) @ layer.reshape(n, -1)).reshape(layer.shape)
             for layer in layers]
    return _like(models, mixed)


def neighbour_average(models: NodeModels,
                      neighbours: Sequence[Sequence[int]]) -> NodeModels:
    """Plain gossip as in the vanishing-variance paper:
    ``x_i <- 0.5 * x_i + 0.5 * mean(x_j, j in N(i))`` for every node at once.

    Parameters
    ----------
    models : Tensor (n, ...) or sequence of Tensor (n, ...)
        Stacked node models, or per-layer stacks.
    neighbours : sequence of sequence of int
        ``neighbours[i]`` lists the nodes i mixes in (``fedsim.topology.neighbours``).
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


# ------------------------------------------------------------------ client half
def _peer_models(content: RecordDict, num_peers: int, dim: int) -> torch.Tensor:
    peers = torch.from_numpy(to_numpy(content["peers"]["models"]).astype(np.float32))
    if peers.shape != (num_peers, dim):
        raise ValueError(f"mix message holds peer models of shape {tuple(peers.shape)}, "
                         f"expected ({num_peers}, {dim})")
    if not torch.isfinite(peers).all():
        raise ValueError("mix message holds NaN or Inf peer models")
    return peers


def mix_reply(content: RecordDict, state: MutableMapping, spec: ParamSpec, variance_correction: bool,
              eps: float) -> RecordDict:
    """Run the node's mixing step on a ``train.mix`` message's ``content``; keep the result
    in the node's ``state`` and return the reply's content.

    The message's config holds ``self-weight`` and ``peer-weights`` (the node's row of W,
    the peers in the order of the ``peers`` record's rows) and the ``server-round``.
    """
    config = content["config"]
    own = held_model(content, state)
    weights = torch.tensor([float(config["self-weight"]), *map(float, config["peer-weights"])], dtype=torch.float64)
    stacked = torch.cat([spec.flatten(own)[None], _peer_models(content, len(weights) - 1, spec.dim)])
    correct = [variance_correction and weight for weight in weight_layers(spec)]
    flat = spec.join_layers(mix_node(spec.split_layers(stacked), weights, correct, eps))
    keep_model(state, {**own, **spec.unflatten(flat)}, version(int(config["server-round"]), "mix"))
    payload = codecs.build("identity").encode(flat)
    return RecordDict({MIXED_RECORD: to_record(payload.to_arrays()), "metrics": MetricRecord({"bytes_up": payload.nbytes})})


class GossipNode(ClientFeature):
    """Gossip's client half: a node mixes the model it keeps with its neighbours'."""

    @staticmethod
    def mix(content: RecordDict, state: MutableMapping, spec: ParamSpec, cfg: ExperimentConfig) -> RecordDict:
        """A ``train.mix`` message's reply (see :func:`mix_reply`)."""
        return mix_reply(content, state, spec, cfg.strategy.variance_correction, cfg.strategy.eps)


def topology_rules(cfg: ExperimentConfig) -> Iterator[str | None]:
    """The communication graph must exist on ``partition.num_clients`` nodes."""
    strategy, n = cfg.strategy, cfg.partition.num_clients
    where = f"partition.num_clients is {n}"
    minimum = {"ring": 3, "torus": 9}.get(strategy.topology, 2)
    if n < minimum:
        yield f"strategy.topology: {strategy.topology!r} needs at least {minimum} nodes; {where}"
        return
    if strategy.topology == "torus" and not any(n % r == 0 and n // r >= 3 for r in range(3, math.isqrt(n) + 1)):
        yield f"strategy.topology: a torus needs rows x cols nodes with rows, cols >= 3 (9, 12, 15, 16, ...); {where}"
    degree_default = type(strategy).model_fields["degree"].default
    if strategy.topology != "regular" and strategy.degree != degree_default:
        yield (f"strategy.degree: {strategy.degree} is read by topology 'regular' only; strategy.topology is "
               f"{strategy.topology!r}; leave it unset")
    if strategy.topology == "regular" and not (strategy.degree < n and (n * strategy.degree) % 2 == 0):
        yield (f"strategy.degree: a {strategy.degree}-regular graph needs degree < nodes and degree x nodes even; "
               f"{where}")
    if strategy.topology == "erdos_renyi":
        if strategy.p is None:
            yield (f"strategy.p: the edge probability is required for topology 'erdos_renyi' (connected "
                   f"graphs need p above ln(n)/n = {math.log(n) / n:.3f})")
        else:
            try:
                erdos_renyi(n, strategy.p, seed=cfg.seed)
            except ValueError as exc:
                yield f"strategy.p: {exc}"
    elif strategy.p is not None:
        yield f"strategy.p: the edge probability applies to topology 'erdos_renyi'; strategy.topology is {strategy.topology!r}"


class Gossip(Algorithm):
    """Variance-corrected (or plain) gossip; the server loop relays models between nodes."""

    name = "gossip"
    Config = GossipConfig
    description = "Gossip (Tian et al. 2024): neighbours average, each layer's variance restored (or plain)"
    client = GossipNode()
    consensus_distance = staticmethod(consensus_distance)

    @classmethod
    def rules(cls, cfg: ExperimentConfig) -> Iterator[str | None]:
        return topology_rules(cfg)

"""fedsim's decentralised gossip loop: plain or variance-corrected model averaging.

Source of the variance correction: Y. Tian, Z. Al-Ars, M. Kitsak, P. Hofstee, "Vanishing
Variance Problem in Fully Decentralized Neural-Network Systems", arXiv 2404.04616.

There is no global model. Node i starts from its own initialisation (seeded by (seed, i):
fully decentralised nodes do not share an initial model, which is what makes plain
averaging shrink the weights' variance). Every round each node trains locally, then mixes
with its neighbours on the configured topology (``strategy.topology``; time-varying graphs
change every round):

- plain: ``x_i <- sum_j W_ij x_j``, W the 0.5/0.5 rule (``x_i <- (x_i + mean of
  neighbours) / 2``), Metropolis-Hastings or uniform weights (``strategy.mixing``);
- variance-corrected (``strategy.variance_correction``): then every weight layer (matrix
  or kernel) of the mixed model is rescaled around its mean to the average variance of the
  layers it mixed; biases and normalisation statistics are averaged plainly.

Each node keeps its own model in its Flower Context (``fedsim.clients.gossip_node``): it
trains it on a ``train.gossip`` message and mixes it on a ``train.mix`` message that
carries its neighbours' models and its row of W, and replies with the result. Flower
routes every message through the SuperLink, so the server relays the neighbours' models
(in peer-to-peer gossip they would go node to node) and mirrors what each node holds,
for evaluation and checkpoints; it never runs a node's step. Bytes are counted as they
travel: per node and round, down its neighbours' models, up its update and its mixed
model (plus a whole model to each node whose state the server resends).

Each evaluation row reports the mean, spread, min and max of the nodes' accuracies on the
server's held-out test set, the accuracy of the nodes' average model, the consensus
distance ``(1/n) sum_i ||x_i - x_bar||^2`` and every tensor's variance (averaged over
nodes); every row (evaluated or not) has the last two.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from torch import Tensor

from fedsim.algorithms import registry
from fedsim.algorithms.api import StrategySection
from fedsim.clients import gossip_node
from fedsim.clients.gossip_node import weight_layers
from fedsim.clients.quantization import build_codec
from fedsim.clients.train import EvalResult
from fedsim.config import ExperimentConfig
from fedsim.loops.skeleton import LoopSetup, Steps, run_steps
from fedsim.outputs.plots import plot_comparison
from fedsim.outputs.results import RunDir
from fedsim.params import ParamSpec, set_flat
from fedsim.records import to_record
from fedsim.seeding import derive_seed
from fedsim.sim.components import Federation, make_model
from fedsim.sim.messaging import PartitionGrid, send_and_collect
from fedsim.strategies.evaluation import mean_train_metrics
from fedsim.strategies.replies import (
    ClientUpdate,
    Failure,
    screen_model_reply,
    screen_replies,
    screen_train_reply,
)
from fedsim.topology import (
    Topology,
    make_topology,
    mixing_matrix,
    neighbour_average_matrix,
    neighbours,
)

log = logging.getLogger(__name__)

# strategy.topology -> fedsim.topology's name
TOPOLOGY_NAMES = {"ring": "ring", "torus": "torus", "regular": "random_regular", "erdos_renyi": "erdos_renyi",
                  "full": "fully_connected", "exponential": "one_peer_exponential"}


def build_topology(strategy: StrategySection, num_nodes: int, seed: int) -> Topology:
    """The configured communication graph over ``num_nodes`` nodes (random graphs seeded)."""
    options: dict[str, Any] = {}
    if strategy.topology == "regular":
        options["degree"] = strategy.degree
    if strategy.topology == "erdos_renyi":
        options["p"] = strategy.p
    return make_topology(TOPOLOGY_NAMES[strategy.topology], num_nodes, seed=derive_seed(seed, "topology"), **options)


def mixing_weights(topology: Topology, step: int, rule: str) -> Tensor:
    """W of gossip step ``step``: the 0.5/0.5 rule ("half"), "metropolis" or "uniform"."""
    if rule == "half":
        return neighbour_average_matrix(neighbours(topology, step))
    return mixing_matrix(topology.adjacency(step), rule)


def layer_variances(spec: ParamSpec, models: Tensor) -> dict[str, float]:
    """Each layer's weight variance (population, over its elements), averaged over nodes."""
    return {name: float(layer.reshape(layer.shape[0], -1).var(dim=1, correction=0).mean())
            for name, layer in zip(spec.names, spec.split_layers(models), strict=True)}


def variance_drift(initial: dict[str, float], final: dict[str, float], weights: list[str]) -> dict[str, Any]:
    """How far each layer's variance moved from its initial value: the ratios final /
    initial (of the layers that do not start constant, as zero biases do), and over the weight
    layers ``weights`` their mean absolute log (0 when every weight layer kept its initial
    variance; None when no weight layer has a ratio)."""
    ratios = {name: final[name] / initial[name] for name in initial if initial[name] > 0}
    logs = [abs(math.log(ratios[name])) for name in weights if ratios.get(name, 0.0) > 0]
    drift = sum(logs) / len(logs) if logs else None
    return {"initial_layer_variance": initial, "final_layer_variance": final, "layer_variance_ratio": ratios,
            "layer_variance_log_drift": drift}


def layer_variance_series(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Per layer, its variance per round (the form ``plots.plot_comparison`` draws)."""
    names = rows[0]["layer_variance"] if rows else {}
    return {name: [{"round": r["round"], "layer_variance": r["layer_variance"][name]} for r in rows]
            for name in names}


def initial_models(cfg: ExperimentConfig, data: Federation, spec: ParamSpec) -> Tensor:
    """Every node's own initial model, flat, stacked (n, D)."""
    return torch.stack([spec.flatten(make_model(cfg.model, data, derive_seed(cfg.seed, "node", i)).state_dict())
                        for i in range(cfg.partition.num_clients)])


class NodeEvaluator:
    """Accuracy of every node's model, and of their average, on the server's test set."""

    def __init__(self, cfg: ExperimentConfig, setup: LoopSetup) -> None:
        self.setup = setup
        self.batch_size = cfg.eval.batch_size

    def _evaluate(self, flat: Tensor) -> EvalResult:
        set_flat(self.setup.net, self.setup.spec, flat)
        return self.setup.server_test(self.setup.net, self.batch_size)

    def __call__(self, models: Tensor) -> dict[str, float]:
        results = [self._evaluate(m) for m in models]
        accuracy = torch.tensor([r.accuracy for r in results])
        average = self._evaluate(models.mean(dim=0))
        return {"centralised_accuracy": float(accuracy.mean()),
                "centralised_loss": sum(r.loss for r in results) / len(results),
                "node_accuracy_std": float(accuracy.std(correction=0)),
                "node_accuracy_min": float(accuracy.min()), "node_accuracy_max": float(accuracy.max()),
                "average_model_accuracy": average.accuracy}


class GossipNodes:
    """The server's side of a gossip round: it relays models between nodes that keep their own.

    Each node holds its model in its Context (``fedsim.clients.gossip_node``). Every round
    the server asks every node to train (``train.gossip``), then sends each node the
    models of its neighbours and its row of the mixing matrix (``train.mix``); the node
    mixes and replies with its mixed model. ``models`` mirrors what the nodes hold, as
    their replies report it, for relaying, evaluation and checkpoints. A node whose reply
    fails keeps its model and is sent its mirrored model with its next message, as is
    every node in the first round of a run (and of a resume whose nodes did not get their
    checkpointed state back: :meth:`GossipSteps.load_state_dict`).

    Parameters
    ----------
    grid : Grid
        Where the messages go.
    cfg : ExperimentConfig
        ``strategy`` is the gossip algorithm's section.
    spec : ParamSpec
        The model's flat layout.
    template : dict
        A state dict of the model (integer buffers are sent as they are here).
    node_of : dict[int, int]
        Node (partition id) -> Flower node id.
    models : Tensor
        (n, D) flat models, one row per node, as of the end of round ``completed``.
    completed : int
        The last round these models went through (0 for the initial models).
    """

    def __init__(self, grid: Grid, cfg: ExperimentConfig, spec: ParamSpec, template: dict[str, Tensor],
                 node_of: dict[int, int], models: Tensor, completed: int = 0) -> None:
        self.grid, self.cfg, self.spec, self.template, self.node_of = grid, cfg, spec, template, node_of
        self.strategy = cfg.strategy
        self.algorithm = registry.get(cfg.strategy.name)
        self.topology = build_topology(self.strategy, len(node_of), cfg.seed)
        self.codec = build_codec(cfg.quant.uplink)
        self.models = models
        self.completed = completed
        n = len(node_of)
        self.versions = [gossip_node.version(completed, "mix")] * n
        self.resend = set(range(n))

    def train(self, rnd: int) -> dict[str, Any]:
        """Every node trains its own model once; a node that fails keeps its model."""
        dim = self.spec.dim
        messages = [self._message(rnd, i, "gossip") for i in range(len(self.node_of))]
        bytes_down = self._resent_bytes()
        accepted, failures = self._exchange(messages, lambda msg, pid: screen_train_reply(msg, pid, dim, self.codec))
        for u in accepted:
            self.models[u.partition_id] += u.update
        self._settle(accepted, failures, gossip_node.version(rnd, "train"))
        return {"num_success": len(accepted), "num_failed": len(failures),
                "failures": [{"client": f.partition_id, "reason": f.reason} for f in failures],
                "train_loss": mean_train_metrics(accepted).get("train_loss"),
                "bytes_up": sum(u.nbytes for u in accepted), "bytes_down": bytes_down}

    def mix(self, rnd: int) -> dict[str, Any]:
        """Gossip step ``rnd - 1`` of the topology (plain or variance-corrected), run by the
        nodes; a node whose mix fails keeps its trained model."""
        W = mixing_weights(self.topology, rnd - 1, self.strategy.mixing)
        bytes_down = self._resent_bytes()
        messages = []
        for i in range(len(self.node_of)):
            peers = [j for j in range(W.shape[1]) if j != i and W[i, j] != 0]
            message = self._message(rnd, i, "mix")
            message.content["peers"] = to_record({"models": self.models[peers].numpy()})
            message.content["config"]["self-weight"] = float(W[i, i])
            message.content["config"]["peer-weights"] = [float(W[i, j]) for j in peers]
            messages.append(message)
            bytes_down += 4 * self.spec.dim * len(peers)
        accepted, failures = self._exchange(messages, lambda msg, pid: screen_model_reply(msg, pid, self.spec.dim))
        for u in accepted:
            self.models[u.partition_id] = u.update
        self._settle(accepted, failures, gossip_node.version(rnd, "mix"))
        return {"num_mix_failed": len(failures),
                "mix_failures": [{"client": f.partition_id, "reason": f.reason} for f in failures],
                "bytes_up": sum(u.nbytes for u in accepted), "bytes_down": bytes_down}

    def _message(self, rnd: int, node: int, action: str) -> Message:
        config = ConfigRecord({"server-round": rnd, "partition-id": node, "gossip-version": self.versions[node]})
        content = RecordDict({"config": config})
        if node in self.resend:
            content["arrays"] = ArrayRecord({**self.template, **self.spec.unflatten(self.models[node])})
        return Message(content=content, message_type=f"{MessageType.TRAIN}.{action}", dst_node_id=self.node_of[node])

    def _resent_bytes(self) -> int:
        return 4 * self.spec.dim * len(self.resend)

    def _exchange(self, messages: list[Message], screen: Callable[[Message, int], ClientUpdate | Failure]
                  ) -> tuple[list[ClientUpdate], list[Failure]]:
        replies = send_and_collect(self.grid, messages, self.cfg.client.timeout_s)
        sent = {node: pid for pid, node in self.node_of.items()}
        return screen_replies(replies, sent, screen)

    def _settle(self, accepted: list[ClientUpdate], failures: list[Failure], new_version: str) -> None:
        """Nodes that replied now hold ``new_version``; the others get their model resent."""
        for u in accepted:
            self.versions[u.partition_id] = new_version
            self.resend.discard(u.partition_id)
        self.resend.update(f.partition_id for f in failures)


class GossipSteps(Steps):
    """The gossip family's step: every node trains, then mixes with its neighbours; the
    rows carry the consensus distance and each layer's variance, and every ``eval.every``
    rounds the nodes' accuracies. The run's model (checkpoints, ``quant.ptq``) is the
    average of the nodes' models."""

    def __init__(self, grid: Grid, cfg: ExperimentConfig) -> None:
        self.cfg = cfg
        self.total = cfg.rounds
        self.setup = setup = LoopSetup.build(grid, cfg)
        self.spec, self.template = setup.spec, setup.template
        models = initial_models(cfg, setup.data, self.spec)
        self.initial_variance = layer_variances(self.spec, models)
        self.evaluate_nodes = NodeEvaluator(cfg, setup)
        self.nodes = GossipNodes(grid, cfg, self.spec, self.template, setup.node_of, models)

    def step(self, rnd: int) -> dict[str, Any]:
        nodes = self.nodes
        trained, mixed = nodes.train(rnd), nodes.mix(rnd)
        row: dict[str, Any] = {**trained, **mixed,
                               "bytes_up": trained["bytes_up"] + mixed["bytes_up"],
                               "bytes_down": trained["bytes_down"] + mixed["bytes_down"],
                               "consensus_distance": nodes.algorithm.consensus_distance(nodes.models),
                               "layer_variance": layer_variances(self.spec, nodes.models)}
        if rnd % self.cfg.eval.every == 0 or rnd == self.cfg.rounds:
            row.update(self.evaluate_nodes(nodes.models))
        self.nodes.completed = rnd
        return row

    def model_state(self) -> dict[str, Tensor]:
        return {**self.template, **self.spec.unflatten(self.nodes.models.mean(dim=0))}

    def state_dict(self) -> dict[str, Any]:
        return {"node_models": self.nodes.models.clone(), "completed": self.nodes.completed,
                "versions": list(self.nodes.versions), "resend": sorted(self.nodes.resend)}

    def load_state_dict(self, model: dict[str, Tensor], state: dict[str, Any]) -> None:
        grid = self.nodes.grid
        self.nodes = GossipNodes(grid, self.cfg, self.spec, self.template, self.nodes.node_of,
                                 state["node_models"], completed=state["completed"])
        if isinstance(grid, PartitionGrid) and "resend" in state:
            # the nodes got their Context state back (their models with it): only those the
            # uninterrupted run would resend get theirs, so the resumed rows equal its rows
            self.nodes.versions, self.nodes.resend = list(state["versions"]), set(state["resend"])

    def summary(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        if not rows:
            return {}
        weights = [n for n, weight in zip(self.spec.names, weight_layers(self.spec), strict=True) if weight]
        return {**variance_drift(self.initial_variance, rows[-1]["layer_variance"], weights),
                "final_consensus_distance": rows[-1]["consensus_distance"]}

    def plots(self, rows: list[dict[str, Any]], run: RunDir) -> None:
        plot_comparison(layer_variance_series(rows), run.plot_dir / "layer_variance.png", key="layer_variance")

    def log_row(self, row: dict[str, Any]) -> None:
        acc = row.get("centralised_accuracy")
        log.info("round %d/%d  node acc %s  consensus %.4g  ok %d  failed %d", row["round"], self.total,
                 "-" if acc is None else f"{acc:.4f} ± {row['node_accuracy_std']:.4f}",
                 row["consensus_distance"], row["num_success"], row["num_failed"])


def run_gossip(grid: Grid, cfg: ExperimentConfig, run: RunDir, resume: bool, show_progress: bool) -> dict[str, Any]:
    """Run (or continue) the configured gossip experiment for ``cfg.rounds`` rounds."""
    return run_steps(GossipSteps(grid, cfg), grid, cfg, run, resume, show_progress)


__all__ = ["GossipNodes", "GossipSteps", "build_topology", "layer_variance_series", "layer_variances", "run_gossip"]

"""The gossip loop: consensus without training, variance correction, end-to-end training."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedsim.algorithms.gossip import gossip_mix, mix_node, variance_corrected_average
from fedsim.clients import gossip_node
from fedsim.config import load_config
from fedsim.loops.gossip import (
    build_topology,
    initial_models,
    mixing_weights,
    run_gossip,
    variance_drift,
)
from fedsim.outputs.results import RunDir
from fedsim.params import ParamSpec
from fedsim.quant.codecs import build as build_codec
from fedsim.runner import run_experiment
from fedsim.sim.client_app import ClientRuntime, Outcome, PartitionState
from fedsim.sim.components import federated_data, make_model
from fedsim.sim.inprocess import InProcessGrid
from fedsim.topology import neighbours

ROOT = Path(__file__).parents[2]
GOSSIP = ROOT / "configs" / "gossip.yaml"
SMALL = ["partition.num_clients=8", "strategy.degree=4", "model.name=mlp", "output.plots=false", "eval.every=1"]


@pytest.fixture
def config(tmp_path):
    def make(*overrides: str):
        other_graph = any(o.startswith("strategy.topology=") and o != "strategy.topology=regular" for o in overrides)
        small = [s for s in SMALL if not (other_graph and s.startswith("strategy.degree="))]  # a regular graph's only
        return load_config(GOSSIP, [f"output.dir={tmp_path / 'runs'}", *small, *overrides])

    return make


class IdleRuntime(ClientRuntime):
    """Gossip nodes that never train (a zero update every round) but mix as fedsim's do."""

    def __init__(self, cfg, spec: ParamSpec):
        super().__init__(cfg)
        self.payload = build_codec("identity").encode(torch.zeros(spec.dim)).to_arrays()

    def run(self, message_type, members):
        if message_type != "train.gossip":
            return super().run(message_type, members)
        outcomes = []
        for m in members:
            rnd = int(m.content["config"]["server-round"])
            gossip_node.keep_model(m.state, gossip_node.held_model(m.content, m.state),
                                   gossip_node.version(rnd, "train"))
            arrays = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in self.payload.items()})
            metrics = MetricRecord({"num-examples": 1, "train_loss": 0.0})
            outcomes.append(Outcome(RecordDict({"update": arrays, "metrics": metrics}), None, 0.0))
        return outcomes


def _run_idle(cfg):
    """Run the gossip loop with nodes that do not train; return the run and the initial models."""
    data = federated_data(cfg)
    spec = ParamSpec.of(make_model(cfg.model, data.train, cfg.seed))
    run = RunDir.create(cfg)
    grid = InProcessGrid(IdleRuntime(cfg, spec), cfg.partition.num_clients)
    summary = run_gossip(grid, cfg, run, resume=False, show_progress=False)
    return run, summary, initial_models(cfg, data.train, spec)


def test_plain_gossip_without_training_reaches_consensus_at_the_mean(config):
    cfg = config("rounds=40", "strategy.variance_correction=false", "eval.every=40")
    run, summary, start = _run_idle(cfg)
    final = run.latest_checkpoint().strategy["node_models"]
    assert summary["final_consensus_distance"] < 1e-6 * float(((start - start.mean(0)) ** 2).sum())
    torch.testing.assert_close(final, start.mean(0).expand_as(final), atol=1e-4, rtol=0)
    assert run.rows()[-1]["node_accuracy_std"] == pytest.approx(0.0, abs=1e-6)  # every node now predicts alike


def test_variance_correction_keeps_layer_variance_that_plain_gossip_loses(config):
    default_init = "model.init=default"  # biases start random, so their plain mixing shows too
    plain = _run_idle(config("rounds=5", "strategy.variance_correction=false", default_init))[1]
    corrected = _run_idle(config("rounds=5", "strategy.variance_correction=true", default_init))[1]
    exact = _run_idle(config("rounds=5", "strategy.variance_correction=true", "strategy.eps=1e-12", default_init))[1]
    weights = ["body.1.weight", "head.weight"]  # the MLP's weight matrices; biases mix plainly
    assert max(plain["layer_variance_ratio"].values()) < 0.5
    # the eps guard still shrinks the variance by var / (var + eps) per step; without it, exact
    for layer in weights:
        assert corrected["layer_variance_ratio"][layer] > 1.5 * plain["layer_variance_ratio"][layer]
        assert exact["layer_variance_ratio"][layer] == pytest.approx(1.0, abs=1e-3)
    assert exact["layer_variance_ratio"]["head.bias"] == pytest.approx(plain["layer_variance_ratio"]["head.bias"])
    assert exact["layer_variance_log_drift"] < corrected["layer_variance_log_drift"] < plain["layer_variance_log_drift"]


def _node_steps(layers, W, correct):
    """Every node's own mixing step (fedsim.algorithms.gossip.mix_node), stacked."""
    rows = []
    for i in range(W.shape[0]):
        mixed = [i, *(j for j in range(W.shape[1]) if j != i and W[i, j] != 0)]
        rows.append(mix_node([layer[mixed] for layer in layers], W[i, mixed], correct))
    return [torch.stack(per_node) for per_node in zip(*rows, strict=True)]


def test_each_nodes_half_rule_step_with_correction_is_the_variance_corrected_average():
    topology = build_topology(load_config(GOSSIP).strategy, 12, seed=0)
    layers = [torch.randn(12, 5, 3), torch.randn(12, 7)]
    ours = _node_steps(layers, mixing_weights(topology, 0, "half"), correct=[True, True])
    for a, b in zip(ours, variance_corrected_average(layers, neighbours(topology)), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(("topology", "rule"), [("torus", "metropolis"), ("exponential", "uniform")])
def test_each_nodes_plain_step_is_its_row_of_the_mixing_matrix(config, topology, rule):
    graph = build_topology(config("partition.num_clients=16", f"strategy.topology={topology}").strategy, 16, seed=0)
    W = mixing_weights(graph, 3, rule)
    layers = [torch.randn(16, 4, 2), torch.randn(16, 3)]
    for a, b in zip(_node_steps(layers, W, correct=[False, False]), gossip_mix(layers, W), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("topology", ["ring", "torus", "regular", "erdos_renyi", "full", "exponential"])
def test_every_configured_topology_builds_with_its_mixing_rule(config, topology):
    p = ["strategy.p=0.5"] if topology == "erdos_renyi" else []  # required there, refused elsewhere
    strategy = config("partition.num_clients=16", f"strategy.topology={topology}", *p).strategy
    graph = build_topology(strategy, 16, seed=0)
    W = mixing_weights(graph, 1, "uniform")
    torch.testing.assert_close(W.sum(dim=1), torch.ones(16, dtype=W.dtype))


def test_metropolis_on_a_directed_graph_is_refused(config):
    graph = build_topology(config("strategy.topology=exponential").strategy, 8, seed=0)
    with pytest.raises(ValueError, match="use rule='uniform'"):
        mixing_weights(graph, 0, "metropolis")


def test_gossip_trains_every_node_and_reports_spread_consensus_and_layer_variance(config):
    cfg = config("rounds=6", "partition.scheme=iid", "strategy.topology=ring", "client.optimizer=sgd",
                 "client.lr=0.1", "client.local_steps=10")
    path, summary = run_experiment(cfg)
    rows = RunDir.open(path).rows()
    assert summary["status"] == "completed" and all(r["num_success"] == 8 for r in rows)
    assert summary["final_accuracy"] >= 0.6
    assert rows[-1]["node_accuracy_min"] <= rows[-1]["centralised_accuracy"] <= rows[-1]["node_accuracy_max"]
    assert rows[-1]["consensus_distance"] < rows[0]["consensus_distance"]
    assert set(rows[-1]["layer_variance"]) == set(summary["initial_layer_variance"])
    # Xavier init (the config's): biases start at 0, so only layers that start spread have a ratio
    assert summary["initial_layer_variance"]["head.bias"] == 0.0
    assert set(summary["layer_variance_ratio"]) == {"body.1.weight", "head.weight"}


def test_resumed_gossip_run_continues_exactly(config):
    cfg = config("rounds=4", "output.checkpoint_every=2", "client.local_steps=3", "partition.scheme=iid")
    path, _ = run_experiment(cfg)
    first = RunDir.open(path).rows()
    (RunDir.open(path).checkpoint_dir / "round-00004.pt").unlink()
    run_experiment(cfg, resume=path)
    again = RunDir.open(path).rows()
    # bytes included: the nodes get their checkpointed models back, nothing is resent
    assert [{k: v for k, v in r.items() if k != "wall_time_s"} for r in again] == \
        [{k: v for k, v in r.items() if k != "wall_time_s"} for r in first]


class LosingGrid(InProcessGrid):
    """An in-process grid whose node playing ``pid`` loses its Context state (as a restarted
    worker would) just before its ``message_type`` message of round ``at_round``."""

    def __init__(self, runtime, num_nodes, pid, at_round, message_type):
        super().__init__(runtime, num_nodes)
        self.pid, self.at_round, self.message_type = pid, at_round, message_type

    def push_messages(self, messages):
        messages = list(messages)
        for msg in messages:
            if (msg.metadata.message_type == self.message_type and self.partition_of(msg) == self.pid
                    and msg.content["config"]["server-round"] == self.at_round):
                self.client_state(self.pid).clear()
        return super().push_messages(messages)


def _run_real(cfg, grid_factory=InProcessGrid):
    """Run the gossip loop in-process with fedsim's ClientApp; return rows, mirrors, grid."""
    run = RunDir.create(cfg)
    grid = grid_factory(ClientRuntime(cfg), cfg.partition.num_clients)
    run_gossip(grid, cfg, run, resume=False, show_progress=False)
    return run.rows(), run.latest_checkpoint().strategy["node_models"], grid


def _held(grid, spec):
    """What each node keeps in its Context: its flat model and that model's version."""
    states = [grid.client_state(pid) for pid in range(grid.num_partitions)]
    return (torch.stack([spec.flatten(s[gossip_node.MODEL_KEY].to_torch_state_dict()) for s in states]),
            [s[gossip_node.VERSION_KEY]["version"] for s in states])


@pytest.mark.parametrize("uplink", [[], ["quant.uplink.codec=topk", "quant.uplink.fraction=0.1",
                                         "quant.uplink.error_feedback=ef"]])
def test_nodes_keep_their_models_in_their_client_state(config, uplink):
    cfg = config("rounds=3", "client.local_steps=2", *uplink)
    rows, mirrors, grid = _run_real(cfg)
    spec = ParamSpec.of(make_model(cfg.model, federated_data(cfg).train, cfg.seed))
    held, versions = _held(grid, spec)
    torch.testing.assert_close(held, mirrors, rtol=0, atol=1e-6)  # the server mirrors them exactly
    assert versions == ["3/mix"] * 8
    # traffic: the models go down once, in round 1; then only the 4 neighbours' models
    mix_down = 8 * 4 * 4 * spec.dim
    down = [b - a for a, b in zip([0] + [r["bytes_down_total"] for r in rows], [r["bytes_down_total"] for r in rows])]
    assert down == [8 * 4 * spec.dim + mix_down, mix_down, mix_down]


@pytest.mark.parametrize(("step", "failed", "ok", "expected"), [
    ("train.gossip", "failures", "num_mix_failed", "2/mix"),  # then it mixes its round-2 model, resent
    ("train.mix", "mix_failures", "num_failed", "3/train"),  # then it trains its round-3 model, resent
])
def test_a_node_that_lost_its_state_refuses_is_resent_its_model_and_rejoins(config, step, failed, ok, expected):
    cfg = config("rounds=4", "client.local_steps=2")
    spec = ParamSpec.of(make_model(cfg.model, federated_data(cfg).train, cfg.seed))
    rows, mirrors, grid = _run_real(cfg, lambda app, n: LosingGrid(app, n, pid=5, at_round=3, message_type=step))
    assert [len(r[failed]) for r in rows] == [0, 0, 1, 0]
    assert rows[2][failed][0] == {"client": 5, "reason": "client error: RuntimeError: gossip node holds no model; "
                                                         f"the server expects version {expected}"}
    assert all(r[ok] == 0 for r in rows)
    held, versions = _held(grid, spec)
    torch.testing.assert_close(held, mirrors, rtol=0, atol=1e-6)
    assert versions == ["4/mix"] * 8


def test_a_node_adopts_a_resent_model_and_refuses_a_stale_one(config):
    cfg = config()
    spec = ParamSpec.of(net := make_model(cfg.model, federated_data(cfg).train, cfg.seed))
    state = PartitionState(RecordDict(), 0)
    config_record = ConfigRecord({"server-round": 3, "partition-id": 0, "gossip-version": "2/mix"})
    resent = RecordDict({"config": config_record, "arrays": ArrayRecord(net.state_dict())})
    torch.testing.assert_close(spec.flatten(gossip_node.held_model(resent, state)), spec.flatten(net.state_dict()))
    bare = RecordDict({"config": config_record})
    with pytest.raises(RuntimeError, match="holds no model; the server expects version 2/mix"):
        gossip_node.held_model(bare, state)
    gossip_node.keep_model(state, net.state_dict(), gossip_node.version(1, "mix"))
    with pytest.raises(RuntimeError, match="holds model version 1/mix; the server expects 2/mix"):
        gossip_node.held_model(bare, state)
    gossip_node.keep_model(state, net.state_dict(), gossip_node.version(2, "mix"))
    torch.testing.assert_close(spec.flatten(gossip_node.held_model(bare, state)), spec.flatten(net.state_dict()))


def test_gossip_nodes_keep_their_state_on_flowers_ray_engine(config):
    """Under Ray each node's Context lives in the simulation engine between messages: no
    node is ever refused for a missing model, and the run equals the in-process one."""
    cfg = config("rounds=3", "partition.num_clients=6", "strategy.degree=2", "client.local_steps=2",
                 "sim.backend=ray")
    path, summary = run_experiment(cfg)
    rows = RunDir.open(path).rows()
    assert summary["status"] == "completed"
    assert all(r["num_failed"] == 0 and r["num_mix_failed"] == 0 for r in rows)
    _, local = run_experiment(cfg.model_copy(update={"sim": cfg.sim.model_copy(update={"backend": "inprocess"})}))
    assert summary["final_accuracy"] == local["final_accuracy"]
    assert summary["final_consensus_distance"] == local["final_consensus_distance"]


def test_variance_drift_skips_layers_that_start_or_end_constant():
    # BatchNorm statistics and zero biases start at variance 0 (ResNet-8 has both): no ratio,
    # no division by zero; a weight layer that collapses to a constant has no finite log
    initial = {"conv.weight": 0.04, "bn.running_var": 0.0, "fc.weight": 0.01, "fc.bias": 0.0}
    final = {"conv.weight": 0.01, "bn.running_var": 0.002, "fc.weight": 0.0, "fc.bias": 0.003}
    drift = variance_drift(initial, final, ["conv.weight", "fc.weight"])
    assert drift["layer_variance_ratio"] == {"conv.weight": 0.25, "fc.weight": 0.0}
    assert drift["layer_variance_log_drift"] == pytest.approx(math.log(4))
    assert variance_drift({"w": 0.0}, {"w": 1.0}, ["w"])["layer_variance_log_drift"] is None

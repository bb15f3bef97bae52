"""The gossip loop: consensus without training, variance correction, end-to-end training."""

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedsim.config import load_config
from fedsim.params import ParamSpec
from fedsim.quant.codecs import build as build_codec
from fedsim.sim.components import federated_data, make_model
from fedsim.sim.gossip_loop import build_topology, gossip_step, initial_models, mixing_weights, run_gossip
from fedsim.sim.inprocess import InProcessGrid
from fedsim.sim.results import RunDir
from fedsim.sim.runner import run_experiment
from fedsim.sim.topology import neighbours
from fedsim.strategies.gossip import variance_corrected_average

ROOT = Path(__file__).parents[2]
GOSSIP = ROOT / "configs" / "gossip.yaml"
SMALL = ["partition.num_clients=8", "strategy.degree=4", "model.name=mlp", "output.plots=false", "eval.every=1"]


@pytest.fixture
def config(tmp_path):
    def make(*overrides: str):
        return load_config(GOSSIP, [f"output.dir={tmp_path / 'runs'}", *SMALL, *overrides])

    return make


def idle_client_app(dim: int) -> ClientApp:
    """A ClientApp whose nodes never change their model (a zero update every round)."""
    app = ClientApp()
    payload = build_codec("identity").encode(torch.zeros(dim)).to_arrays()

    @app.train()
    def train(message: Message, context) -> Message:
        arrays = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in payload.items()})
        metrics = MetricRecord({"num-examples": 1, "train_loss": 0.0})
        return Message(content=RecordDict({"update": arrays, "metrics": metrics}), reply_to=message)

    @app.query()
    def query(message: Message, context) -> Message:
        metrics = MetricRecord({"partition-id": int(context.node_config["partition-id"])})
        return Message(content=RecordDict({"metrics": metrics}), reply_to=message)

    return app


def _run_idle(cfg):
    """Run the gossip loop with nodes that do not train; return the run and the initial models."""
    data = federated_data(cfg)
    spec = ParamSpec.of(make_model(cfg.model, data.train, cfg.seed))
    run = RunDir.create(cfg)
    grid = InProcessGrid(idle_client_app(spec.dim), cfg.partition.num_clients)
    summary = run_gossip(grid, cfg, run, resume=False, show_progress=False)
    return run, summary, initial_models(cfg, data.train, spec)


def test_plain_gossip_without_training_reaches_consensus_at_the_mean(config):
    cfg = config("rounds=40", "strategy.variance_correction=false", "eval.every=40")
    run, summary, start = _run_idle(cfg)
    final = run.latest_checkpoint().strategy["node_models"]
    assert summary["final_consensus_distance"] < 1e-6 * float(((start - start.mean(0)) ** 2).sum())
    torch.testing.assert_close(final, start.mean(0).expand_as(final), atol=1e-4, rtol=0)
    assert run.rows()[-1]["node_accuracy_std"] == 0.0  # every node now predicts alike


def test_variance_correction_keeps_layer_variance_that_plain_gossip_loses(config):
    plain = _run_idle(config("rounds=5", "strategy.variance_correction=false"))[1]
    corrected = _run_idle(config("rounds=5", "strategy.variance_correction=true"))[1]
    exact = _run_idle(config("rounds=5", "strategy.variance_correction=true", "strategy.eps=1e-12"))[1]
    weights = ["body.1.weight", "head.weight"]  # the MLP's weight matrices; biases mix plainly
    assert max(plain["layer_variance_ratio"].values()) < 0.5
    # the eps guard still shrinks the variance by var / (var + eps) per step; without it, exact
    for layer in weights:
        assert corrected["layer_variance_ratio"][layer] > 1.5 * plain["layer_variance_ratio"][layer]
        assert exact["layer_variance_ratio"][layer] == pytest.approx(1.0, abs=1e-3)
    assert exact["layer_variance_ratio"]["head.bias"] == pytest.approx(plain["layer_variance_ratio"]["head.bias"])
    assert exact["layer_variance_log_drift"] < corrected["layer_variance_log_drift"] < plain["layer_variance_log_drift"]


def test_half_rule_step_with_correction_is_the_variance_corrected_average():
    topology = build_topology(load_config(GOSSIP).strategy, 12, seed=0)
    peers = neighbours(topology)
    layers = [torch.randn(12, 5, 3), torch.randn(12, 7)]
    ours = gossip_step(layers, mixing_weights(topology, 0, "half"), peers, correct=[True, True])
    for a, b in zip(ours, variance_corrected_average(layers, peers), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("topology", ["ring", "torus", "regular", "erdos_renyi", "full", "exponential"])
def test_every_configured_topology_builds_with_its_mixing_rule(config, topology):
    strategy = config("partition.num_clients=16", f"strategy.topology={topology}", "strategy.degree=4").strategy
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


def test_resumed_gossip_run_continues_exactly(config):
    cfg = config("rounds=4", "output.checkpoint_every=2", "client.local_steps=3", "partition.scheme=iid")
    path, _ = run_experiment(cfg)
    rows = [{k: v for k, v in r.items() if k != "wall_time_s"} for r in RunDir.open(path).rows()]
    (RunDir.open(path).checkpoint_dir / "round-00004.pt").unlink()
    run_experiment(cfg, resume=path)
    assert [{k: v for k, v in r.items() if k != "wall_time_s"} for r in RunDir.open(path).rows()] == rows

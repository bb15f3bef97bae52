"""Hierarchical FL in whole runs: one edge round with every client always with one gateway and
sample weights is flat FedAvg; an interrupted run under moving association resumes to the
uninterrupted numbers; any synchronous aggregator runs at either tier; refusals at validate."""

from pathlib import Path

import pytest
import torch

from fedsim.config import ConfigError, load_config
from fedsim.outputs.results import RunDir
from fedsim.runner import run_experiment

QUICKSTART = Path(__file__).parents[2] / "configs" / "quickstart.yaml"
SMALL = ("partition.num_clients=6", "output.plots=false", "eval.federated=false", "client.local_steps=3",
         "sim.backend=inprocess")
ORBITS = ("hierarchy.num_edges=3", "hierarchy.edge_rounds=2", "hierarchy.association=orbits",
          "hierarchy.orbit_period=5", "hierarchy.contact_width=0.25", "hierarchy.weighting=semspacefl")
SKIP = {"wall_time_s", "edge_weights"}


def _rows(path, skip=("wall_time_s",)):
    return [{k: v for k, v in row.items() if k not in skip} for row in RunDir.open(path).rows()]


def test_one_edge_round_full_association_and_sample_weights_give_flat_fedavg(tmp_path):
    flat = load_config(QUICKSTART, [f"output.dir={tmp_path / 'flat'}", *SMALL, "rounds=3"])
    tiered = load_config(QUICKSTART, [f"output.dir={tmp_path / 'tiers'}", *SMALL, "rounds=3", "hierarchy.num_edges=3"])
    flat_path, _ = run_experiment(flat)
    tiered_path, _ = run_experiment(tiered)
    for a, b in zip(_rows(flat_path), _rows(tiered_path, SKIP), strict=True):
        assert a["centralised_accuracy"] == b["centralised_accuracy"]
        assert a["centralised_loss"] == pytest.approx(b["centralised_loss"], rel=1e-6)
        assert (a["num_success"], a["bytes_up"], a["bytes_down"]) == (b["num_success"], b["bytes_up"], b["bytes_down"])
    for name, value in RunDir.open(flat_path).latest_checkpoint().model.items():
        torch.testing.assert_close(RunDir.open(tiered_path).latest_checkpoint().model[name], value, rtol=1e-6,
                                   atol=1e-7)


def test_a_hierarchical_run_resumed_from_a_checkpoint_ends_exactly_like_an_uninterrupted_one(tmp_path):
    cfg = load_config(QUICKSTART, [f"output.dir={tmp_path}", *SMALL, *ORBITS, "rounds=4", "output.checkpoint_every=2",
                                   "strategy.fraction_train=0.5", "strategy.server_opt.name=momentum"])
    reference, _ = run_experiment(cfg)
    interrupted, _ = run_experiment(cfg)
    run = RunDir.open(interrupted)
    (run.checkpoint_dir / "round-00004.pt").unlink()  # as if killed during round 3
    assert run.latest_checkpoint().round == 2
    run_experiment(cfg, resume=interrupted)
    assert _rows(interrupted) == _rows(reference)
    weights = [row["edge_weights"] for row in _rows(reference)]
    assert len({tuple(w) for w in weights}) > 1  # the association moved between rounds


@pytest.mark.parametrize(("edge", "cloud"), [("median", "fedavg"), ("fedavg", "median"), ("fedprox", "trimmed_mean"),
                                           ("scaffold", "fedau")])
def test_any_synchronous_aggregator_runs_at_either_tier(tmp_path, edge, cloud):
    cfg = load_config(QUICKSTART, [f"output.dir={tmp_path}", *SMALL, *ORBITS, "rounds=2", f"strategy.name={edge}",
                                   f"hierarchy.cloud={cloud}"])
    path, summary = run_experiment(cfg)
    assert summary["rounds_completed"] == 2 and 0.0 < summary["final_accuracy"] <= 1.0


@pytest.mark.parametrize(("sets", "message"), [
    (["hierarchy.num_edges=2", "strategy.name=fedbuff"],
     "hierarchy: gateways run rounds of a synchronous strategy; strategy.name is 'fedbuff'"),
    (["hierarchy.num_edges=20"], "hierarchy.num_edges: 20 gateways, but partition.num_clients 10"),
    (["hierarchy.orbit_period=3"], "hierarchy.orbit_period: 3.0 is not read under hierarchy.association 'static'"),
    (["hierarchy.cloud=scaffold"], "hierarchy.cloud: scaffold needs its clients' own training"),
    (["hierarchy.cloud=fedavgg"], "hierarchy.cloud: 'fedavgg' is not an algorithm"),
    (["hierarchy.num_edges=2", "quant.uplink.codec=topk", "quant.uplink.fraction=0.1",
      "quant.uplink.error_feedback=ef21"], "quant.uplink.error_feedback: ef21 keeps one server estimate per client"),
    (["hierarchy.weighting=trajectory"], "hierarchy.weighting: Input should be 'samples' or 'semspacefl'"),
])
def test_combinations_that_cannot_work_are_refused_in_one_line(sets, message):
    with pytest.raises(ConfigError) as err:
        load_config(QUICKSTART, sets)
    assert any(message in line for line in str(err.value).splitlines()), str(err.value)


def test_semspacefl_weighting_changes_the_run_where_the_association_moves(tmp_path):
    paths = {}
    for weighting in ("samples", "semspacefl"):
        cfg = load_config(QUICKSTART, [f"output.dir={tmp_path / weighting}", *SMALL, *ORBITS, "rounds=1",
                                       f"hierarchy.weighting={weighting}"])
        paths[weighting], _ = run_experiment(cfg)
    samples, semspacefl = (_rows(paths[w])[0] for w in ("samples", "semspacefl"))
    assert samples["edge_weights"] != semspacefl["edge_weights"]
    assert samples["centralised_loss"] != semspacefl["centralised_loss"]

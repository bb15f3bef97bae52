"""`fedsim run configs/quickstart.yaml --set strategy.name=feddyn --set strategy.alpha=0.01`
on every backend: in-process (through the CLI), batched (the clients trained stacked, to the
numbers of one at a time), Ray nodes serving two clients each, and a deployment of real
Flower SuperNodes on 127.0.0.1 (the plug-in found by the `fedsim clientapp` processes
through its entry point)."""

from pathlib import Path

import fedsim_feddyn
import pytest
import torch
from typer.testing import CliRunner

from fedsim.cli import app
from fedsim.config import load_config
from fedsim.loopback import LoopbackDeployment
from fedsim.outputs.results import Checkpoint, RunDir
from fedsim.records import to_state_dict
from fedsim.runner import run_experiment

QUICKSTART = Path(__file__).parents[3] / "configs" / "quickstart.yaml"
FEDDYN = ("strategy.name=feddyn", "strategy.alpha=0.01")
SMALL = (*FEDDYN, "rounds=3", "output.plots=false", "eval.federated=false", "output.checkpoint_every=3")


def _run(tmp_path, name: str, *overrides: str) -> Path:
    path, summary = run_experiment(load_config(QUICKSTART, [f"output.dir={tmp_path / name}", *SMALL, *overrides]))
    assert summary["status"] == "completed"
    return path


def _final(path: Path) -> tuple[RunDir, Checkpoint]:
    run = RunDir.open(path)
    return run, run.latest_checkpoint()


def _assert_same_state(got: Path, want: Path, atol: float) -> None:
    """The same server model and h, and the same h_i in every client."""
    (run_a, a), (run_b, b) = _final(got), _final(want)
    for name, value in b.model.items():
        torch.testing.assert_close(a.model[name], value, atol=atol, rtol=0)
    torch.testing.assert_close(a.strategy["feddyn_h"], b.strategy["feddyn_h"], atol=atol, rtol=0)
    assert sorted(a.clients) == sorted(b.clients) == list(range(10))
    for pid in b.clients:
        want_h = to_state_dict(run_b.client_state(b, pid)[fedsim_feddyn.GRADIENT_STATE_KEY])
        got_h = to_state_dict(run_a.client_state(a, pid)[fedsim_feddyn.GRADIENT_STATE_KEY])
        for name, value in want_h.items():
            torch.testing.assert_close(got_h[name], value, atol=atol, rtol=0)


def test_feddyn_runs_in_process_from_the_cli_and_learns(tmp_path):
    sets = [*FEDDYN, "rounds=3", "sim.backend=inprocess", f"output.dir={tmp_path}", "output.plots=false"]
    result = CliRunner().invoke(app, ["run", str(QUICKSTART), "--no-progress",
                                      *[arg for s in sets for arg in ("--set", s)]])
    assert result.exit_code == 0, result.output
    [path] = list(tmp_path.iterdir())
    run = RunDir.open(path)
    assert run.summary()["final_accuracy"] >= 0.85  # FedAvg: about 0.9 after 3 rounds
    ckpt = run.latest_checkpoint()
    assert ckpt.strategy["feddyn_h"].abs().max() > 0
    assert all(fedsim_feddyn.GRADIENT_STATE_KEY in run.client_state(ckpt, pid) for pid in range(10))


def test_batched_trains_the_clients_stacked_to_the_numbers_of_one_at_a_time(tmp_path, monkeypatch):
    calls = {"stacked": 0, "one": 0}
    stacked, one = fedsim_feddyn.DynamicRegulariser.stacked_extra_loss, fedsim_feddyn.DynamicRegulariser.extra_loss

    def count(kind, method):
        def counted(self, *args):
            calls[kind] += 1
            return method(self, *args)
        return counted

    monkeypatch.setattr(fedsim_feddyn.DynamicRegulariser, "stacked_extra_loss", count("stacked", stacked))
    monkeypatch.setattr(fedsim_feddyn.DynamicRegulariser, "extra_loss", count("one", one))
    batched = _run(tmp_path, "batched", "sim.backend=batched")
    assert calls["stacked"] > 0 and calls["one"] == 0  # every client of a round in one stack
    one_at_a_time = _run(tmp_path, "inprocess", "sim.backend=inprocess")
    assert calls["one"] > 0
    # Dirichlet sizes: clients leave the stack as their local steps run out (the rows shrink)
    _assert_same_state(batched, one_at_a_time, atol=1e-5)


def test_ray_nodes_serving_two_clients_each_compute_the_in_process_numbers(tmp_path):
    on_ray = _run(tmp_path, "ray", "sim.backend=ray", "sim.clients_per_node=2")
    in_process = _run(tmp_path, "inprocess", "sim.backend=inprocess")
    rows = RunDir.open(on_ray).rows()
    assert [r["num_success"] for r in rows] == [10, 10, 10]
    # grouped nodes train their two clients stacked: equal up to float rounding
    _assert_same_state(on_ray, in_process, atol=1e-5)


@pytest.mark.xdist_group("deployment")  # beside fedsim's own deployments, one at a time
def test_feddyn_runs_on_real_supernodes_with_the_simulations_numbers(tmp_path):
    overrides = [*SMALL, "partition.num_clients=3", "rounds=2"]
    home = tmp_path / "flwr-home"
    home.mkdir()
    with LoopbackDeployment(home, num_nodes=3) as dep:
        dep.cache_partitions(QUICKSTART, overrides)
        result = dep.deploy(QUICKSTART, overrides, tmp_path / "deployed")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    [path] = list((tmp_path / "deployed").iterdir())
    deployed = RunDir.open(path)
    assert deployed.summary()["status"] == "completed"
    simulated, _ = run_experiment(load_config(QUICKSTART, [*overrides, "sim.backend=inprocess",
                                                           f"output.dir={tmp_path / 'sim'}"]))

    def rows(run):
        return [{k: v for k, v in r.items() if k != "wall_time_s"} for r in run.rows()]

    assert rows(deployed) == rows(RunDir.open(simulated))
    assert all(r["num_success"] == 3 for r in deployed.rows())

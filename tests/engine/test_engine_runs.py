"""End-to-end runs on Flower's simulation engine (Ray backend).

Each run starts Ray and the client actors, so these tests are the slow part of the suite;
they are few and each checks several things of one run.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedsim.outputs.results import RunDir
from fedsim.runner import run_experiment

ROOT = Path(__file__).parents[2]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"


def _accuracies(path):
    return [r["centralised_accuracy"] for r in RunDir.open(path).rows()]


def test_fedavg_learns_digits_on_ray_with_the_in_process_numbers(small_config):
    cfg = small_config("rounds=8")
    path_a, summary = run_experiment(cfg)
    run = RunDir.open(path_a)
    rows = run.rows()
    assert [r["round"] for r in rows] == list(range(1, 9))
    assert summary["status"] == "completed"
    assert summary["final_accuracy"] >= 0.85
    assert rows[-1]["federated_accuracy"] >= 0.8
    assert all(r["num_success"] == 10 and r["num_failed"] == 0 for r in rows)
    assert rows[-1]["bytes_up_total"] > 0 and rows[-1]["bytes_down_total"] > 0
    assert (run.plot_dir / "accuracy.png").stat().st_size > 0 and (run.plot_dir / "loss.png").exists()
    assert sorted(p.name for p in run.checkpoint_dir.iterdir()) == ["round-00005.pt", "round-00008.pt"]
    assert json.loads(run.summary_path.read_text())["rounds_completed"] == 8
    # the in-process backend computes the same run (two Ray runs of one config: test_resume_client_state)
    path_c, _ = run_experiment(cfg.model_copy(update={"sim": cfg.sim.model_copy(update={"backend": "inprocess"})}))
    assert _accuracies(path_c) == _accuracies(path_a)


def test_fedprox_trains_with_the_proximal_term(small_config):
    _, summary = run_experiment(small_config("rounds=4", "strategy.name=fedprox", "strategy.mu=0.1"))
    assert summary["final_accuracy"] >= 0.7


@pytest.mark.parametrize("per_node", [1, 3], ids=["one-client-per-node", "three-clients-per-node"])
def test_failed_clients_are_counted_and_the_run_goes_on(small_config, per_node):
    cfg = small_config(
        "rounds=3", "partition.num_clients=6", "faults.crash=[1]", "faults.nan=[2]",
        "faults.wrong_shape=[3]", "faults.slow=[4]", "faults.slow_s=60", "client.timeout_s=10",
        "eval.federated=false", f"sim.clients_per_node={per_node}",
    )
    path, summary = run_experiment(cfg)
    rows = RunDir.open(path).rows()
    assert summary["status"] == "completed" and len(rows) == 3
    first = rows[0]
    reasons = {f["client"]: f["reason"] for f in first["failures"]}
    assert "crashed" in reasons[1]
    assert "NaN" in reasons[2]
    assert "shape" in reasons[3]
    assert reasons[4] == "no reply before the timeout"
    assert first["num_success"] == 2 and first["num_failed"] == 4  # a client's failure is its own
    assert summary["final_accuracy"] > 0.3  # clients 0 and 5 still train the model
    # grouped nodes train their clients stacked: the batched backend's numbers
    batched = cfg.model_copy(update={"sim": cfg.sim.model_copy(update={"backend": "batched", "clients_per_node": 1})})
    path_b, _ = run_experiment(batched)
    for ray_row, batched_row in zip(rows, RunDir.open(path_b).rows(), strict=True):
        assert abs(ray_row["centralised_accuracy"] - batched_row["centralised_accuracy"]) <= 0.01
        assert ray_row["failures"] == batched_row["failures"]


def test_round_is_skipped_below_the_minimum_of_successful_clients(small_config, monkeypatch):
    # a cluster address left in the environment by another program: fedsim starts its own Ray
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:9")
    cfg = small_config("rounds=2", "partition.num_clients=4", "faults.crash=[0, 1, 2]",
                       "faults.rounds=[1]", "strategy.min_successful=2", "eval.federated=false")
    path, _ = run_experiment(cfg)
    rows = RunDir.open(path).rows()
    assert rows[0]["skipped"] is True and rows[0]["num_success"] == 1
    assert rows[1]["skipped"] is False and rows[1]["num_success"] == 4


def test_killed_run_resumes_to_the_same_final_accuracy(small_config, tmp_path):
    cfg = small_config("rounds=6", "output.checkpoint_every=2", "eval.federated=false")
    # the uninterrupted reference in-process (the same numbers as on Ray); the killed run on Ray
    reference, summary = run_experiment(cfg.model_copy(update={"sim": cfg.sim.model_copy(update={"backend": "inprocess"})}))
    config_file = tmp_path / "resume.yaml"
    config_file.write_text(cfg.model_copy(update={"name": "killed"}).to_yaml())
    fedsim = [sys.executable, "-m", "fedsim.cli"]
    proc = subprocess.Popen([*fedsim, "run", str(config_file), "--no-progress"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    runs = tmp_path / "runs"
    deadline = time.monotonic() + 180
    killed_dir = None
    while time.monotonic() < deadline and proc.poll() is None:
        dirs = list(runs.glob("killed-*"))
        if dirs and (dirs[0] / "checkpoints" / "round-00002.pt").exists():
            killed_dir = dirs[0]
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait(timeout=30)
    assert killed_dir is not None, "the run finished or stalled before it could be killed"
    assert len(RunDir.open(killed_dir).rows()) < 6
    done = subprocess.run([*fedsim, "run", "--resume", str(killed_dir), "--no-progress"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    resumed = RunDir.open(killed_dir)
    assert [r["round"] for r in resumed.rows()] == list(range(1, 7))
    assert resumed.summary()["final_accuracy"] == summary["final_accuracy"]
    assert _accuracies(killed_dir) == _accuracies(reference)


@pytest.mark.parametrize("args, message", [
    (["validate", str(QUICKSTART), "--set", "partition.nmu_clients=5"], "partition.nmu_clients: unknown key"),
    (["run", str(QUICKSTART), "--set", "strategy.name=fedavgg"], "'fedavgg' is not an algorithm; known: fedasync, fedau, fedavg"),
])
def test_cli_stops_on_a_bad_config_with_a_message_naming_it(args, message):
    from typer.testing import CliRunner

    from fedsim.cli import app

    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())

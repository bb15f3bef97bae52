"""Deployment on loopback: a real Flower SuperLink and three SuperNodes, each its own process,
talking over 127.0.0.1, and experiments submitted with ``fedsim deploy``.

This is what ``docker/compose.yaml`` runs, without Docker: the same commands, the same app
(``fedsim.loopback``). The SuperNodes run with ``--isolation process`` beside a long-lived
``fedsim clientapp`` process each, except in the TLS test, which runs Flower's default (a
``flwr-clientapp`` process per message).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fedsim.config import ConfigError, load_config
from fedsim.credentials import make_tls
from fedsim.deploy import experiment_config
from fedsim.loopback import LoopbackDeployment
from fedsim.sim.results import RunDir
from fedsim.sim.runner import run_experiment

ROOT = Path(__file__).parents[2]
BIN = Path(sys.executable).parent
NUM_NODES = 3


def run_deployed(dep: LoopbackDeployment, config: Path, overrides: list[str], out: Path) -> RunDir:
    """``fedsim deploy`` an experiment on ``dep``, wait for it to end, return its run."""
    result = dep.deploy(config, overrides, out)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    [path] = list(out.iterdir())
    return RunDir.open(path)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    with LoopbackDeployment(tmp_path_factory.mktemp("flwr-home"), NUM_NODES) as dep:
        yield dep


def _simulated(config: Path, overrides: list[str], out: Path) -> list[dict]:
    path, _ = run_experiment(load_config(config, [*overrides, "sim.backend=inprocess", f"output.dir={out}"]))
    return RunDir.open(path).rows()


def _without(rows: list[dict], *keys: str) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in keys} for r in rows]


def test_fedavg_on_real_supernodes_equals_the_simulation(deployment, tmp_path):
    config = ROOT / "configs" / "quickstart.yaml"
    overrides = [f"partition.num_clients={NUM_NODES}", "rounds=2", "eval.federated=false", "output.plots=false"]
    run = run_deployed(deployment, config, overrides, tmp_path / "deployed")
    assert run.summary()["status"] == "completed"
    assert _without(run.rows(), "wall_time_s") == _without(_simulated(config, overrides, tmp_path / "sim"),
                                                            "wall_time_s")


def test_gossip_nodes_keep_their_models_on_real_supernodes(deployment, tmp_path):
    config = ROOT / "configs" / "gossip.yaml"
    overrides = [f"partition.num_clients={NUM_NODES}", "strategy.degree=2", "model.name=mlp", "rounds=2",
                 "client.local_steps=2", "output.plots=false"]
    rows = run_deployed(deployment, config, overrides, tmp_path / "deployed").rows()
    # a node that had lost its model would have been refused (num_failed) and resent it
    assert all(r["num_failed"] == 0 and r["num_mix_failed"] == 0 for r in rows)
    assert _without(rows, "wall_time_s") == _without(_simulated(config, overrides, tmp_path / "sim"), "wall_time_s")


def test_asynchronous_fedbuff_runs_on_the_wall_clock(deployment, tmp_path):
    overrides = [f"partition.num_clients={NUM_NODES}", "sim.clock=wall", "output.plots=false",
                 "strategy={name: fedbuff, buffer_size: 1, horizon: 40, eval_every: 20}"]
    run = run_deployed(deployment, ROOT / "configs" / "fedfix.yaml", overrides, tmp_path / "deployed")
    rows, summary = run.rows(), run.summary()
    assert summary["status"] == "completed"
    assert [r["virtual_time"] for r in rows] == [20, 40]  # seconds, on this clock
    # the loop waited for real time: each row is written when its time has come
    assert [r["wall_time_s"] for r in rows] == pytest.approx([20, 40], abs=2)
    assert summary["model_updates"] == rows[-1]["model_version"] >= 1
    assert sum(r["num_success"] for r in rows) >= 1 and all(r["num_failed"] == 0 for r in rows)


def test_the_run_config_carries_the_whole_experiment_and_bad_ones_are_refused():
    fedfix = ROOT / "configs" / "fedfix.yaml"
    wall = load_config(fedfix, ["sim.clock=wall", "seed=7"])
    assert experiment_config({"experiment": wall.model_dump_json()}) == wall
    with pytest.raises(ConfigError, match="need sim.clock=wall"):
        experiment_config({"experiment": load_config(fedfix).model_dump_json()})
    with pytest.raises(ConfigError, match="submit the run with `fedsim deploy`"):
        experiment_config({})
    with pytest.raises(ConfigError, match="not a valid fedsim config"):
        experiment_config({"experiment": '{"rounds": 0}'})


def test_deploy_refuses_a_virtual_clock_async_run_before_submitting_it():
    result = subprocess.run([str(BIN / "fedsim"), "deploy", str(ROOT / "configs" / "fedfix.yaml"),
                             "--superlink", "127.0.0.1:9"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "deployed asynchronous runs need sim.clock=wall" in result.stdout


def test_compose_file_runs_the_tested_commands_one_partition_per_supernode():
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())["services"]
    superlink = compose.pop("superlink")["command"]
    assert superlink[0] == "flower-superlink" and "--disable-runtime-dependency-installation" in superlink
    node_configs = [dict(kv.split("=") for kv in s["command"][s["command"].index("--node-config") + 1].split())
                    for s in compose.values()]
    assert sorted(int(c["partition-id"]) for c in node_configs) == list(range(len(compose)))
    assert {int(c["num-partitions"]) for c in node_configs} == {len(compose)}
    assert "pip install --no-cache-dir ." in (ROOT / "docker" / "Dockerfile").read_text()


def test_a_run_over_tls_completes_and_an_insecure_client_is_refused(tmp_path_factory, tmp_path):
    """Flower's default SuperNode (a flwr-clientapp process per message), over TLS."""
    home = tmp_path_factory.mktemp("flwr-tls")
    with LoopbackDeployment(home, num_nodes=1, tls=make_tls(home / "tls", ["127.0.0.1"]),
                            isolation="subprocess") as dep:
        config, overrides = ROOT / "configs" / "quickstart.yaml", ["partition.num_clients=1", "rounds=1",
                                                                  "eval.federated=false", "output.plots=false"]
        insecure = dep.deploy(config, overrides, tmp_path / "insecure", secure=False)
        assert insecure.returncode != 0 and "unavailable" in insecure.stdout + insecure.stderr
        run = run_deployed(dep, config, overrides, tmp_path / "tls")
        assert run.summary()["status"] == "completed" and run.summary()["final_accuracy"] > 0.5

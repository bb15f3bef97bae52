"""Deployment on loopback: a real Flower SuperLink and three SuperNodes, each its own process,
talking over 127.0.0.1, and experiments submitted with ``fedsim deploy``.

This is what ``docker/compose.yaml`` runs, without Docker: the same commands, the same app
(``fedsim.loopback``). The SuperNodes (``fedsim supernode``) run with ``--isolation
process`` beside a long-lived ``fedsim clientapp`` process each, except in one test of
Flower's default (``flower-supernode``, a ``flwr-clientapp`` process per message). The
last test kills a SuperNode of the shared deployment and restarts it. TLS is tested with
SuperNode authentication (test_deploy_auth.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fedsim.config import ConfigError, load_config
from fedsim.deploy import experiment_config
from fedsim.loopback import LoopbackDeployment
from fedsim.outputs.results import RunDir
from fedsim.runner import run_experiment

ROOT = Path(__file__).parents[2]
BIN = Path(sys.executable).parent
NUM_NODES = 3
ROUNDS, VICTIM = 6, 2  # of the killed-node test


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
    config = ROOT / "configs" / "fedfix.yaml"
    overrides = [f"partition.num_clients={NUM_NODES}", "sim.clock=wall", "output.plots=false",
                 "strategy={name: fedbuff, buffer_size: 1, horizon: 40, eval_every: 20}"]
    # built beforehand, so that the nodes' first updates arrive well inside the horizon on a busy machine
    deployment.cache_partitions(config, overrides)
    run = run_deployed(deployment, config, overrides, tmp_path / "deployed")
    rows, summary = run.rows(), run.summary()
    assert summary["status"] == "completed"
    assert [r["virtual_time"] for r in rows] == [20, 40]  # seconds, on this clock
    # the loop waited for real time (a virtual clock would end in a few seconds); wall_time_s
    # counts from the loop's start, a few seconds after the clock's zero on a busy machine
    assert all(r["wall_time_s"] >= r["virtual_time"] - 10 for r in rows)
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
    assert "deployed asynchronous runs need sim.clock=wall" in result.stderr and result.stdout == ""


def _flag(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


@pytest.mark.parametrize("variant", ["compose.yaml", "compose.host.yaml", "compose.secure.yaml"])
def test_compose_files_run_the_tested_commands_one_partition_per_supernode(variant):
    services = yaml.safe_load((ROOT / "docker" / variant).read_text())["services"]
    superlink = services.pop("superlink")["command"]
    assert superlink[0] == "flower-superlink" and "--disable-runtime-dependency-installation" in superlink
    nodes = {int(k.split("-")[1]): v["command"] for k, v in services.items() if k.startswith("supernode-")}
    apps = {int(k.split("-")[1]): v for k, v in services.items() if k.startswith("clientapp-")}
    assert len(nodes) + len(apps) == len(services) and sorted(nodes) == sorted(apps) == list(range(len(nodes)))
    for i, command in nodes.items():
        config = dict(kv.split("=") for kv in _flag(command, "--node-config").split())
        assert (int(config["partition-id"]), int(config["num-partitions"])) == (i, len(nodes))
        # every message of the node runs in its long-lived ClientApp process, which finds the
        # node's Runtime API on its own loopback (shared network, or the host's)
        assert command[:2] == ["fedsim", "supernode"] and _flag(command, "--isolation") == "process"
        assert apps[i]["command"][:2] == ["fedsim", "clientapp"]
        address = _flag(apps[i]["command"], "--runtime-api-address")
        if apps[i].get("network_mode") == "host":
            assert address == f"127.0.0.1:{_flag(command, '--port')}"
        else:
            assert apps[i]["network_mode"] == f"service:supernode-{i}" and address == "127.0.0.1:9094"
        if variant == "compose.secure.yaml":
            assert _flag(command, "--auth-supernode-private-key") == f"/credentials/supernode-{i}"
    assert ("--enable-supernode-auth" in superlink) == (variant == "compose.secure.yaml")


def test_the_dockerfile_takes_a_base_image_and_installs_offline_from_a_wheel_folder():
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE=python:3.11-slim" in dockerfile and "FROM ${BASE_IMAGE}" in dockerfile
    assert "pip install --no-cache-dir --no-index --find-links /tmp/wheels torch==2.13.0 ." in dockerfile


def test_flowers_default_supernode_runs_the_app_in_a_process_per_message(tmp_path_factory, tmp_path):
    """Flower's SuperNode as Flower ships it (``flower-supernode``, no ``fedsim clientapp``):
    it starts a flwr-clientapp process for every message, and each reads the node's partition
    from the disk cache."""
    config, overrides = ROOT / "configs" / "quickstart.yaml", ["partition.num_clients=1", "rounds=1",
                                                              "eval.federated=false", "output.plots=false"]
    with LoopbackDeployment(tmp_path_factory.mktemp("flwr-subprocess"), num_nodes=1, isolation="subprocess",
                            supernode="flower") as dep:
        dep.cache_partitions(config, overrides)
        run = run_deployed(dep, config, overrides, tmp_path / "deployed")
        assert "Start `flwr-clientapp` process" in dep.log("supernode-0")
    assert run.summary()["status"] == "completed"
    assert _without(run.rows(), "wall_time_s") == _without(_simulated(config, overrides, tmp_path / "sim"),
                                                            "wall_time_s")


# ------------------------------------------------------- a node that fails
def _rows(out: Path) -> list[dict]:
    metrics = list(out.glob("*/metrics.jsonl"))
    return [json.loads(line) for line in metrics[0].read_text().splitlines()] if metrics else []


def _wait_for(condition, out: Path, run: subprocess.Popen, what: str, timeout: float = 600) -> list[dict]:
    deadline = time.monotonic() + timeout
    while not condition(rows := _rows(out)):
        assert run.poll() is None, f"the run ended before {what}: {run.stdout.read()[-2000:]}"
        assert time.monotonic() < deadline, f"no {what} after {timeout:.0f} s"
        time.sleep(0.5)
    return rows


def test_a_killed_supernode_fails_its_rounds_and_serves_its_partition_again_when_restarted(deployment, tmp_path):
    """Last in this module: it kills and restarts a node of the shared deployment."""
    out, config = tmp_path / "runs", ROOT / "configs" / "quickstart.yaml"
    overrides = [f"partition.num_clients={NUM_NODES}", f"rounds={ROUNDS}", "eval.federated=false",
                 "output.plots=false", "client.timeout_s=30"]
    # so that round 1 does not spend the timeout building each node's partition
    deployment.cache_partitions(config, overrides)
    run = subprocess.Popen(deployment.deploy_command(config, overrides, out), cwd=deployment.home,
                           env=deployment.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(lambda rows: len(rows) >= 1, out, run, "round 1")
        deployment.kill_node(VICTIM)
        _wait_for(lambda rows: any(r["num_failed"] for r in rows), out, run, "failed round")
        deployment.start_node(VICTIM)
        assert run.wait(timeout=900) == 0, run.stdout.read()[-2000:]
    finally:
        if run.poll() is None:
            run.kill()
    [path] = list(out.iterdir())
    rows, summary = RunDir.open(path).rows(), RunDir.open(path).summary()
    assert summary["status"] == "completed" and len(rows) == ROUNDS
    assert rows[0]["num_failed"] == 0
    failed = [r for r in rows if r["num_failed"]]
    # while it was down the rounds went on with the other two, and its failures were counted
    assert failed and all(r["failures"] == [{"client": VICTIM, "reason": "no reply before the timeout"}]
                          and r["num_success"] == NUM_NODES - 1 and not r["skipped"] for r in failed)
    assert summary["failed_client_calls"] == len(failed)
    # restarted, it rejoined under a new node id and trained its partition in the last rounds
    assert rows[-1]["num_success"] == NUM_NODES and rows[-1]["num_failed"] == 0
    assert rows.index(failed[-1]) < ROUNDS - 1

"""Secure aggregation on real SuperNodes: a Flower SuperLink and four SuperNodes on
127.0.0.1 run SecAgg+'s steps as messages (:mod:`fedsim.loops.secagg_messages`), and give the
simulation's rows bit for bit (the aggregate, hence the model and its accuracy), with a
SuperNode that drops after sharing its keys recovered, and two refused in one line.

Four nodes: with the complete graph a client has three neighbours, two of whose shares
rebuild its secrets (``secagg.threshold`` 0.5), so one dropout is within the threshold and
two are beyond it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fedsim.config import load_config
from fedsim.loopback import LoopbackDeployment
from fedsim.outputs.results import RunDir
from fedsim.runner import run_experiment

ROOT = Path(__file__).parents[2]
CONFIG = ROOT / "configs" / "quickstart.yaml"
NUM_NODES = 4
SETS = [f"partition.num_clients={NUM_NODES}", "eval.federated=false", "output.plots=false", "client.local_steps=3",
        "secagg.enabled=true"]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    with LoopbackDeployment(tmp_path_factory.mktemp("flwr-home"), NUM_NODES) as dep:
        dep.cache_partitions(CONFIG, SETS)  # built once here, not by every node in round 1
        yield dep


def _rows(path: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "wall_time_s"} for row in RunDir.open(path).rows()]


def _deployed(dep: LoopbackDeployment, overrides: list[str], out: Path) -> tuple[list[dict], str]:
    result = dep.deploy(CONFIG, overrides, out, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    [path] = list(out.iterdir())
    assert RunDir.open(path).summary()["status"] == "completed"
    return _rows(path), result.stdout + result.stderr


def _simulated(overrides: list[str], out: Path) -> list[dict]:
    path, _ = run_experiment(load_config(CONFIG, [*overrides, "sim.backend=inprocess", f"output.dir={out}"]))
    return _rows(path)


def test_secure_aggregation_on_supernodes_equals_the_simulation_and_recovers_a_dropped_node(deployment, tmp_path):
    overrides = [*SETS, "rounds=2", "faults.drop_after_keys=[1]", "faults.rounds=[2]"]
    rows, _ = _deployed(deployment, overrides, tmp_path / "deployed")
    assert [row["secagg_recovered"] for row in rows] == [0, 1] and not any(row["skipped"] for row in rows)
    assert rows[0]["secagg_bytes_per_client"] > 4 * 9610  # the masked uint32 vector and the protocol's keys, shares
    assert rows == _simulated(overrides, tmp_path / "sim")


def test_two_nodes_dropped_after_sharing_refuse_the_round_in_one_line(deployment, tmp_path):
    overrides = [*SETS, "rounds=1", "faults.drop_after_keys=[1,2]"]
    rows, output = _deployed(deployment, overrides, tmp_path / "deployed")
    assert rows[0]["skipped"] and rows[0]["secagg_recovered"] == 0
    assert ("round 1 refused: secure aggregation cannot unmask: client 0 sent its input and 1 of its 3 neighbours "
            "replied; 2 shares rebuild its masks (secagg.threshold 0.5)") in output
    assert rows == _simulated(overrides, tmp_path / "sim")

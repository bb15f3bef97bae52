"""The laptop cluster, on one machine: two Ray nodes (a head and a worker, what ``ray start
--head`` and ``ray start --address`` make on two laptops) and ``fedsim run --ray-address``
attached to them.

The nodes listen on this machine's own address, not 127.0.0.1: Ray replaces 127.0.0.1 in the
address a driver connects to by the machine's address (``resolve_ip_for_localhost``), where
nodes bound to 127.0.0.1 cannot be reached. The traffic stays on this machine either way."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import ray.util
from ray.cluster_utils import Cluster

from fedsim.config import load_config
from fedsim.outputs.results import RunDir
from fedsim.runner import run_experiment

ROOT = Path(__file__).parents[2]
BIN = Path(sys.executable).parent


def _rows(path: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "wall_time_s"} for r in RunDir.open(path).rows()]


def test_a_run_on_a_two_node_cluster_equals_the_single_machine_run_and_trains_on_both_nodes(tmp_path):
    config = ROOT / "configs" / "quickstart.yaml"
    overrides = ["partition.num_clients=4", "rounds=2", "eval.federated=false", "output.plots=false",
                 "sim.num_cpus_per_client=1"]
    # one CPU per node, so that each node hosts one of the two client workers
    address = ray.util.get_node_ip_address()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": address})
    try:
        cluster.add_node(num_cpus=1, node_ip_address=address)
        cluster.wait_for_nodes()
        node_ids = {node.node_id[:12] for node in cluster.list_all_nodes()}
        sets = [a for o in [*overrides, f"output.dir={tmp_path / 'cluster'}"] for a in ("--set", o)]
        result = subprocess.run([str(BIN / "fedsim"), "run", str(config), "--ray-address", cluster.address, *sets,
                                 "--verbose", "--no-progress"], capture_output=True, text=True, timeout=900,
                                env={**os.environ, "COLUMNS": "400"})
    finally:
        cluster.shutdown()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "function is deprecated" not in result.stdout + result.stderr  # Flower's run_simulation notice
    ran_on = set(re.findall(r"trained on Ray node ([0-9a-f]{12})", result.stdout + result.stderr))
    assert len(node_ids) == 2 and ran_on == node_ids
    [clustered] = list((tmp_path / "cluster").iterdir())
    single, _ = run_experiment(load_config(config, [*overrides, "sim.backend=inprocess",
                                                    f"output.dir={tmp_path / 'single'}"]))
    assert _rows(clustered) == _rows(single)

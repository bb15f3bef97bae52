"""A SuperNode killed in the middle of a deployed run, and restarted (loopback)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from fedsim.loopback import LoopbackDeployment
from fedsim.sim.results import RunDir

ROOT = Path(__file__).parents[2]
NUM_NODES, ROUNDS, VICTIM = 3, 6, 2


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


def test_a_killed_supernode_fails_its_rounds_and_serves_its_partition_again_when_restarted(tmp_path_factory,
                                                                                            tmp_path):
    out = tmp_path / "runs"
    overrides = [f"partition.num_clients={NUM_NODES}", f"rounds={ROUNDS}", "eval.federated=false",
                 "output.plots=false", "client.timeout_s=30"]
    with LoopbackDeployment(tmp_path_factory.mktemp("flwr-faults"), NUM_NODES) as dep:
        # so that round 1 does not spend the timeout building each node's partition
        dep.cache_partitions(ROOT / "configs" / "quickstart.yaml", overrides)
        run = subprocess.Popen(dep.deploy_command(ROOT / "configs" / "quickstart.yaml", overrides, out),
                               cwd=dep.home, env=dep.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            _wait_for(lambda rows: len(rows) >= 1, out, run, "round 1")
            dep.kill_node(VICTIM)
            _wait_for(lambda rows: any(r["num_failed"] for r in rows), out, run, "failed round")
            dep.start_node(VICTIM)
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

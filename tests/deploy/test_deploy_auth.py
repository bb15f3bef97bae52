"""SuperNode authentication on loopback: a SuperLink with ``--enable-supernode-auth`` over
TLS (Flower requires TLS for it), SuperNode keys and certificates written and registered
with ``fedsim auth``; ``pytest tests/deploy -k auth`` selects these tests."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from fedsim.config import load_config
from fedsim.credentials import TlsFiles, make_node_key
from fedsim.loopback import LoopbackDeployment
from fedsim.outputs.results import RunDir
from fedsim.runner import run_experiment

ROOT = Path(__file__).parents[2]
BIN = Path(sys.executable).parent
NUM_NODES = 2


def fedsim(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "fedsim"), *args], capture_output=True, text=True, timeout=300)


def test_auth_registered_nodes_run_the_experiment_over_tls_and_an_unregistered_key_is_refused(tmp_path_factory,
                                                                                              tmp_path):
    home = tmp_path_factory.mktemp("flwr-auth")
    creds = home / "credentials"
    made = fedsim("auth", "keys", str(creds), "--nodes", str(NUM_NODES), "--tls-host", "127.0.0.1")
    assert made.returncode == 0, made.stdout + made.stderr
    tls = TlsFiles(creds / "ca.pem", creds / "server.pem", creds / "server.key")
    keys = [creds / f"supernode-{i}" for i in range(NUM_NODES)]
    dep = LoopbackDeployment(home, NUM_NODES, tls=tls, node_keys=keys)
    dep.start_superlink()
    try:
        registered = fedsim("auth", "register", str(creds), "--superlink", dep.address, "--root-certificates",
                            str(tls.ca))
        assert registered.returncode == 0, registered.stdout + registered.stderr
        assert [line.split()[1] for line in registered.stdout.splitlines()] == [f"supernode-{i}.pub"
                                                                              for i in range(NUM_NODES)]
        # an intruder with a key of its own, claiming partition 0 to receive the global model
        intruder_key = home / "intruder" / "key"
        make_node_key(intruder_key)
        intruder = dep.start_extra_node("intruder", 0, intruder_key)
        dep.start_nodes()
        deadline = time.monotonic() + 300
        while "No SuperNode found with the given public key" not in dep.log("superlink"):
            assert time.monotonic() < deadline, "the intruder was never refused"
            time.sleep(0.5)

        config = ROOT / "configs" / "quickstart.yaml"
        overrides = [f"partition.num_clients={NUM_NODES}", "rounds=1", "eval.federated=false", "output.plots=false"]
        insecure = dep.deploy(config, overrides, tmp_path / "insecure", secure=False)
        assert insecure.returncode != 0 and "unavailable" in insecure.stdout + insecure.stderr
        result = dep.deploy(config, overrides, tmp_path / "deployed")
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        [path] = list((tmp_path / "deployed").iterdir())
        rows = RunDir.open(path).rows()
        assert intruder.wait(timeout=300) != 0 and "Failed to activate SuperNode" in dep.log("intruder")
    finally:
        dep.stop()
    sim, _ = run_experiment(load_config(config, [*overrides, "sim.backend=inprocess", f"output.dir={tmp_path / 'sim'}"]))
    drop = ("wall_time_s",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in rows] == \
        [{k: v for k, v in r.items() if k not in drop} for r in RunDir.open(sim).rows()]


def test_auth_keys_refuses_a_bad_node_count_and_register_needs_keys(tmp_path):
    bad = fedsim("auth", "keys", str(tmp_path / "k"), "--nodes", "0")
    assert bad.returncode == 2 and "--nodes: 0 is not a number of SuperNodes" in " ".join(bad.stdout.split())
    empty = fedsim("auth", "register", str(tmp_path), "--superlink", "127.0.0.1:9", "--root-certificates",
                   str(tmp_path / "ca.pem"))
    assert empty.returncode == 2 and "no supernode-*.pub keys" in " ".join(empty.stdout.split())

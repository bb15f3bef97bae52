"""Deployment on loopback: a real Flower SuperLink and three SuperNodes, each its own process,
talking over 127.0.0.1, and experiments submitted with ``fedsim deploy``.

This is what ``docker/compose.yaml`` runs, without Docker: the same commands, the same app.
Flower starts a ``flwr-clientapp`` process per message, so each run takes tens of seconds.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fedsim.config import ConfigError, load_config
from fedsim.deploy import experiment_config
from fedsim.sim.results import RunDir
from fedsim.sim.runner import run_experiment

ROOT = Path(__file__).parents[2]
BIN = Path(sys.executable).parent
NUM_NODES = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


def _certificates(folder: Path) -> dict[str, Path]:
    """A throwaway CA and a certificate for 127.0.0.1 signed by it (PEM files in ``folder``)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def certificate(subject: str, key, issuer: str, signer, extension) -> x509.Certificate:
        return (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now).not_valid_after(now + datetime.timedelta(hours=1))
                .add_extension(extension, critical=False).sign(signer, hashes.SHA256()))

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = certificate("fedsim test CA", ca_key, "fedsim test CA", ca_key, x509.BasicConstraints(ca=True, path_length=None))
    server = certificate("127.0.0.1", key, "fedsim test CA", ca_key,
                         x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]))
    files = {"ca": folder / "ca.pem", "cert": folder / "server.pem", "key": folder / "server.key"}
    files["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files["cert"].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    files["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    return files


class Deployment:
    """A SuperLink and ``num_nodes`` SuperNodes (partitions 0..n-1) on loopback; over TLS
    when ``tls`` (a CA and the SuperLink's certificate, made for the test)."""

    def __init__(self, home: Path, num_nodes: int = NUM_NODES, tls: bool = False) -> None:
        self.home, self.num_nodes = home, num_nodes
        self.certificates = _certificates(home) if tls else None
        self.port = _free_port()
        self.env = {**os.environ, "FLWR_HOME": str(home), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
        self.procs: list[subprocess.Popen] = []

    def _start(self, name: str, *args: str) -> None:
        log = (self.home / f"{name}.log").open("w")
        self.procs.append(subprocess.Popen([str(BIN / args[0]), *args[1:]], cwd=self.home, env=self.env,
                                           stdout=log, stderr=subprocess.STDOUT, start_new_session=True))

    def start(self) -> None:
        tls = self.certificates
        link_security = ["--insecure"] if tls is None else [
            "--ssl-ca-certfile", str(tls["ca"]), "--ssl-certfile", str(tls["cert"]), "--ssl-keyfile", str(tls["key"])]
        node_security = ["--insecure"] if tls is None else ["--root-certificates", str(tls["ca"])]
        self._start("superlink", "flower-superlink", *link_security, "--port", str(self.port),
                    "--disable-runtime-dependency-installation", "--database", str(self.home / "state.db"))
        _wait_for_port(self.port)
        n = self.num_nodes
        for i in range(n):
            self._start(f"supernode-{i}", "flower-supernode", *node_security, "--superlink", f"127.0.0.1:{self.port}",
                        "--port", str(_free_port()), "--node-config", f"partition-id={i} num-partitions={n}")

    def stop(self) -> None:
        for proc in self.procs:
            os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)

    def deploy(self, config: Path, overrides: list[str], out: Path, *options: str) -> subprocess.CompletedProcess:
        """``fedsim deploy`` this experiment and wait for it to end."""
        sets = [arg for o in [*overrides, f"output.dir={out}"] for arg in ("--set", o)]
        return subprocess.run(
            [str(BIN / "fedsim"), "deploy", str(config), "--superlink", f"127.0.0.1:{self.port}", *sets, *options],
            cwd=self.home, env=self.env, capture_output=True, text=True, timeout=400)

    def run(self, config: Path, overrides: list[str], out: Path, *options: str) -> RunDir:
        """``fedsim deploy`` this experiment, wait for it to end, return its run."""
        result = self.deploy(config, overrides, out, *options)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        [path] = list(out.iterdir())
        return RunDir.open(path)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    dep = Deployment(tmp_path_factory.mktemp("flwr-home"))
    dep.start()
    yield dep
    dep.stop()


def _simulated(config: Path, overrides: list[str], out: Path) -> list[dict]:
    path, _ = run_experiment(load_config(config, [*overrides, "sim.backend=inprocess", f"output.dir={out}"]))
    return RunDir.open(path).rows()


def _without(rows: list[dict], *keys: str) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in keys} for r in rows]


def test_fedavg_on_real_supernodes_equals_the_simulation(deployment, tmp_path):
    config = ROOT / "configs" / "quickstart.yaml"
    overrides = [f"partition.num_clients={NUM_NODES}", "rounds=2", "eval.federated=false", "output.plots=false"]
    run = deployment.run(config, overrides, tmp_path / "deployed")
    assert run.summary()["status"] == "completed"
    assert _without(run.rows(), "wall_time_s") == _without(_simulated(config, overrides, tmp_path / "sim"),
                                                            "wall_time_s")


def test_gossip_nodes_keep_their_models_on_real_supernodes(deployment, tmp_path):
    config = ROOT / "configs" / "gossip.yaml"
    overrides = [f"partition.num_clients={NUM_NODES}", "strategy.degree=2", "model.name=mlp", "rounds=2",
                 "client.local_steps=2", "output.plots=false"]
    rows = deployment.run(config, overrides, tmp_path / "deployed").rows()
    # a node that had lost its model would have been refused (num_failed) and resent it
    assert all(r["num_failed"] == 0 and r["num_mix_failed"] == 0 for r in rows)
    assert _without(rows, "wall_time_s") == _without(_simulated(config, overrides, tmp_path / "sim"), "wall_time_s")


def test_asynchronous_fedbuff_runs_on_the_wall_clock(deployment, tmp_path):
    overrides = [f"partition.num_clients={NUM_NODES}", "sim.clock=wall", "output.plots=false",
                 "strategy={name: fedbuff, buffer_size: 1, horizon: 40, eval_every: 20}"]
    run = deployment.run(ROOT / "configs" / "fedfix.yaml", overrides, tmp_path / "deployed")
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
    dep = Deployment(tmp_path_factory.mktemp("flwr-tls"), num_nodes=1, tls=True)
    dep.start()
    try:
        config, overrides = ROOT / "configs" / "quickstart.yaml", ["partition.num_clients=1", "rounds=1",
                                                                  "eval.federated=false", "output.plots=false"]
        insecure = dep.deploy(config, overrides, tmp_path / "insecure")
        assert insecure.returncode != 0 and "unavailable" in insecure.stdout + insecure.stderr
        run = dep.run(config, overrides, tmp_path / "tls", "--root-certificates", str(dep.certificates["ca"]))
        assert run.summary()["status"] == "completed" and run.summary()["final_accuracy"] > 0.5
    finally:
        dep.stop()

"""A Flower deployment on this machine: a SuperLink and SuperNodes as local processes.

The README's commands for a deployment without Docker, run from Python: one
``flower-superlink`` and one SuperNode per partition (``fedsim supernode``), talking over
127.0.0.1, insecure or over TLS, with or without SuperNode authentication.
``tests/deploy``, ``benchmarks/deploy_overhead.py`` and ``make docker-test`` drive
deployments with it.

Every process runs in its own session (so a SuperNode can be killed with the ClientApp
processes it started) and logs to ``<home>/<name>.log``; Flower keeps its state in
``home`` (``FLWR_HOME``) and fedsim its partition cache in ``home/fedsim-cache``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from fedsim.credentials import TlsFiles

BIN = Path(sys.executable).parent
# Flower's SuperExec looks for a new task to run every FLWR_SUPEREXEC_TASK_POLL_INTERVAL
# seconds (1 s by default): each message would wait half a second on average for it
SUPEREXEC_POLL_S = 0.1
SUPERNODE_COMMANDS = {"fedsim": ("fedsim", "supernode"), "flower": ("flower-supernode",)}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 60.0, host: str = "127.0.0.1") -> None:
    """Return once something accepts connections on ``host:port``; TimeoutError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f} s")


@dataclass
class Node:
    """One SuperNode: the partition it plays, its authentication key, its processes (the
    SuperNode, and the long-lived ClientApp process that runs its messages, if any)."""

    partition_id: int
    num_partitions: int
    private_key: Path | None = None
    process: subprocess.Popen | None = None
    clientapp: subprocess.Popen | None = None


class LoopbackDeployment:
    """A SuperLink and SuperNodes (partitions ``0..num_nodes-1``) on 127.0.0.1.

    Parameters
    ----------
    home : Path
        Folder of the deployment's state, logs and partition cache.
    num_nodes : int, default 3
        SuperNodes started by :meth:`start`, one per partition.
    tls : TlsFiles or None, default None
        CA, certificate and key of the SuperLink (for 127.0.0.1); None: insecure.
    node_keys : list of Path or None, default None
        Private key of each SuperNode; with them the SuperLink runs with
        ``--enable-supernode-auth`` (which needs ``tls``).
    isolation : {"process", "subprocess"}, default "process"
        ``process``: each SuperNode runs with ``--isolation process`` beside a long-lived
        ``fedsim clientapp`` process that runs all its messages; ``subprocess``: Flower's
        default, a new ``flwr-clientapp`` process per message.
    supernode : {"fedsim", "flower"}, default "fedsim"
        ``fedsim``: the SuperNodes run as ``fedsim supernode`` (Flower's SuperNode asking
        for messages every 0.5 s, :mod:`fedsim.supernode`); ``flower``: as
        ``flower-supernode`` (every 3 s).

    The SuperLink keeps its state in memory (Flower's default, as in docker/compose.yaml):
    with ``--database FILE`` it commits every request to SQLite, which made a deployed
    round twice as slow on this project's machine.
    """

    def __init__(self, home: Path, num_nodes: int = 3, tls: TlsFiles | None = None,
                 node_keys: list[Path] | None = None, isolation: str = "process", supernode: str = "fedsim") -> None:
        if node_keys is not None and (tls is None or len(node_keys) != num_nodes):
            raise ValueError("SuperNode authentication needs TLS and one key per node")
        if isolation not in ("process", "subprocess"):
            raise ValueError(f"isolation: {isolation!r} is not one of process, subprocess")
        if supernode not in SUPERNODE_COMMANDS:
            raise ValueError(f"supernode: {supernode!r} is not one of {', '.join(SUPERNODE_COMMANDS)}")
        self.home, self.tls, self.isolation = Path(home), tls, isolation
        self.supernode = SUPERNODE_COMMANDS[supernode]
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.node_auth = node_keys is not None
        self.nodes = [Node(i, num_nodes, None if node_keys is None else node_keys[i]) for i in range(num_nodes)]
        self.env = {**os.environ, "FLWR_HOME": str(self.home), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
                    "FEDSIM_CACHE_DIR": str(self.home / "fedsim-cache"),
                    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": str(SUPEREXEC_POLL_S)}
        self.superlink: subprocess.Popen | None = None
        self.extra: list[subprocess.Popen] = []

    def _popen(self, name: str, *args: str) -> subprocess.Popen:
        self.home.mkdir(parents=True, exist_ok=True)
        log = (self.home / f"{name}.log").open("a")
        return subprocess.Popen([str(BIN / args[0]), *args[1:]], cwd=self.home, env=self.env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)

    def start(self) -> LoopbackDeployment:
        """Start the SuperLink, wait until it listens, then start every SuperNode (and the
        ClientApp processes, each once its SuperNode listens)."""
        self.start_superlink()
        self.start_nodes()
        return self

    def start_nodes(self) -> None:
        """Start every SuperNode, then each one's ClientApp process once the node listens."""
        ports = [self._start_supernode(node.partition_id) for node in self.nodes]
        for node, port in zip(self.nodes, ports, strict=True):
            self._start_clientapp(node.partition_id, port)

    def start_superlink(self) -> None:
        security = ["--insecure"] if self.tls is None else [
            "--ssl-ca-certfile", str(self.tls.ca), "--ssl-certfile", str(self.tls.cert),
            "--ssl-keyfile", str(self.tls.key)]
        auth = ["--enable-supernode-auth"] if self.node_auth else []
        self.superlink = self._popen("superlink", "flower-superlink", *security, *auth, "--port", str(self.port),
                                     "--disable-runtime-dependency-installation")
        wait_for_port(self.port)

    def node_command(self, partition_id: int, num_partitions: int, private_key: Path | None,
                     runtime_port: int) -> list[str]:
        """The command of one SuperNode of this deployment (``fedsim supernode`` or
        ``flower-supernode``, with Flower's options)."""
        security = ["--insecure"] if self.tls is None else ["--root-certificates", str(self.tls.ca)]
        auth = [] if private_key is None else ["--auth-supernode-private-key", str(private_key)]
        return [*self.supernode, *security, *auth, "--superlink", self.address, "--isolation", self.isolation,
                "--port", str(runtime_port),
                "--node-config", f"partition-id={partition_id} num-partitions={num_partitions}"]

    def start_node(self, partition_id: int) -> None:
        """Start (or restart) the SuperNode of ``partition_id`` (and its ClientApp process)."""
        self._start_clientapp(partition_id, self._start_supernode(partition_id))

    def _start_supernode(self, partition_id: int) -> int:
        """Start the SuperNode of ``partition_id``; return the port of its Runtime API."""
        node, port = self.nodes[partition_id], free_port()
        node.process = self._popen(f"supernode-{partition_id}",
                                   *self.node_command(partition_id, node.num_partitions, node.private_key, port))
        return port

    def _start_clientapp(self, partition_id: int, port: int) -> None:
        """Start the long-lived ClientApp process of a SuperNode, once the node listens."""
        if self.isolation == "process":
            wait_for_port(port)
            self.nodes[partition_id].clientapp = self._popen(f"clientapp-{partition_id}", "fedsim", "clientapp",
                                                             "--runtime-api-address", f"127.0.0.1:{port}")

    def start_extra_node(self, name: str, partition_id: int, private_key: Path | None) -> subprocess.Popen:
        """Start a SuperNode that is not one of the deployment's own (logs to ``<name>.log``)."""
        proc = self._popen(name, *self.node_command(partition_id, len(self.nodes), private_key, free_port()))
        self.extra.append(proc)
        return proc

    def kill_node(self, partition_id: int) -> None:
        """SIGKILL the SuperNode of ``partition_id`` and every process it started, and its
        ClientApp process."""
        node = self.nodes[partition_id]
        for proc in (node.process, node.clientapp):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def stop(self) -> None:
        """Stop every process this deployment started (SIGTERM, then SIGKILL after 20 s)."""
        procs = [p for n in self.nodes for p in (n.clientapp, n.process)] + [*self.extra, self.superlink]
        procs = [p for p in procs if p is not None]
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def __enter__(self) -> LoopbackDeployment:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log(self, name: str) -> str:
        """What the process ``name`` (``superlink``, ``supernode-0``, ...) has logged so far."""
        return (self.home / f"{name}.log").read_text(errors="replace")

    def cache_partitions(self, config: Path, overrides: list[str]) -> None:
        """Build the nodes' partition cache of an experiment now, in a new process, so that no
        node spends round 1 building it."""
        code = ("import sys; from fedsim.config import load_config; from fedsim.data import cache; "
                "from fedsim.sim.components import federated_data; cache.enable(); "
                "federated_data(load_config(sys.argv[1], sys.argv[2:]))")
        subprocess.run([sys.executable, "-c", code, str(config), *overrides], env=self.env, check=True)

    def deploy_command(self, config: Path, overrides: list[str], out: Path, secure: bool = True) -> list[str]:
        """The ``fedsim deploy`` command of an experiment whose runs go to ``out`` (over TLS
        when the deployment has it, unless not ``secure``)."""
        sets = [arg for o in [*overrides, f"output.dir={Path(out).resolve()}"] for arg in ("--set", o)]
        security = ["--root-certificates", str(self.tls.ca)] if self.tls is not None and secure else []
        return [str(BIN / "fedsim"), "deploy", str(Path(config).resolve()), "--superlink", self.address, *sets,
                *security]

    def deploy(self, config: Path, overrides: list[str], out: Path, secure: bool = True,
               timeout: float = 900) -> subprocess.CompletedProcess:
        """``fedsim deploy`` an experiment (its runs in ``out``) and wait for it to end."""
        return subprocess.run(self.deploy_command(config, overrides, out, secure), cwd=self.home, env=self.env,
                              capture_output=True, text=True, timeout=timeout)

"""fedsim on real clients: a Flower app for a SuperLink and its SuperNodes.

``server_app`` and ``client_app`` are the app's components. The SuperLink runs the
ServerApp, fedsim's server loop for the configured strategy family, exactly as in
simulation; every SuperNode runs the ClientApp of the partition it states with
``--node-config "partition-id=<i> num-partitions=<n>"``. ``fedsim deploy CONFIG
--superlink HOST:PORT`` (:func:`submit`) validates the experiment on the user's machine and
submits the app with Flower's ``flwr run``; the whole resolved experiment travels in the
run config (``experiment``, JSON), so the SuperLink and the SuperNodes need fedsim
installed but no copy of the YAML file. Data files a config names (MNIST, CIFAR-10, NPZ)
must exist at the same paths on the nodes; the default digits data ships with fedsim.

Asynchronous strategies need ``sim.clock: wall`` here (real clients take real time). The
run directory is written where the ServerApp runs (the SuperLink's working directory).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import tomli_w
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from pydantic import ValidationError

from fedsim import __version__
from fedsim.attacks import ATTACKS
from fedsim.config import ConfigError, ExperimentConfig
from fedsim.data import cache as partition_cache

log = logging.getLogger(__name__)

RUN_CONFIG_KEY = "experiment"
CONNECTION = "fedsim"
# The Flower app's pyproject.toml: its components are in this module, so the app itself
# holds no code (``fedsim deploy`` writes it into a temporary app directory).
APP_PYPROJECT = {
    "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
    "project": {"name": "fedsim-app", "version": __version__, "license": "Apache-2.0",
                "description": "a fedsim experiment on a Flower deployment", "dependencies": ["fedsim"]},
    "tool": {"hatch": {"build": {"targets": {"wheel": {"packages": ["."]}}}},
             "flwr": {"app": {"publisher": "fedsim",
                              "components": {"serverapp": "fedsim.deploy:server_app",
                                             "clientapp": "fedsim.deploy:client_app"},
                              "config": {RUN_CONFIG_KEY: ""}}}},
}


def check_deployable(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` if it can run on real clients, else a one-line :class:`ConfigError`."""
    if cfg.strategy.family == "async" and cfg.sim.clock != "wall":
        raise ConfigError("deployed asynchronous runs need sim.clock=wall (real clients take real time)")
    if cfg.secagg.enabled and cfg.attack.name != "none" and ATTACKS[cfg.attack.name].acts_on == "updates":
        raise ConfigError(f"attack.name: {cfg.attack.name!r} replaces updates on the server, and with secagg.enabled a "
                          "deployed server sees none (attack.name none)")
    if cfg.secagg.enabled and _sends_client_records(cfg.strategy.name):
        raise ConfigError(f"strategy.name: {cfg.strategy.name!r} sends records of its own beside the update, which a "
                          "deployed client's secure-aggregation steps do not mask; with secagg.enabled deploy a strategy "
                          "whose clients send the update only (SCAFFOLD's joint sum runs in simulation)")
    if cfg.secagg.enabled and cfg.hierarchy is not None:
        raise ConfigError("hierarchy: its gateways' secure aggregation runs every party's step in the server's process; "
                          "with secagg.enabled a deployment runs it on the SuperNodes for a flat round only (hierarchy unset)")
    return cfg


def _sends_client_records(name: str) -> bool:
    """:meth:`fedsim.algorithms.api.Algorithm.sends_client_records` of algorithm ``name``."""
    from fedsim.algorithms import registry  # the registry's import is paid by secagg deployments only

    return registry.get(name).sends_client_records()


@functools.lru_cache(maxsize=4)
def _experiment(text: str) -> ExperimentConfig:
    if not text:
        raise ConfigError(f"the run config has no '{RUN_CONFIG_KEY}': submit the run with `fedsim deploy`")
    try:
        return check_deployable(ExperimentConfig.model_validate_json(text))
    except ValidationError as exc:
        raise ConfigError(f"the run config's experiment is not a valid fedsim config: {exc}") from None


def experiment_config(run_config: dict[str, Any]) -> ExperimentConfig:
    """The experiment a deployed run carries in its run config."""
    return _experiment(str(run_config.get(RUN_CONFIG_KEY, "")))


@functools.lru_cache(maxsize=4)
def _client_app(cfg_json: str) -> ClientApp:
    from fedsim.sim.client_app import build_client_app

    return build_client_app(ExperimentConfig.model_validate_json(cfg_json), sleep_stalls=True)


class DeployedClientApp(ClientApp):
    """fedsim's ClientApp for the run's experiment, built on a node's first message.

    A Flower app names one ClientApp object, but fedsim builds its ClientApp from the
    experiment, which a deployed node only learns from the run config of each call.
    Flower runs each message in a new process, so the node's partition is cached on disk
    (:mod:`fedsim.data.cache`): built by the first message, read back by the others.
    """

    def __call__(self, message: Message, context: Context) -> Message:
        cfg = experiment_config(dict(context.run_config))
        if partition_cache.active() is None:
            partition_cache.enable()
        return _client_app(cfg.model_dump_json())(message, context)


client_app = DeployedClientApp()
server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the experiment on the deployment's SuperNodes."""
    # imported here: a SuperNode's ClientApp process imports this module too, and needs
    # none of the server loop (Flower starts that process anew for every message)
    from fedsim.outputs.results import RunDir
    from fedsim.runner import serve
    from fedsim.seeding import seed_everything

    cfg = experiment_config(dict(context.run_config))
    seed_everything(cfg.seed)
    run = RunDir.create(cfg)
    log.info("fedsim run %s on the deployment's nodes", run.path)
    summary = serve(grid, cfg, run, resume=False, show_progress=False)
    log.info("fedsim run %s %s: final accuracy %s", run.path, summary.get("status"), summary.get("final_accuracy"))


def _flwr() -> str:
    beside = Path(sys.executable).parent / "flwr"
    found = str(beside) if beside.is_file() else shutil.which("flwr")
    if found is None:
        raise ConfigError("Flower's `flwr` command is not installed (pip install 'flwr[simulation]')")
    return found


@contextlib.contextmanager
def flwr_connection(superlink: str, root_certificates: Path | None = None) -> Iterator[tuple[str, dict[str, str], str]]:
    """A temporary Flower configuration that names the SuperLink at ``superlink``: yields
    the ``flwr`` command, the environment to run it in, and the connection's name.

    Without ``root_certificates`` the connection is insecure (plain HTTP, for loopback and
    private networks); with them, TLS verified against those certificates.
    """
    connection: dict[str, Any] = {"address": superlink, "insecure": root_certificates is None}
    if root_certificates is not None:
        connection["root-certificates"] = str(Path(root_certificates).resolve())
    with tempfile.TemporaryDirectory(prefix="fedsim-flwr-") as home:
        Path(home, "config.toml").write_text(
            tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: connection}}))
        yield _flwr(), {**os.environ, "FLWR_HOME": home}, CONNECTION


def submit(cfg: ExperimentConfig, superlink: str, root_certificates: Path | None = None, stream: bool = True) -> int:
    """Submit ``cfg`` to the SuperLink at ``superlink`` (HOST:PORT) with ``flwr run``.

    Without ``root_certificates`` the connection is insecure (plain HTTP, for loopback and
    private networks); with them, TLS verified against those certificates. ``stream``
    follows the run's logs until it ends. Returns ``flwr run``'s exit status.
    """
    check_deployable(cfg)
    with tempfile.TemporaryDirectory(prefix="fedsim-deploy-") as tmp, \
            flwr_connection(superlink, root_certificates) as (flwr, env, connection):
        app = Path(tmp, "app")
        app.mkdir()
        (app / "pyproject.toml").write_text(tomli_w.dumps(APP_PYPROJECT))
        run_config = Path(tmp, "run-config.toml")
        run_config.write_text(tomli_w.dumps({RUN_CONFIG_KEY: cfg.model_dump_json()}))
        command = [flwr, "run", str(app), connection, "--run-config", str(run_config)]
        return subprocess.run([*command, "--stream"] if stream else command, env=env, check=False).returncode

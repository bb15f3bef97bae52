"""fedsim as a Flower app for deployment: real SuperNodes (one per client) and a SuperLink.

``server_app`` and ``client_app`` are the components a Flower app names (``docker/app``).
The run config carries the experiment: ``config``, a fedsim YAML path that the SuperLink
and every SuperNode can read (the Docker images hold ``configs/``), and ``overrides``,
``--set`` style ``key=value`` pairs separated by ``;``. Each SuperNode states the
partition it plays with ``--node-config "partition-id=<i> num-partitions=<n>"``.

The server runs the loop of the configured strategy family on the deployment's grid, as
in simulation; asynchronous strategies need ``sim.clock: wall`` here (real clients take
real time), and the run directory is written where the ServerApp runs.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedsim.config import ConfigError, ExperimentConfig, load_config
from fedsim.seeding import seed_everything
from fedsim.sim.client_app import build_client_app
from fedsim.sim.results import RunDir
from fedsim.sim.runner import serve

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=4)
def _config(path: str, overrides: str) -> ExperimentConfig:
    cfg = load_config(path, [o.strip() for o in overrides.split(";") if o.strip()])
    if cfg.strategy.family == "async" and cfg.sim.clock != "wall":
        raise ConfigError(f"{path}: deployed asynchronous runs need sim.clock=wall (clients take real time)")
    return cfg


def experiment_config(run_config: dict[str, Any]) -> ExperimentConfig:
    """The experiment a deployed run's config names (``config`` path, ``overrides``)."""
    if "config" not in run_config:
        raise ConfigError("the run config has no 'config' (the path of a fedsim experiment YAML)")
    return _config(str(run_config["config"]), str(run_config.get("overrides", "")))


@functools.lru_cache(maxsize=4)
def _client_app(cfg_json: str) -> ClientApp:
    return build_client_app(ExperimentConfig.model_validate_json(cfg_json))


class DeployedClientApp(ClientApp):
    """fedsim's ClientApp for the run's experiment, built on a node's first message.

    A Flower app names one ClientApp object, but fedsim builds its ClientApp from the
    experiment config, which a deployed node only learns from the run config of each call.
    """

    def __call__(self, message: Message, context: Context) -> Message:
        cfg = experiment_config(dict(context.run_config))
        return _client_app(cfg.model_dump_json())(message, context)


client_app = DeployedClientApp()
server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the configured experiment on the deployment's SuperNodes."""
    cfg = experiment_config(dict(context.run_config))
    seed_everything(cfg.seed)
    run = RunDir.create(cfg)
    log.info("fedsim run %s on the deployment's nodes", run.path)
    summary = serve(grid, cfg, run, resume=False, show_progress=False)
    log.info("fedsim run %s %s: final accuracy %s", run.path, summary.get("status"), summary.get("final_accuracy"))

"""Launching a run: a ServerApp and a ClientApp built from the config, on Flower's
simulation engine with the Ray backend (local Ray, or an existing cluster; one engine node
per ``sim.clients_per_node`` clients), or on an in-process grid (``sim.backend:
inprocess``, clients one after another; ``batched``, clients trained together)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedsim.clients.batched import vectorisable_reason
from fedsim.config import ExperimentConfig
from fedsim.seeding import seed_everything
from fedsim.sim.async_loop import run_async
from fedsim.sim.client_app import ClientRuntime, build_client_app, worker
from fedsim.sim.flower_notices import quiet_run_simulation_notice
from fedsim.sim.gossip_loop import run_gossip
from fedsim.sim.grouped import GroupedGrid, engine_nodes
from fedsim.sim.inprocess import InProcessGrid
from fedsim.sim.results import RunDir
from fedsim.sim.sync import run_sync

log = logging.getLogger(__name__)


# The server loop of each strategy family (strategy config's ``family``)
LOOPS: dict[str, Callable[..., dict[str, Any]]] = {"sync": run_sync, "async": run_async, "gossip": run_gossip}


def serve(grid: Grid, cfg: ExperimentConfig, run: RunDir, resume: bool, show_progress: bool) -> dict[str, Any]:
    """Run the loop of the configured strategy's family on ``grid``; return the summary."""
    return LOOPS[cfg.strategy.family](grid, cfg, run, resume, show_progress)


def build_server_app(cfg: ExperimentConfig, run: RunDir, resume: bool, show_progress: bool,
                     outcome: dict[str, Any]) -> ServerApp:
    """A ServerApp running the synchronous loop; its summary lands in ``outcome``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        seed_everything(cfg.seed)
        grouped = GroupedGrid(grid, cfg.partition.num_clients, cfg.sim.clients_per_node)
        outcome.update(serve(grouped, cfg, run, resume, show_progress))

    return app


def backend_config(cfg: ExperimentConfig, ray_address: str | None) -> dict[str, Any]:
    """Flower's Ray backend settings: per-client resources, and the cluster to attach to.

    Without an address, a local Ray of this run's own: ``address="local"`` keeps Ray from
    attaching to a cluster that ``RAY_ADDRESS`` or another program's leftover address file
    names (and from retrying forever when that cluster is gone)."""
    init_args: dict[str, Any] = {"logging_level": logging.ERROR, "log_to_driver": True,
                                 "address": ray_address or cfg.sim.ray_address or "local"}
    return {"client_resources": {"num_cpus": cfg.sim.num_cpus_per_client,
                                 "num_gpus": cfg.sim.num_gpus_per_client},
            "init_args": init_args}


def run_experiment(cfg: ExperimentConfig, *, resume: str | Path | None = None, ray_address: str | None = None,
                   show_progress: bool = False, verbose: bool = False) -> tuple[Path, dict[str, Any]]:
    """Run ``cfg`` (or continue the run in ``resume``); return the run directory and summary."""
    run = RunDir.open(resume) if resume else RunDir.create(cfg)
    logging.getLogger("flwr").setLevel(logging.DEBUG if verbose else logging.WARNING)
    seed_everything(cfg.seed)
    outcome: dict[str, Any] = {}
    vectorise = cfg.sim.backend == "batched" or cfg.sim.clients_per_node > 1
    if vectorise and (reason := vectorisable_reason(cfg, worker(cfg.model_dump_json()).model)) is not None:
        log.warning("clients train one after another, not stacked: %s", reason)
    if cfg.sim.backend in ("inprocess", "batched"):
        grid = InProcessGrid(ClientRuntime(cfg, vectorise), cfg.partition.num_clients)
        outcome.update(serve(grid, cfg, run, resume is not None, show_progress))
        return run.path, outcome
    from flwr.simulation import run_simulation  # imports Ray: not for a deployed ServerApp, which needs serve()

    with quiet_run_simulation_notice():  # deprecated, and still the right call: see sim.flower_notices
        run_simulation(
            server_app=build_server_app(cfg, run, resume is not None, show_progress, outcome),
            client_app=build_client_app(cfg, vectorise),
            num_supernodes=engine_nodes(cfg.partition.num_clients, cfg.sim.clients_per_node),
            backend_config=backend_config(cfg, ray_address),
            verbose_logging=verbose,
        )
    return run.path, outcome

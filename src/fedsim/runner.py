"""Launching a run: a ServerApp and a ClientApp built from the config, on Flower's
simulation engine with the Ray backend (local Ray, or an existing cluster; one engine node
per ``sim.clients_per_node`` clients), or on an in-process grid (``sim.backend:
inprocess``, clients one after another; ``batched``, clients trained together)."""

from __future__ import annotations

import contextlib
import logging
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedsim.algorithms import registry
from fedsim.clients.batched import vectorisable_reason
from fedsim.config import ExperimentConfig
from fedsim.data import cache as partition_cache
from fedsim.loops.asynchronous import run_async
from fedsim.loops.gossip import run_gossip
from fedsim.loops.hierarchical import run_hierarchical
from fedsim.loops.sync import run_sync
from fedsim.outputs.results import RunDir
from fedsim.seeding import seed_everything
from fedsim.sim.client_app import ClientRuntime, build_client_app, worker
from fedsim.sim.client_states import ClientStateStore
from fedsim.sim.flower_notices import quiet_run_simulation_notice
from fedsim.sim.inprocess import InProcessGrid
from fedsim.sim.ray_nodes import GroupedGrid, engine_nodes

log = logging.getLogger(__name__)


# The server loop of each strategy family (strategy config's ``family``)
LOOPS: dict[str, Callable[..., dict[str, Any]]] = {"sync": run_sync, "async": run_async, "gossip": run_gossip}


def serve(grid: Grid, cfg: ExperimentConfig, run: RunDir, resume: bool, show_progress: bool) -> dict[str, Any]:
    """Run the loop of the configured strategy's family (or its own, family ``custom``; or the
    two-tier loop under ``hierarchy``) on ``grid``; return the summary."""
    if cfg.hierarchy is not None:
        return run_hierarchical(grid, cfg, run, resume, show_progress)
    loop = LOOPS.get(cfg.strategy.family) or registry.get(cfg.strategy.name).loop
    return loop(grid, cfg, run, resume, show_progress)


def client_state_store(cfg: ExperimentConfig, run: RunDir) -> ClientStateStore:
    """The run's client states: ``sim.client_state_mb`` in memory, the rest in ``<run>/client_states/``."""
    return ClientStateStore(int(cfg.sim.client_state_mb * 2**20), run.path / "client_states")


def build_server_app(cfg: ExperimentConfig, run: RunDir, resume: bool, show_progress: bool,
                     outcome: dict[str, Any], engine_lost: Callable[[], str | None] | None = None) -> ServerApp:
    """A ServerApp running the configured loop; its summary lands in ``outcome``; the run
    stops (:class:`fedsim.sim.ray_nodes.EngineLost`) once ``engine_lost`` says why."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        seed_everything(cfg.seed)
        grouped = GroupedGrid(grid, cfg.partition.num_clients, cfg.sim.clients_per_node, engine_lost,
                              client_state_store(cfg, run))
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


class ClusterUnreachable(RuntimeError):
    """The Ray cluster of ``sim.ray_address`` (or ``--ray-address``) did not answer in time."""


def wait_for_cluster(address: str, wait_s: float) -> None:
    """Return once something listens at the cluster's ``HOST:PORT`` (``ray://HOST:PORT``
    too); raise :class:`ClusterUnreachable` after ``wait_s`` seconds.

    ``ray.init`` retries an address where no cluster runs without end; this bounds it by
    ``sim.wait_for_nodes_s``. ``auto`` (an address Ray finds itself) is left to Ray."""
    target = address.split("://", 1)[-1]
    host, _, port = target.rpartition(":")
    if address in ("auto", "local") or not host or not port.isdigit():
        return
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=min(2.0, wait_s)):
                return
        except OSError as exc:
            if time.monotonic() + 0.5 > deadline:
                raise ClusterUnreachable(
                    f"no Ray cluster answers at {address} after {wait_s:g} s (sim.wait_for_nodes_s): "
                    f"{exc.strerror or exc}; start one (ray start --head) or fix sim.ray_address") from None
            time.sleep(0.5)


def run_experiment(cfg: ExperimentConfig, *, resume: str | Path | None = None, ray_address: str | None = None,
                   show_progress: bool = False, verbose: bool = False) -> tuple[Path, dict[str, Any]]:
    """Run ``cfg`` (or continue the run in ``resume``); return the run directory and summary.

    Raises :class:`ClusterUnreachable`, before a run directory is made, when the cluster to
    attach to does not answer within ``sim.wait_for_nodes_s``; ``fedsim.sim.ray_nodes.EngineLost`` when every
    Ray worker is lost mid-run (the rows, checkpoints and summary so far are written)."""
    address = ray_address or cfg.sim.ray_address
    if cfg.sim.backend == "ray" and address:
        wait_for_cluster(address, cfg.sim.wait_for_nodes_s)
    run = RunDir.open(resume) if resume else RunDir.create(cfg)
    logging.getLogger("flwr").setLevel(logging.DEBUG if verbose else logging.WARNING)
    seed_everything(cfg.seed)
    outcome: dict[str, Any] = {}
    vectorise = cfg.sim.backend == "batched" or cfg.sim.clients_per_node > 1
    if cfg.sim.backend in ("inprocess", "batched"):
        _warn_if_not_stacked(cfg, vectorise)
        grid = InProcessGrid(ClientRuntime(cfg, vectorise), cfg.partition.num_clients,
                             states=client_state_store(cfg, run))
        outcome.update(serve(grid, cfg, run, resume is not None, show_progress))
        return run.path, outcome
    from flwr.simulation import (
        run_simulation,  # imports Ray: not for a deployed ServerApp, which needs serve()
    )

    from fedsim.sim.ray_workers import repairing_ray_backend

    # The driver writes the partitioned data to a disk cache of this run; Ray's workers map
    # it instead of each loading and partitioning the data again (seconds and a copy each).
    with tempfile.TemporaryDirectory(prefix="fedsim-partitions-") as cache_dir, _disk_cache(cache_dir):
        _warn_if_not_stacked(cfg, vectorise)
        # deprecated, and still the right call: see sim.flower_notices; lost workers come back: sim.ray_workers
        with quiet_run_simulation_notice(), repairing_ray_backend(cfg.sim.wait_for_nodes_s) as workers:
            run_simulation(
                server_app=build_server_app(cfg, run, resume is not None, show_progress, outcome,
                                            engine_lost=lambda: workers.lost),
                client_app=build_client_app(cfg, vectorise, cache_dir=cache_dir),
                num_supernodes=engine_nodes(cfg.partition.num_clients, cfg.sim.clients_per_node),
                backend_config=backend_config(cfg, ray_address),
                verbose_logging=verbose,
            )
    return run.path, outcome


def _warn_if_not_stacked(cfg: ExperimentConfig, vectorise: bool) -> None:
    if vectorise and (reason := vectorisable_reason(cfg, worker(cfg.model_dump_json()).model)) is not None:
        log.warning("clients train one after another, not stacked: %s", reason)


@contextlib.contextmanager
def _disk_cache(root: str):
    """This process reads and writes partitioned data through a disk cache in ``root``
    (unless one is on already)."""
    if partition_cache.active() is not None:
        yield
        return
    partition_cache.enable(root)
    try:
        yield
    finally:
        partition_cache.disable()

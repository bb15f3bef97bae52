"""What a run needs from the data and the host, checked before anything starts.

:class:`fedsim.config.ExperimentConfig` checks what the config alone decides. These checks
need the files and the machine: the dataset loads and parses, it has enough samples for
the partition, the main loss can train on its classes, a csv speed profile reads, the
device and the GPU share exist, the output directory can be written. ``fedsim validate``
and ``fedsim run`` both call :func:`preflight`, so ``validate`` refuses what ``run`` would
stop on, and ``run`` stops before it creates a run directory or starts Ray (a GPU share
Ray cannot give would wait out ``sim.wait_for_nodes_s``).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import torch

from fedsim.config import ConfigError, ExperimentConfig
from fedsim.config_checks import KNOWN_NUM_CLASSES, loss_class_problem
from fedsim.data import ArrayDataset
from fedsim.privacy.settings import delta_warning

log = logging.getLogger(__name__)

LOAD_ERRORS = (OSError, ValueError, TypeError, KeyError, EOFError)
"""What fedsim's loaders and partitioners raise for a missing, empty or corrupt dataset, or
one too small for the partition (``zipfile.BadZipFile`` and ``pickle.UnpicklingError`` are
wrapped into ValueError by the loaders)."""


def preflight(cfg: ExperimentConfig, ray_address: str | None = None) -> None:
    """Raise :class:`ConfigError` with one line per problem that the data or host would
    cause in ``fedsim run``; ``ray_address`` is the ``--ray-address`` of the command line."""
    problems = [*host_problems(cfg, ray_address), *data_problems(cfg)]
    if problems:
        raise ConfigError("\n".join(problems))


def data_problems(cfg: ExperimentConfig) -> list[str]:
    """Load and partition the dataset as the run will (cached in this process), and the
    speed profile; then check the main loss against the dataset's class count."""
    from fedsim.sim.components import device_speeds, federated_data

    problems = []
    try:
        data = federated_data(cfg)
    except LOAD_ERRORS as exc:
        where = "partition" if _loads(cfg) else "data"
        return [f"{where}: {exc}"]
    empty = [i for i, idx in enumerate(data.client_train) if len(idx) == 0]
    if empty:
        problems.append(f"partition: client {empty[0]} gets no training sample ({len(empty)} of "
                        f"{cfg.partition.num_clients} clients); use fewer clients (partition.num_clients)")
    if cfg.data.name not in KNOWN_NUM_CLASSES and cfg.data.name != "synthetic":
        problems.append(loss_class_problem(cfg, data.train.num_classes))
    problems.append(model_problem(cfg, data.train))
    if (warning := delta_warning(cfg, [len(idx) for idx in data.client_train])) is not None:
        log.warning(warning)
    if cfg.sim.speeds.kind == "csv":
        try:
            device_speeds(cfg)
        except (OSError, ValueError) as exc:
            problems.append(f"sim.speeds.path: {exc}")
    return [p for p in problems if p]


def model_problem(cfg: ExperimentConfig, train: ArrayDataset) -> str | None:
    """Why the configured model cannot take the dataset's samples (an image model on
    vectors, LeNet-5 on images over 32x32), or None; the model is built once to find out."""
    from fedsim.sim.components import make_model

    try:
        with torch.random.fork_rng(devices=[]):  # building seeds torch; leave the caller's generator alone
            make_model(cfg.model, train, cfg.seed)
    except ValueError as exc:
        return (f"model.name: {cfg.model.name!r} cannot take the samples of data.name {cfg.data.name!r}, of shape "
                f"{tuple(train.input_shape)} ({exc}); use mlp for vectors")
    return None


def _loads(cfg: ExperimentConfig) -> bool:
    """Whether the dataset alone loads (so the failure was the partition's)."""
    from fedsim.sim.components import load_source

    try:
        load_source(cfg.data, cfg.seed)
    except LOAD_ERRORS:
        return False
    return True


def host_problems(cfg: ExperimentConfig, ray_address: str | None = None) -> list[str]:
    """The device, the GPU share and the output directory."""
    problems = []
    if cfg.sim.device == "cuda" and not torch.cuda.is_available():
        problems.append("sim.device: 'cuda', but this host has no CUDA device (torch sees none); use auto or cpu")
    remote = ray_address or cfg.sim.ray_address
    if cfg.sim.num_gpus_per_client > 0 and not remote and torch.cuda.device_count() == 0:
        problems.append(f"sim.num_gpus_per_client: {cfg.sim.num_gpus_per_client} GPUs per client, but this host "
                        f"has none; set 0, or attach to a cluster with GPUs (sim.ray_address)")
    if (problem := _unwritable(Path(cfg.output.dir), cfg.name)) is not None:
        problems.append(f"output.dir: {problem}")
    return problems


def _unwritable(directory: Path, name: str) -> str | None:
    """Why the run directory ``<directory>/<name>-<timestamp>`` cannot be created, or None.

    The directory is created as the run would create it, then removed with every folder
    this check made (a permission check alone misses what only the file system refuses:
    a read-only mount, /proc, a name too long)."""
    existing = directory
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    made = [directory / f"{name}-00000000-000000-check-{os.getpid()}"]
    made.extend(parent for parent in made[0].parents if not parent.exists())
    try:
        made[0].mkdir(parents=True)
    except OSError as exc:
        return f"cannot create the run directory <name>-<timestamp> under {directory} ({exc.strerror or exc})"
    finally:
        for folder in made:
            with contextlib.suppress(OSError):  # another run may have begun writing there meanwhile
                folder.rmdir()
    return None

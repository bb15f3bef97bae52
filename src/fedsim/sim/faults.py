"""Fault injection for simulated clients (``faults:`` in the config).

Real deployments lose clients, receive garbage and wait on stragglers; these faults let a
simulation (and the test suite) exercise the server's handling of each on purpose.
"""

from __future__ import annotations

import numpy as np

from fedsim.config import FaultConfig


class InjectedFault(RuntimeError):
    """Raised by a client configured to crash."""


def _applies(faults: FaultConfig, server_round: int) -> bool:
    return faults.rounds is None or server_round in faults.rounds


def stall_seconds(faults: FaultConfig, partition_id: int, server_round: int) -> float:
    """How long this client stalls in this round (``faults.slow``): simulated nodes add it to
    the client's time, deployed nodes sleep it."""
    return faults.slow_s if _applies(faults, server_round) and partition_id in faults.slow else 0.0


def inject_fault(faults: FaultConfig, partition_id: int, server_round: int, update: np.ndarray) -> np.ndarray:
    """Apply the configured fault of this client in this round to its outgoing update (a
    stall is :func:`stall_seconds`)."""
    if not _applies(faults, server_round):
        return update
    if partition_id in faults.crash:
        raise InjectedFault(f"client {partition_id} crashed (injected fault)")
    if partition_id in faults.nan:
        update = update.copy()
        update[0] = np.nan
    if partition_id in faults.wrong_shape:
        update = update[:-1]
    return update

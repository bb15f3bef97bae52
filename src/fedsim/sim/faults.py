"""Fault injection for simulated clients (``faults:`` in the config).

Real deployments lose clients, receive garbage and wait on stragglers; these faults let a
simulation (and the test suite) exercise the server's handling of each on purpose.
"""

from __future__ import annotations

import time

import numpy as np

from fedsim.config import FaultConfig


class InjectedFault(RuntimeError):
    """Raised by a client configured to crash."""


def inject_fault(faults: FaultConfig, partition_id: int, server_round: int, update: np.ndarray) -> np.ndarray:
    """Apply the configured fault of this client in this round to its outgoing update."""
    if faults.rounds is not None and server_round not in faults.rounds:
        return update
    if partition_id in faults.crash:
        raise InjectedFault(f"client {partition_id} crashed (injected fault)")
    if partition_id in faults.slow:
        time.sleep(faults.slow_s)
    if partition_id in faults.nan:
        update = update.copy()
        update[0] = np.nan
    if partition_id in faults.wrong_shape:
        update = update[:-1]
    return update

"""``fedsim supernode``: Flower's SuperNode with its sleeps cut to the poll interval
(:mod:`fedsim.supernode`). The deployments of tests/deploy run on it."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from flwr.supernode import start_client_internal as node_loop

from fedsim.supernode import ShortSleeps

BIN = Path(sys.executable).parent


class RecordingClock:
    def __init__(self) -> None:
        self.slept: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)

    def monotonic(self) -> float:
        return 42.0


def test_sleeps_are_cut_to_the_poll_interval_and_shorter_ones_kept():
    clock = RecordingClock()
    short = ShortSleeps(0.5, clock)
    for seconds in (3, 0.5, 0.1):
        short.sleep(seconds)
    assert clock.slept == [0.5, 0.5, 0.1]
    assert short.monotonic() == 42.0  # everything else is the wrapped clock's
    with pytest.raises(ValueError, match="must be > 0"):
        ShortSleeps(0.0)


def test_flowers_node_loop_still_sleeps_through_its_module_time():
    """What ShortSleeps relies on: Flower's SuperNode loop (the 3 s wait for a message) and
    its wait for the ClientApp's reply (0.5 s) call ``time.sleep`` on the module's global
    ``time``. A Flower that sleeps otherwise fails here, not silently slow."""
    for function in (node_loop.start_client_internal, node_loop._push_messages):
        assert {"time", "sleep"} <= set(function.__code__.co_names), function.__name__
    assert node_loop.time is time


def test_the_command_passes_flowers_options_to_flowers_supernode():
    bad = subprocess.run([str(BIN / "fedsim"), "supernode", "--poll-interval", "0.2", "--no-such-option"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "flower-supernode: error: unrecognized arguments: --no-such-option" in bad.stderr
    refused = subprocess.run([str(BIN / "fedsim"), "supernode", "--poll-interval", "0"], capture_output=True,
                             text=True, timeout=120)
    assert refused.returncode == 2 and "not in the range" in refused.stdout + refused.stderr

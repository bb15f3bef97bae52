"""``fedsim supernode``: Flower's SuperNode with its sleeps cut to the poll interval
(:mod:`fedsim.supernode`). The deployments of tests/deploy run on it."""

from __future__ import annotations

import importlib
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from flwr.common.constant import ISOLATION_MODE_PROCESS
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supernode import start_client_internal as node_loop
from flwr.supernode.nodestate import NodeStateFactory

from fedsim.supernode import ShortSleeps, run_supernode

BIN = Path(sys.executable).parent
POLL_S = 0.05
ASKS = 4  # the idle loop asks the SuperLink this often before the test stops it


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


class Enough(BaseException):
    """Ends Flower's endless loops (a BaseException: no ``except Exception`` there takes it)."""


@pytest.fixture
def loop_sleeps(monkeypatch) -> list[float]:
    """The seconds this thread asks ``time.sleep`` to sleep during the test (it sleeps them).
    Flower's node loop and its module's ``time`` are as before after the test."""
    monkeypatch.setattr(node_loop, "time", node_loop.time)
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    thread, sleep, slept = threading.get_ident(), time.sleep, []

    def recording_sleep(seconds: float) -> None:
        if threading.get_ident() == thread:
            slept.append(seconds)
        sleep(seconds)

    monkeypatch.setattr(time, "sleep", recording_sleep)
    return slept


def test_an_idle_supernode_asks_for_messages_and_for_replies_every_poll_interval(monkeypatch, loop_sleeps):
    """Flower's own SuperNode loop, run by ``run_supernode`` against a SuperLink that never
    has a message (Flower waits 3 s between asks), and then its wait for a ClientApp's reply
    that is not there (0.5 s between checks): every sleep it asks for is the poll interval."""
    asks: list[float] = []

    def receive():
        asks.append(time.monotonic())
        if len(asks) == ASKS:
            raise Enough
        return None

    @contextmanager
    def idle_superlink(**connection):
        yield 7, receive, *[None] * 6  # node id, receive; nothing else is used without a message

    def flower_supernode() -> None:  # Flower's command without its Runtime API server: the node loop
        node_loop.start_client_internal(state_factory=NodeStateFactory(ObjectStoreFactory()),
                                        server_address="127.0.0.1:9092", node_config={}, insecure=True,
                                        isolation=ISOLATION_MODE_PROCESS)

    monkeypatch.setattr(node_loop, "_init_connection", idle_superlink)
    monkeypatch.setattr(node_loop, "register_signal_handlers", lambda **handlers: None)
    monkeypatch.setattr(importlib.import_module("flwr.supernode.cli.flower_supernode"), "flower_supernode",
                        flower_supernode)
    with pytest.raises(Enough):
        run_supernode(["--insecure"], poll_interval=POLL_S)
    assert len(asks) == ASKS and loop_sleeps == [POLL_S] * (ASKS - 1)

    class NoReplyYet:
        checks = 0

        def get_messages_legacy(self, is_reply: bool) -> list:
            self.checks += 1
            if self.checks == ASKS:
                raise Enough
            return []

    loop_sleeps.clear()
    with pytest.raises(Enough):
        node_loop._push_messages(state=NoReplyYet(), object_store=None, send=None, push_object=None)
    assert loop_sleeps == [POLL_S] * (ASKS - 1)


def test_the_command_passes_flowers_options_to_flowers_supernode():
    bad = subprocess.run([str(BIN / "fedsim"), "supernode", "--poll-interval", "0.2", "--no-such-option"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "flower-supernode: error: unrecognized arguments: --no-such-option" in bad.stderr
    refused = subprocess.run([str(BIN / "fedsim"), "supernode", "--poll-interval", "0"], capture_output=True,
                             text=True, timeout=120)
    assert refused.returncode == 2 and "not in the range" in refused.stdout + refused.stderr

"""``fedsim supernode``: Flower's SuperNode, asking the SuperLink for messages more often.

A Flower 1.41 SuperNode (``flower-supernode``) that finds no message for it sleeps 3 s
before it asks the SuperLink again (``time.sleep(3)`` in
``flwr/supernode/start_client_internal.py``; Flower has no setting for it), and it asks
right after pushing a reply, before the server can have sent the next message: each
message of a synchronous round waits up to 3 s at every node, twice a round when federated
evaluation runs. The node also checks every 0.5 s whether its ClientApp has replied.

:func:`run_supernode` runs Flower's own SuperNode (the same options, the same code) with
every sleep of that loop cut to at most ``poll_interval`` seconds. The loop's module looks
its global ``time`` up each time it sleeps, so swapping that name for :class:`ShortSleeps`
is enough; it is written by hand because Flower offers no setting, and
``tests/deploy/test_supernode.py`` runs Flower's loop with no message to pull and no reply to
push and checks the sleeps it asks for, so a Flower upgrade that sleeps otherwise fails
there instead of silently going slow again.

The price is requests: an idle node asks the SuperLink ``1 / poll_interval`` times a second
(Flower's asks once every 3 s), which a SuperLink serving hundreds of nodes may feel; raise
``--poll-interval`` there.
"""

from __future__ import annotations

import sys
import time
from types import ModuleType

POLL_INTERVAL_S = 0.5


class ShortSleeps:
    """The ``time`` module, except that ``sleep(s)`` sleeps ``min(s, cap)`` seconds."""

    def __init__(self, cap: float, clock: ModuleType = time) -> None:
        if not cap > 0:
            raise ValueError(f"poll interval must be > 0 s, got {cap}")
        self.cap, self._clock = cap, clock

    def sleep(self, seconds: float) -> None:
        self._clock.sleep(min(seconds, self.cap))

    def __getattr__(self, name: str):
        return getattr(self._clock, name)


def run_supernode(args: list[str], poll_interval: float = POLL_INTERVAL_S) -> None:
    """Run ``flower-supernode ARGS`` with its polls of the SuperLink and of its ClientApp's
    reply at most ``poll_interval`` seconds apart; returns when the SuperNode stops."""
    from flwr.supernode import start_client_internal as node_loop
    from flwr.supernode.cli.flower_supernode import flower_supernode

    node_loop.time = ShortSleeps(poll_interval)
    sys.argv = ["flower-supernode", *args]  # Flower's SuperNode parses its own options
    flower_supernode()

"""Grouped nodes under Ray: one Flower node serves many partitions (``sim.clients_per_node``).

Flower's simulation engine pays per message: a round trip through its link state, a Ray
actor call, a ClientApp call. :class:`GroupedGrid` wraps the engine's grid so that fedsim's
server loops still address one virtual node per partition, while the engine runs
``ceil(num_clients / clients_per_node)`` nodes: node j (in the order of its node id)
serves partitions ``j*K .. j*K + K - 1``. The messages a loop pushes at once to one node's
partitions travel as one group message (:mod:`fedsim.sim.group_messages`); the node trains its
clients together and answers for each. Aggregation, attacks, byte counts and failures stay
per client: a client that raises, sends a bad update or takes longer than
``client.timeout_s`` is that client's failure; a node that fails or misses the group's
deadline fails its clients of that message.

The server assigns the partitions itself, so starting a run costs no message per client:
it waits for the engine's nodes to register, then sorts them.

The clients' states are the server's (:class:`fedsim.sim.client_states.ClientStateStore`,
bounded by ``sim.client_state_mb`` for the run, spilled to ``<run>/client_states/``): each
client's state travels with its message and its node's copy comes back with the reply. A
node's Context, which Flower's engine ships to the worker and back with every message, stays
empty: a message carries the states of the clients it addresses, not of all the node serves.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable

from flwr.app import Message
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from fedsim.sim import group_messages
from fedsim.sim.client_states import ClientStateStore
from fedsim.sim.messaging import PartitionGrid
from fedsim.strategies.replies import TIMEOUT_CODE


def engine_nodes(num_partitions: int, clients_per_node: int) -> int:
    """Nodes the simulation engine runs for ``num_partitions`` clients, K per node."""
    return math.ceil(num_partitions / clients_per_node)


def group_type(message_type: str) -> str:
    """The group action carrying messages of ``message_type`` (``train.mix`` -> ``train.group``)."""
    return f"{message_type.split('.')[0]}.{group_messages.GROUP_ACTION}"


class EngineLost(RuntimeError):
    """The simulation engine has no client worker left (every Ray worker died and none
    could be started): no later round can run."""


class GroupedGrid(PartitionGrid):
    """``num_partitions`` virtual nodes over the Flower ``grid`` of a simulation with
    ``ceil(num_partitions / clients_per_node)`` nodes.

    Parameters
    ----------
    grid : Grid
        The simulation engine's grid.
    num_partitions : int
        Clients of the run.
    clients_per_node : int
        Partitions each engine node serves.
    engine_lost : Callable[[], str | None] or None, default None
        Why the engine has no worker left (None while it has one); a push then raises
        :class:`EngineLost` (``fedsim.sim.ray_workers.PoolHealth``).
    states : ClientStateStore or None, default None
        The clients' states (None: held in memory, unbounded).
    """

    def __init__(self, grid: Grid, num_partitions: int, clients_per_node: int,
                 engine_lost: Callable[[], str | None] | None = None, states: ClientStateStore | None = None) -> None:
        super().__init__(num_partitions, states)
        self._grid = grid
        self._engine_lost = engine_lost
        self.clients_per_node = clients_per_node
        self.num_nodes = engine_nodes(num_partitions, clients_per_node)
        self._nodes: list[int] = []
        self._groups: dict[str, list[Message]] = {}
        self._first_push_startup_s = 0.0  # until the first push
        self._latest_push_startup_s = 0.0

    @property
    def run(self) -> Run:
        return self._grid.run

    def set_run(self, run: Run) -> None:
        self._grid.set_run(run)

    def partition_nodes(self, wait_s: float) -> dict[int, int]:
        """Wait until the engine's nodes are registered (up to ``wait_s``), then assign them."""
        deadline = time.monotonic() + wait_s
        while len(nodes := sorted(self._grid.get_node_ids())) < self.num_nodes:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(nodes)} of {self.num_nodes} client nodes registered "
                                   f"after {wait_s:.0f} s (sim.wait_for_nodes_s)")
            time.sleep(0.05)
        self._nodes = nodes[: self.num_nodes]
        # the engine starts its workers with the first messages: the first delivery may
        # take this long on top of the clients' own time
        self._first_push_startup_s = wait_s
        return super().partition_nodes(wait_s)

    def outstanding(self) -> int:
        return sum(len(members) for members in self._groups.values())

    def startup_allowance(self) -> float:
        """The engine starts its workers with the first messages: ``sim.wait_for_nodes_s``
        for the messages of the first push, 0 for those of a later one."""
        return self._latest_push_startup_s

    def _node_of(self, message: Message) -> int:
        return self._nodes[self.partition_of(message) // self.clients_per_node]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Send the messages as one group message per (node, message type)."""
        if self._engine_lost is not None and (reason := self._engine_lost()) is not None:
            raise EngineLost(reason)
        bundles: dict[tuple[int, str, int], list[Message]] = {}
        repeats: dict[tuple[int, str], int] = {}
        ids = []
        for msg in messages:
            ids.append(self.stamp(msg))
            # a partition's second message of a type goes in a later group
            key = (self.partition_of(msg), msg.metadata.message_type)
            repeats[key] = repeats.get(key, -1) + 1
            bundles.setdefault((self._node_of(msg), msg.metadata.message_type, repeats[key]), []).append(msg)
        outgoing = []
        for (node, message_type, _), members in bundles.items():
            content = group_messages.pack_members(message_type, [
                (pid, m.content, self._states.state(pid)) for m in members for pid in [self.partition_of(m)]])
            carrier = Message(content=content, message_type=group_type(message_type), dst_node_id=node)
            outgoing.append((carrier, members))
        accepted = set(self._grid.push_messages([carrier for carrier, _ in outgoing]))
        if outgoing:
            self._latest_push_startup_s, self._first_push_startup_s = self._first_push_startup_s, 0.0
        for carrier, members in outgoing:
            if carrier.metadata.message_id in accepted:
                self._groups[carrier.metadata.message_id] = members
            else:
                for msg in members:
                    self.answer(msg, group_messages.MemberReply(self.partition_of(msg), None, ErrorCode.NODE_UNAVAILABLE,
                                                        "the grid did not accept the message"))
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Collect the group replies that are in and hand out their clients' replies."""
        if self._groups:
            for reply in self._grid.pull_messages(list(self._groups)):
                members = self._groups.pop(reply.metadata.reply_to_message_id)
                if reply.has_error():
                    for msg in members:
                        self.answer(msg, group_messages.MemberReply(self.partition_of(msg), None, reply.error.code,
                                                            f"node failed: {reply.error.reason}"))
                    continue
                by_partition = {r.partition_id: r for r in group_messages.unpack_replies(reply.content)}
                for answered in by_partition.values():
                    self._states.put(answered.partition_id, answered.state)
                for msg in members:
                    pid = self.partition_of(msg)
                    self.answer(msg, by_partition.get(pid) or group_messages.MemberReply(
                        pid, None, TIMEOUT_CODE, "the node's reply left this client out"))
            self._states.trim()
        return super().pull_messages(message_ids)

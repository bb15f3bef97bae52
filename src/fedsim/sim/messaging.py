"""Sending messages to clients and collecting the replies, on any Flower Grid.

fedsim's server loops address clients by partition id. Under the simulation backends the
grid itself knows who plays which partition: fedsim's own grids (:class:`PartitionGrid`:
the in-process grids, and :class:`~fedsim.sim.ray_nodes.GroupedGrid` over Ray) have one
virtual node per partition, so a run starts without a round trip per client. In a
deployment each SuperNode states its partition in its node config, and the server asks
every node once (a QUERY message) which one it plays.

Flower's ``Grid.send_and_receive`` sleeps ``pull_interval`` (0.1 s in the simulation
engine) between pulls, so every round's wall time is rounded up to the next 0.1 s: with
small clients a round that needs 0.21 s takes 0.3 s. fedsim's loops push and pull
themselves and poll every 10 ms; replies, timeouts and order are otherwise unchanged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from uuid import uuid4

from flwr.app import Error, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedsim.sim.client_states import ClientStateStore
from fedsim.sim.group_messages import MemberReply
from fedsim.strategies.replies import LocalReply, TrainReply

POLL_S = 0.01
FIRST_NODE_ID = 1000

log = logging.getLogger(__name__)


class PartitionGrid(Grid):
    """A Flower Grid whose nodes are a simulation's partitions: node ``FIRST_NODE_ID + p``
    plays partition ``p``. Subclasses deliver the messages (:meth:`push_messages`,
    :meth:`pull_messages`).

    Its clients time themselves: one slower than ``client.timeout_s`` is answered with a
    timeout (:class:`fedsim.sim.client_app.Outcome`), so the server's waiting only guards
    against a node that never answers. Time a message spends queued behind others (or
    behind the workers' start-up) does not count against its client.

    The clients' Context states are the grid's: ``states`` (unbounded in memory when None),
    written to checkpoints by what changed (:meth:`checkpoint_client_states`)."""

    def __init__(self, num_partitions: int, states: ClientStateStore | None = None) -> None:
        self.num_partitions = num_partitions
        self._replies: dict[str, Message] = {}
        self._states = ClientStateStore(0, None) if states is None else states

    def partition_nodes(self, wait_s: float) -> dict[int, int]:
        """Partition id -> node id, once the grid's clients are ready (waiting up to ``wait_s``)."""
        return {pid: FIRST_NODE_ID + pid for pid in range(self.num_partitions)}

    def partition_of(self, message: Message) -> int:
        """The partition a message is addressed to."""
        pid = message.metadata.dst_node_id - FIRST_NODE_ID
        if not 0 <= pid < self.num_partitions:
            raise ValueError(f"no node {message.metadata.dst_node_id} in this grid")
        return pid

    def outstanding(self) -> int:
        """Messages pushed and not answered yet."""
        return 0

    def startup_allowance(self) -> float:
        """Extra seconds the messages of the latest push may take on top of their clients'
        time (workers starting with the first delivery)."""
        return 0.0

    def allowance(self, timeout: float) -> float:
        """Seconds after which a message of the latest push counts as unanswered: every
        outstanding client's ``timeout`` in turn (a worker may serve them one after another),
        and the push's :meth:`startup_allowance`."""
        return timeout * max(1, self.outstanding()) + self.startup_allowance()

    def collect(self, messages: list[Message], timeout: float) -> list[Message]:
        """Push ``messages`` and return their replies in the order of ``messages``."""
        ids = list(self.push_messages(messages))
        replies = poll_replies(self, ids, self.allowance(timeout))
        order = {message_id: i for i, message_id in enumerate(ids)}
        return sorted(replies, key=lambda msg: order[msg.metadata.reply_to_message_id])

    def checkpoint_client_states(self, directory: Path, step: int, timeout: float) -> dict[int, str]:
        """Write the states of the clients addressed since the last checkpoint under
        ``directory``; the checkpoint keeps every stateful client's latest file name."""
        return self._states.save(directory, step)

    def resume_client_states(self, saved: dict[int, Any], directory: Path, timeout: float) -> None:
        """Continue from a checkpoint's client states: file names (:meth:`checkpoint_client_states`),
        or the records themselves (a checkpoint of fedsim before the grids kept the states)."""
        files = {pid: value for pid, value in saved.items() if isinstance(value, str)}
        self._states.load(files, directory)
        for pid, records in saved.items():
            if pid not in files:
                self._states.state(pid).update(records)

    def get_node_ids(self) -> Iterable[int]:
        return [FIRST_NODE_ID + pid for pid in range(self.num_partitions)]

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type, ttl=ttl,
                       group_id=group_id)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.collect(list(messages), float("inf") if timeout is None else timeout)

    def stamp(self, message: Message) -> str:
        """Give a pushed message its id, as Flower's grids do."""
        message.metadata.__dict__["_message_id"] = str(uuid4())
        return message.metadata.message_id

    def answer(self, message: Message, reply: MemberReply) -> None:
        """Keep the reply to ``message`` for pulling: its content (a training reply's records
        built when first read), or an error."""
        if reply.content is None:
            answer = Message(error=Error(code=reply.code, reason=reply.reason), reply_to=message)
        elif isinstance(reply.content, TrainReply):
            answer = LocalReply(reply.content, reply_to=message)
        else:
            answer = Message(content=reply.content, reply_to=message)
        self._replies[message.metadata.message_id] = answer


def poll_replies(grid: Grid, message_ids: list[str], timeout: float, poll_s: float = POLL_S) -> list[Message]:
    """The replies to the pushed ``message_ids`` that arrive before ``timeout`` seconds."""
    pending = dict.fromkeys(message_ids)
    replies: list[Message] = []
    deadline = time.monotonic() + timeout
    while pending:
        received = list(grid.pull_messages(pending))
        replies += received
        for msg in received:
            pending.pop(msg.metadata.reply_to_message_id, None)
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(poll_s)
    return replies


def reply_allowance(grid: Grid, timeout: float) -> float:
    """Seconds after which a message just pushed counts as unanswered: ``timeout`` on a
    deployment's grid (each node works for itself), :meth:`PartitionGrid.allowance` on
    fedsim's simulation grids."""
    return grid.allowance(timeout) if isinstance(grid, PartitionGrid) else timeout


def send_and_collect(grid: Grid, messages: Iterable[Message], timeout: float) -> list[Message]:
    """Push ``messages``; return the replies that arrive in time (``timeout`` per client)."""
    messages = list(messages)
    if isinstance(grid, PartitionGrid):
        return grid.collect(messages, timeout)
    return poll_replies(grid, list(grid.push_messages(messages)), timeout)


def client_nodes(grid: Grid, num_clients: int, wait_s: float) -> dict[int, int]:
    """Partition id -> node id of the run's clients, once all of them are ready.

    fedsim's simulation grids know the map; on a deployment's grid, wait until
    ``num_clients`` nodes are registered and ask each which partition it plays (round 1
    must not start with part of the federation).
    """
    if isinstance(grid, PartitionGrid):
        return grid.partition_nodes(wait_s)
    deadline = time.monotonic() + wait_s
    while len(nodes := sorted(grid.get_node_ids())) < num_clients:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(nodes)} of {num_clients} client nodes registered "
                               f"after {wait_s:.0f} s (sim.wait_for_nodes_s)")
        time.sleep(0.2)
    queries = [Message(content=RecordDict(), message_type=MessageType.QUERY, dst_node_id=n) for n in nodes]
    node_of: dict[int, int] = {}
    for msg in poll_replies(grid, list(grid.push_messages(queries)), wait_s):
        if msg.has_error():
            raise RuntimeError(f"node {msg.metadata.src_node_id} failed to report its partition: "
                               f"{msg.error.reason}")
        pid = int(next(iter(msg.content.metric_records.values()))["partition-id"])
        if pid in node_of:
            raise RuntimeError(f"two nodes claim partition {pid}")
        node_of[pid] = msg.metadata.src_node_id
    missing = sorted(set(range(num_clients)) - set(node_of))
    if missing:
        raise RuntimeError(f"no node plays partition(s) {missing}; check each node's partition-id")
    return node_of

"""In-process backends: a Flower ``Grid`` whose nodes are served by fedsim's client runtime
in the driver process, without Ray.

Flower's simulation engine starts Ray and a pool of actors (seconds) and adds tens of
milliseconds per client call; for a benchmark grid of hundreds of small runs that
overhead dominates. :class:`InProcessGrid` implements Flower's ``Grid`` interface by
handing the messages to the *same* client runtime the ClientApp runs
(:class:`fedsim.sim.client_app.ClientRuntime`), each partition with its own persistent
Context state (so client state behaves as under Ray). Every fedsim loop runs unchanged on
it. No library offers this: Flower's only simulation backend is Ray.

Messages are delivered when their replies are first pulled: everything pushed since the
last delivery goes to the runtime together, one delivery per message type (a client's
messages keep their order). ``sim.backend: inprocess`` has the runtime handle the clients
of a delivery one after another; ``sim.backend: batched`` has it train them together,
stacked (:mod:`fedsim.clients.batched`).

Timeouts: a client whose handling took longer than ``client.timeout_s`` counts as timed
out, but it runs to the end first (nothing can interrupt it in this process).
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Message
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fedsim.sim.client_app import ClientRuntime, Member, PartitionState
from fedsim.sim.client_states import ClientStateStore
from fedsim.sim.messaging import PartitionGrid


def deliveries(messages: list[Message], partition_of) -> list[list[Message]]:
    """Split ``messages`` into deliveries: each one message type, each partition at most
    once, and no message of a partition before an earlier one of the same partition."""
    batches = []
    while messages:
        kind = messages[0].metadata.message_type
        batch, rest, taken, blocked = [], [], set(), set()
        for msg in messages:
            pid = partition_of(msg)
            if msg.metadata.message_type == kind and pid not in taken and pid not in blocked:
                batch.append(msg)
                taken.add(pid)
            else:
                rest.append(msg)
                blocked.add(pid)
        batches.append(batch)
        messages = rest
    return batches


class InProcessGrid(PartitionGrid):
    """``num_partitions`` clients served in this process by ``runtime``."""

    def __init__(self, runtime: ClientRuntime, num_partitions: int, run_id: int = 1,
                 states: ClientStateStore | None = None) -> None:
        super().__init__(num_partitions, states)
        self._runtime = runtime
        self._run = Run.create_empty(run_id)
        # Messages take their sender from the process's task identity, as in Flower's runtimes
        TaskIdentity.task_id = 1
        TaskIdentity.run_id = run_id
        TaskIdentity.node_id = SUPERLINK_NODE_ID
        self._pending: list[Message] = []

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def client_state(self, partition_id: int) -> PartitionState:
        """The Context state partition ``partition_id`` keeps between its messages."""
        return PartitionState(self._states.state(partition_id), partition_id)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Queue each message for the next delivery."""
        ids = []
        for msg in messages:
            self.partition_of(msg)  # an unknown node is the caller's error, raised now
            msg.metadata.__dict__["_run_id"] = self._run.run_id
            ids.append(self.stamp(msg))
            self._pending.append(msg)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """The replies among ``message_ids``, delivering what is queued first."""
        if self._pending:
            pending, self._pending = self._pending, []
            for batch in deliveries(pending, self.partition_of):
                self._deliver(batch)
        return super().pull_messages(message_ids)

    def _deliver(self, batch: list[Message]) -> None:
        members = [Member(pid, msg.content, self.client_state(pid))
                   for msg in batch for pid in [self.partition_of(msg)]]
        outcomes = self._runtime.run(batch[0].metadata.message_type, members)
        timeout = self._runtime.cfg.client.timeout_s
        for msg, member, outcome in zip(batch, members, outcomes, strict=True):
            self.answer(msg, outcome.member_reply(member.partition_id, timeout))
        self._states.trim()

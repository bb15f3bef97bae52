"""An in-process backend: a Flower ``Grid`` whose nodes are direct ClientApp calls.

Flower's simulation engine starts Ray and a pool of actors (seconds) and adds tens of
milliseconds per client call; for a benchmark grid of hundreds of small runs that
overhead dominates. ``InProcessGrid`` implements Flower's ``Grid`` interface by calling
the *same* ClientApp in the driver process, one message after another, each node with
its own persistent ``Context`` (so client state behaves as under the Ray backend). Every
fedsim loop runs unchanged on it. No library offers this: Flower's only simulation
backend is Ray.

Differences from the Ray backend: clients run sequentially, and a reply cannot be late
(``client.timeout_s`` is not enforced, a stalled client stalls the run).
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Iterable
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

log = logging.getLogger(__name__)

# Flower's error code for an exception raised inside a ClientApp
CLIENT_APP_RAISED_EXCEPTION = 0
FIRST_NODE_ID = 1000


class InProcessGrid(Grid):
    """``num_nodes`` nodes playing partitions ``0..num_nodes-1``, served by ``client_app``."""

    def __init__(self, client_app: ClientApp, num_nodes: int, run_id: int = 1) -> None:
        self._client_app = client_app
        self._run = Run.create_empty(run_id)
        # Messages take their sender from the process's task identity, as in Flower's runtimes
        TaskIdentity.task_id = 1
        TaskIdentity.run_id = run_id
        TaskIdentity.node_id = SUPERLINK_NODE_ID
        self._contexts = {
            node_id: Context(run_id=run_id, node_id=node_id,
                             node_config={"partition-id": pid, "num-partitions": num_nodes},
                             state=RecordDict(), run_config={})
            for pid, node_id in enumerate(range(FIRST_NODE_ID, FIRST_NODE_ID + num_nodes))
        }
        self._replies: dict[str, Message] = {}

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type, ttl=ttl,
                       group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Deliver each message to its node's ClientApp now; keep the reply for pulling."""
        ids = []
        for msg in messages:
            if msg.metadata.dst_node_id not in self._contexts:
                raise ValueError(f"no node {msg.metadata.dst_node_id} in this grid")
            msg.metadata.__dict__["_message_id"] = str(uuid4())
            msg.metadata.__dict__["_run_id"] = self._run.run_id
            self._replies[msg.metadata.message_id] = self._deliver(msg)
            ids.append(msg.metadata.message_id)
        return ids

    def _deliver(self, msg: Message) -> Message:
        try:
            return self._client_app(msg, self._contexts[msg.metadata.dst_node_id])
        except Exception as exc:  # a client's failure is a reply, as under Ray
            log.debug("client app raised: %s", traceback.format_exc())
            error = Error(code=CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(exc).__name__}: {exc}")
            return Message(error=error, reply_to=msg)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Deliver and collect at once: every reply is ready when ``push_messages`` returns."""
        return self.pull_messages(self.push_messages(messages))

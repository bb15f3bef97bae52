"""Nodes that join a running experiment: a SuperNode restarted after a crash, or a late one.

Before round 1 the server maps every partition to the node that plays it
(``client_nodes``; under deployment with a QUERY message). A SuperNode that dies and is restarted registers again, under a
new node id (unless SuperNode authentication ties the id to its key), so the server must
learn where its partition lives now. :class:`NodeWatch` remembers the node ids it has
seen; :meth:`NodeWatch.joined` asks each node registered since which partition it plays
(a QUERY message, as deployment discovery does). In simulation no node ever joins, and a round pays
one ``get_node_ids`` call.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedsim.sim.messaging import PartitionGrid, send_and_collect

log = logging.getLogger(__name__)


class NodeWatch:
    """The node ids a run has seen, starting with those of ``node_of`` (partition -> node)."""

    def __init__(self, node_of: Mapping[int, int]) -> None:
        self.seen = set(node_of.values())

    def joined(self, grid: Grid, timeout: float) -> dict[int, int]:
        """Partition -> node id of the nodes registered since the last look that answered
        within ``timeout`` seconds (one that did not is asked again next time); none on
        fedsim's simulation grids, whose partitions keep their nodes."""
        if isinstance(grid, PartitionGrid):
            return {}
        new = sorted(set(grid.get_node_ids()) - self.seen)
        if not new:
            return {}
        queries = [Message(content=RecordDict(), message_type=MessageType.QUERY, dst_node_id=n) for n in new]
        node_of: dict[int, int] = {}
        for reply in send_and_collect(grid, queries, timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                log.warning("node %d joined but failed to report its partition: %s", node, reply.error.reason)
                continue
            pid = int(next(iter(reply.content.metric_records.values()))["partition-id"])
            self.seen.add(node)
            node_of[pid] = node
            log.info("node %d joined the run: it plays partition %d", node, pid)
        return node_of

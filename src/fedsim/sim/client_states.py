"""The clients' Context states of the simulation backends: kept for the clients that have
taken part, bounded in memory, spilled to the run directory, checkpointed by what changed.

A federation of a million clients whose every participant keeps an error-feedback memory
(or a control variate, a loss state, a gossip model) holds a model-sized record per client
that has ever taken part. :class:`ClientStateStore` (a :class:`fedsim.bounded_store.BoundedStore`)
keeps the most recently used of them in memory up to ``sim.client_state_mb`` and writes the
others to ``<run>/client_states/``, one file per client, reading one back when its client is
next addressed. A checkpoint writes the states of the clients addressed since the previous
checkpoint, one file each under ``checkpoints/clients/``, and records every stateful
client's latest file (the manifest); resume reads a client's file when that client is next
addressed.

The store lives in the server's process under every simulation backend: the in-process grids
hand their runtime each addressed client's state; under Ray
(:class:`fedsim.sim.ray_nodes.GroupedGrid`) a client's state travels to its node with the
client's message and comes back with its reply, so the nodes hold no state between messages
and the run directory (spilled states, checkpoints) is the server machine's alone, on one
machine or a cluster.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import ArrayRecord, RecordDict

from fedsim.bounded_store import BoundedStore


def state_bytes(state: RecordDict) -> int:
    """The bytes of the arrays in ``state`` (its config and metric records count as nothing)."""
    return sum(len(array.data) for record in state.values() if isinstance(record, ArrayRecord)
               for array in record.values())


class ClientStateStore(BoundedStore):
    """Each client's Context state (a ``RecordDict``) by partition id; a state without
    records is dropped.

    Parameters
    ----------
    max_bytes : int
        The most bytes of arrays held in memory; the least recently used states beyond it
        are spilled (:meth:`trim`).
    spill_dir : Path or None
        Where spilled states are written, one file per client (created when first needed);
        None keeps every state in memory.
    """

    def __init__(self, max_bytes: int, spill_dir: Path | None) -> None:
        super().__init__(max_bytes, spill_dir, state_bytes)

    def empty(self, value: RecordDict) -> bool:
        return not len(value)

    def state(self, partition_id: int) -> RecordDict:
        """The client's state, to read and change (read back from its file when spilled)."""
        state = self.get(partition_id, changing=True)
        if state is None:
            state = RecordDict()
            self.put(partition_id, state)
        return state

"""The clients' Context states of the simulation backends: kept for the clients that have
taken part, bounded in memory, spilled to the run directory, checkpointed by what changed.

A federation of a million clients whose every participant keeps an error-feedback memory
(or a control variate, a loss state, a gossip model) holds a model-sized record per client
that has ever taken part. :class:`ClientStateStore` keeps the most recently used of them in
memory up to ``sim.client_state_mb`` and writes the others to ``<run>/client_states/``, one
file per client, reading one back when its client is next addressed. A checkpoint writes
the states of the clients addressed since the previous checkpoint, one file each under
``checkpoints/clients/``, and records every stateful client's latest file (the manifest),
so a checkpoint costs the clients that changed, not all that ever took part; resume reads a
client's file when that client is next addressed.

The store lives in the server's process under every simulation backend: the in-process grids
hand their runtime each addressed client's state; under Ray
(:class:`fedsim.sim.ray_nodes.GroupedGrid`) a client's state travels to its node with the
client's message and comes back with its reply, so the nodes hold no state between messages
and the run directory (spilled states, checkpoints) is the server machine's alone, on one
machine or a cluster.
"""

from __future__ import annotations

import pickle
from collections import OrderedDict
from pathlib import Path

from flwr.app import ArrayRecord, RecordDict


def state_bytes(state: RecordDict) -> int:
    """The bytes of the arrays in ``state`` (its config and metric records count as nothing)."""
    return sum(len(array.data) for record in state.values() if isinstance(record, ArrayRecord)
               for array in record.values())


def _write(path: Path, state: RecordDict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL))
    tmp.replace(path)


def _read(path: Path) -> RecordDict:
    return pickle.loads(path.read_bytes())  # noqa: S301 - this run's own files


class ClientStateStore:
    """Each client's Context state (a ``RecordDict``) by partition id.

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
        self.max_bytes = max_bytes if spill_dir is not None else float("inf")
        self.spill_dir = None if spill_dir is None else Path(spill_dir)
        self._memory: OrderedDict[int, RecordDict] = OrderedDict()
        self._sizes: dict[int, int] = {}  # bytes of each state in memory, as of the last trim
        self._total = 0
        self._recent: set[int] = set()  # handed out since the last trim: their sizes may have changed
        self._files: dict[int, Path] = {}  # the latest copy of each state not in memory
        self._changed: set[int] = set()  # addressed since the last checkpoint
        self._saved: dict[int, str] = {}  # the latest checkpoint file of each stateful client

    def state(self, partition_id: int) -> RecordDict:
        """The client's state, to read and change (read back from its file when spilled)."""
        if partition_id in self._memory:
            self._memory.move_to_end(partition_id)
        else:
            path = self._files.pop(partition_id, None)
            self._memory[partition_id] = RecordDict() if path is None else _read(path)
        self._changed.add(partition_id)
        self._recent.add(partition_id)
        return self._memory[partition_id]

    def replace(self, partition_id: int, state: RecordDict) -> None:
        """Make ``state`` the client's state (its node's copy, back with a reply)."""
        self._files.pop(partition_id, None)
        self._memory[partition_id] = state
        self._memory.move_to_end(partition_id)
        self._changed.add(partition_id)
        self._recent.add(partition_id)

    def holders(self) -> set[int]:
        """The clients that may hold a state."""
        return set(self._memory) | set(self._files)

    def in_memory_bytes(self) -> int:
        """Bytes of the states in memory, as of the last :meth:`trim`."""
        return self._total

    def trim(self) -> None:
        """Drop the empty states of the clients addressed since the last trim, and spill the
        least recently used states until those in memory fit ``max_bytes`` (costs the
        clients addressed and spilled, not every state held)."""
        for pid in self._recent:
            self._total -= self._sizes.pop(pid, 0)
            if pid not in self._memory:
                continue
            if not len(self._memory[pid]):
                del self._memory[pid]
            else:
                self._sizes[pid] = state_bytes(self._memory[pid])
                self._total += self._sizes[pid]
        self._recent.clear()
        while self._total > self.max_bytes:
            pid, state = self._memory.popitem(last=False)
            self._total -= self._sizes.pop(pid)
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            self._files[pid] = self.spill_dir / f"{pid}.pkl"
            _write(self._files[pid], state)

    def save(self, directory: Path, step: int) -> dict[int, str]:
        """Write the states of the clients addressed since the last save to ``directory``
        (``<pid>-<step>.pkl``); return the manifest, every stateful client's latest file."""
        directory.mkdir(parents=True, exist_ok=True)
        for pid in sorted(self._changed):
            if pid in self._memory:
                state = self._memory[pid]
            elif pid in self._files:
                state = _read(self._files[pid])
            else:
                state = RecordDict()
            if len(state):
                name = f"{pid}-{step:05d}.pkl"
                _write(directory / name, state)
                self._saved[pid] = name
            else:
                self._saved.pop(pid, None)
        self._changed.clear()
        return dict(self._saved)

    def load(self, manifest: dict[int, str], directory: Path) -> None:
        """Continue from a checkpoint's ``manifest`` (:meth:`save`): every state is
        forgotten, and each client of the manifest gets its file back when next addressed."""
        self._memory.clear()
        self._sizes.clear()
        self._total = 0
        self._recent.clear()
        self._changed.clear()
        self._files = {int(pid): directory / name for pid, name in manifest.items()}
        self._saved = {int(pid): name for pid, name in manifest.items()}

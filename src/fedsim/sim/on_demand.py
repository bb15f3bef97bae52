"""Federations whose clients' data is made when a client is sampled, and the server's bounded
test set.

A federated dataset is a function from client id to that client's arrays: with Synthetic's
devices generated from ``(seed, device)`` (:class:`fedsim.data.synthetic.SyntheticDevices`),
a run of a million clients holds a few numbers per client, the arrays of the clients it
trains (and the most recent ones, :class:`fedsim.data.client_cache.ClientCache`), and its
test set; eager generation of the same config gives the same numbers (tested).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from fedsim.data import ArrayDataset
from fedsim.data.client_cache import ClientCache
from fedsim.data.partition import split_client
from fedsim.data.synthetic import SyntheticDevices
from fedsim.seeding import derive_seed


def held_out_rows(total: int, limit: int | None, seed: int) -> np.ndarray | None:
    """The rows of a held-out set of ``total`` rows that the server keeps: a seeded, sorted
    sample of ``limit`` of them (``eval.test_samples``), or None (all) when there is no limit
    or the set is no larger."""
    if limit is None or limit >= total:
        return None
    return np.sort(np.random.default_rng(derive_seed(seed, "server-test")).choice(total, limit, replace=False))


def client_split(num_rows: int, test_fraction: float, seed: int, client: int) -> tuple[np.ndarray, np.ndarray]:
    """A client's local ``(train, test)`` rows among its ``num_rows`` rows (``partition.client_test_fraction``)."""
    return split_client(np.arange(num_rows), test_fraction, derive_seed(seed, "client-split", client))


@dataclass(frozen=True, eq=False)
class OnDemandSynthetic:
    """Synthetic's federation under ``partition.scheme: natural``, one client per device, each
    device generated when its client's data is asked for.

    Parameters
    ----------
    devices : SyntheticDevices
        The generator (``data.synthetic``, the run's seed, ``data.test_fraction``).
    client_test_fraction : float
        ``partition.client_test_fraction`` of each device's training rows: the client's own test split.
    seed : int
        The run's seed (client splits, the server's test sample).
    test_samples : int or None
        ``eval.test_samples``: the size of the server's test sample (None: every held-out row).
    cache : ClientCache
        The clients' arrays kept for reuse.
    """

    devices: SyntheticDevices
    client_test_fraction: float
    seed: int
    test_samples: int | None
    cache: ClientCache

    @property
    def num_clients(self) -> int:
        return self.devices.num_devices

    @property
    def num_classes(self) -> int:
        return self.devices.num_classes

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.devices.dim,)

    def client(self, partition_id: int, server_round: int | None = None) -> tuple[ArrayDataset, ArrayDataset]:
        """The client's (train, test) data (the same every round)."""
        if not 0 <= partition_id < self.num_clients:
            raise ValueError(f"partition id {partition_id} out of range 0..{self.num_clients - 1}")
        return self.cache.get(partition_id, lambda: self._build(partition_id))

    def _build(self, partition_id: int) -> tuple[ArrayDataset, ArrayDataset]:
        train = self.devices.device(partition_id)[0]
        return tuple(train.subset(rows) for rows in client_split(len(train), self.client_test_fraction, self.seed,
                                                                  partition_id))

    def train_sizes(self) -> np.ndarray:
        """Each client's number of training rows, without generating any."""
        rows = self.devices.train_sizes
        held = np.minimum(np.rint(self.client_test_fraction * rows).astype(np.int64), np.maximum(rows - 1, 0))
        return rows - held

    def label_counts(self, with_test: bool = False) -> np.ndarray:
        """Each client's label counts in its training split, or its whole partition
        ``with_test`` (clients x classes); generates every device."""
        return np.stack([sum(np.bincount(part.y, minlength=self.num_classes)
                             for part in self.client(pid)[: 2 if with_test else 1])
                         for pid in range(self.num_clients)]).astype(np.int64)

    def calibration_inputs(self, count: int) -> np.ndarray:
        """The first ``count`` training inputs, client after client (the pool's first rows)."""
        parts, have = [], 0
        for pid in range(self.num_clients):
            if have >= count:
                break
            parts.append(self.devices.device(pid)[0].x[: count - have])
            have += len(parts[-1])
        return np.concatenate(parts)

    @functools.cached_property
    def test(self) -> ArrayDataset:
        """The server's test set: the held-out rows of every device, device after device, or
        the ``test_samples`` of them ``held_out_rows`` picks; generated on first use."""
        counts = self.devices.test_sizes
        offsets = np.concatenate([[0], np.cumsum(counts)])
        rows = held_out_rows(int(offsets[-1]), self.test_samples, self.seed)
        if rows is None:
            rows = np.arange(offsets[-1])
        owners = np.searchsorted(offsets, rows, side="right") - 1
        x = np.empty((len(rows), self.devices.dim), dtype=np.float32)
        y = np.empty(len(rows), dtype=np.int64)
        starts = np.concatenate([[0], np.flatnonzero(np.diff(owners)) + 1, [len(rows)]])
        for a, b in zip(starts[:-1], starts[1:], strict=True):
            device = int(owners[a])
            held = self.devices.held_out(device, rows[a:b] - offsets[device])
            x[a:b], y[a:b] = held.x, held.y
        return ArrayDataset(x=x, y=y, num_classes=self.num_classes, name="synthetic", groups=owners.astype(np.int64))

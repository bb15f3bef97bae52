"""The arrays of recently used clients, kept up to a number of bytes (least recently used
out first)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import TypeVar

from fedsim.data.array_dataset import ArrayDataset

T = TypeVar("T", bound=tuple[ArrayDataset, ...])


def nbytes(datasets: tuple[ArrayDataset, ...]) -> int:
    """Bytes of the arrays of ``datasets``."""
    return sum(d.x.nbytes + d.y.nbytes + (0 if d.groups is None else d.groups.nbytes) for d in datasets)


class ClientCache:
    """A least-recently-used cache of clients' datasets bounded in bytes.

    Hand-written (an ``OrderedDict``) because ``functools.lru_cache`` bounds entries, not
    bytes, and a client of a heavy-tailed federation may hold a thousand times the median's
    rows. An entry larger than the whole bound is returned and not kept.

    Parameters
    ----------
    max_bytes : int
        The most bytes of arrays kept; 0 keeps nothing.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"ClientCache: max_bytes must be >= 0; got {max_bytes}")
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[Hashable, tuple[T, int]] = OrderedDict()

    def get(self, key: Hashable, build: Callable[[], T]) -> T:
        """The entry of ``key``, built by ``build()`` when it is not kept."""
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key][0]
        value = build()
        size = nbytes(value)
        if size <= self.max_bytes:
            self._entries[key] = (value, size)
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, (_, dropped) = self._entries.popitem(last=False)
                self.bytes -= dropped
        return value

    def __len__(self) -> int:
        return len(self._entries)

"""Per-client values bounded in memory, spilled to files, checkpointed by what changed.

A federation of a million clients whose every participant leaves a model-sized value behind
(an error-feedback memory, a control variate, the server's copy of an EF21 estimate) holds
one per client that has ever taken part. :class:`BoundedStore` keeps the most recently used
of them in memory up to ``max_bytes`` and writes the others to ``spill_dir``, one file per
client, reading one back when its client is next used. A checkpoint (:meth:`save`) writes the
values of the clients used since the previous checkpoint, one file each, and returns every
client's latest file (the manifest), so a checkpoint costs the clients that changed, not all
that ever took part; :meth:`load` continues from a manifest, reading a client's file when that
client is next used. Written by hand: no maintained library offers a size-bounded LRU mapping
that spills to files and checkpoints incrementally (``shelve`` and ``diskcache`` keep
everything on disk and have no notion of what changed since a checkpoint).
"""

from __future__ import annotations

import pickle
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from pathlib import Path
from typing import Any


def _write(path: Path, value: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))
    tmp.replace(path)


def _read(path: Path) -> Any:
    return pickle.loads(path.read_bytes())  # noqa: S301 - this run's own files


class BoundedStore:
    """Values by client id, the most recently used in memory up to ``max_bytes``.

    Parameters
    ----------
    max_bytes : int
        The most bytes (``size``) held in memory; the least recently used values beyond it
        are spilled (:meth:`trim`).
    spill_dir : Path or None
        Where spilled values are written, one file per client (created when first needed);
        None keeps every value in memory.
    size : callable
        The bytes a value weighs in memory.
    """

    def __init__(self, max_bytes: int, spill_dir: Path | None, size: Callable[[Any], int]) -> None:
        self.max_bytes = max_bytes if spill_dir is not None else float("inf")
        self.spill_dir = None if spill_dir is None else Path(spill_dir)
        self._size = size
        self._memory: OrderedDict[Hashable, Any] = OrderedDict()
        self._sizes: dict[Hashable, int] = {}  # bytes of each value in memory, as of the last trim
        self._total = 0
        self._recent: set[Hashable] = set()  # used since the last trim: their sizes may have changed
        self._files: dict[Hashable, Path] = {}  # the latest copy of each value not in memory
        self._changed: set[Hashable] = set()  # changed since the last checkpoint
        self._saved: dict[Hashable, str] = {}  # the latest checkpoint file of each client

    def empty(self, value: Any) -> bool:
        """Whether ``value`` holds nothing worth keeping (dropped at :meth:`trim`); no value is, here."""
        return False

    def __contains__(self, key: Hashable) -> bool:
        return key in self._memory or key in self._files

    def __len__(self) -> int:
        return len(self._memory) + len(self._files)

    def keys(self) -> set[Hashable]:
        """The clients that hold a value."""
        return set(self._memory) | set(self._files)

    def get(self, key: Hashable, *, changing: bool = False) -> Any | None:
        """The client's value (read back from its file when spilled), or None; ``changing``:
        the caller changes it in place (the next checkpoint writes it)."""
        if key in self._memory:
            self._memory.move_to_end(key)
        elif key in self._files:
            self._memory[key] = _read(self._files.pop(key))
        else:
            return None
        self._recent.add(key)
        if changing:
            self._changed.add(key)
        return self._memory[key]

    def put(self, key: Hashable, value: Any) -> None:
        """Make ``value`` the client's value."""
        self._files.pop(key, None)
        self._memory[key] = value
        self._memory.move_to_end(key)
        self._recent.add(key)
        self._changed.add(key)

    def pop(self, key: Hashable) -> Any | None:
        """Remove the client's value and return it (None when it had none)."""
        self._changed.add(key)
        if key in self._memory:
            self._recent.discard(key)
            self._total -= self._sizes.pop(key, 0)
            return self._memory.pop(key)
        path = self._files.pop(key, None)
        return None if path is None else _read(path)

    def items(self) -> Iterator[tuple[Hashable, Any]]:
        """Every (client, value), by client; spilled values are read from their files and stay
        there (the memory held is the bound and one value)."""
        for key in sorted(self.keys()):
            yield key, self._memory[key] if key in self._memory else _read(self._files[key])

    def in_memory_bytes(self) -> int:
        """Bytes of the values in memory, as of the last :meth:`trim`."""
        return self._total

    def trim(self) -> None:
        """Drop the :meth:`empty` values of the clients used since the last trim, and spill
        the least recently used values until those in memory fit ``max_bytes`` (costs the
        clients used and spilled, not every value held)."""
        for key in self._recent:
            self._total -= self._sizes.pop(key, 0)
            if key not in self._memory:
                continue
            if self.empty(self._memory[key]):
                del self._memory[key]
            else:
                self._sizes[key] = self._size(self._memory[key])
                self._total += self._sizes[key]
        self._recent.clear()
        while self._total > self.max_bytes:
            key, value = self._memory.popitem(last=False)
            self._total -= self._sizes.pop(key)
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            self._files[key] = self.spill_dir / f"{key}.pkl"
            _write(self._files[key], value)

    def save(self, directory: Path, step: int) -> dict[Hashable, str]:
        """Write the values changed since the last save to ``directory`` (``<key>-<step>.pkl``);
        return the manifest, every client's latest file (``directory`` is made when first needed)."""
        for key in sorted(self._changed):
            if key in self._memory:
                value = self._memory[key]
            elif key in self._files:
                value = _read(self._files[key])
            else:
                value = None
            if value is not None and not self.empty(value):
                name = f"{key}-{step:05d}.pkl"
                directory.mkdir(parents=True, exist_ok=True)
                _write(directory / name, value)
                self._saved[key] = name
            else:
                self._saved.pop(key, None)
        self._changed.clear()
        return dict(self._saved)

    def clear(self) -> None:
        """Forget every value (the next :meth:`save` returns an empty manifest)."""
        self._memory.clear()
        self._sizes.clear()
        self._total = 0
        self._recent.clear()
        self._changed.clear()
        self._files.clear()
        self._saved.clear()

    def load(self, manifest: dict[Hashable, str], directory: Path) -> None:
        """Continue from a checkpoint's ``manifest`` (:meth:`save`): every value is forgotten,
        and each client of the manifest gets its file back when next used."""
        self.clear()
        self._files = {key: directory / name for key, name in manifest.items()}
        self._saved = dict(manifest)

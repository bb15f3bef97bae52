"""A partitioned dataset cached on disk, for processes that cannot keep it in memory.

A deployed SuperNode runs every message in a new ``flwr-clientapp`` process, so a cache in
memory dies with each message and the data would be loaded and partitioned again every
time. With the disk cache on (:func:`enable`; fedsim's deployed ClientApp turns it on),
the first process to need a partition builds it and writes it under
``<cache dir>/partitions/<key>/``; every later process of that node, in this run and in
the next runs of the same settings, maps it back from disk in milliseconds.

The key is a SHA-256 of the builder's arguments (the data and partition settings as JSON,
and the seed), of fedsim's version, and of the size and modification time of every file
under the data settings' ``path`` (so a replaced data file is never served from the cache).
An entry is written into a temporary directory and renamed into place, so a reader sees
a whole entry or none, and nodes sharing a cache directory may build the same entry at
once (the first rename wins; the others discard theirs).

The cache directory is ``$FEDSIM_CACHE_DIR``, else ``$XDG_CACHE_HOME/fedsim``, else
``~/.cache/fedsim``. Entries are never expired; delete the directory to reclaim the space.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from fedsim import __version__
from fedsim.data.array_dataset import ArrayDataset

CACHE_DIR_ENV = "FEDSIM_CACHE_DIR"
FORMAT = 1  # bump when the layout of an entry changes

T = TypeVar("T")
Field = ArrayDataset | Sequence[np.ndarray]


def default_cache_dir() -> Path:
    """``$FEDSIM_CACHE_DIR``, else ``$XDG_CACHE_HOME/fedsim``, else ``~/.cache/fedsim``."""
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fedsim"


def source_fingerprint(path: str | Path | None) -> list[tuple[str, int, int]]:
    """(path, size, mtime in ns) of ``path``, or of every file under it if it is a directory."""
    if path is None:
        return []
    root = Path(path).expanduser()
    if not root.exists():
        return [(str(root), -1, -1)]
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    return [(str(f), (st := f.stat()).st_size, st.st_mtime_ns) for f in files]


class PartitionCache:
    """Partitioned datasets stored under ``root/partitions``, one directory per key.

    An entry holds named fields, each an :class:`ArrayDataset` (its arrays as ``.npy``
    files, inputs memory-mapped on load so that a node reads only the rows it uses) or a
    sequence of index arrays (one per client, stored concatenated with their offsets).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser() / "partitions"

    @staticmethod
    def key(settings: Mapping[str, Any], sources: Iterable[tuple[str, int, int]] = ()) -> str:
        """The entry name of ``settings`` (JSON-serialisable) read from ``sources``."""
        text = json.dumps({"fedsim": __version__, "format": FORMAT, "settings": settings,
                           "sources": list(sources)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def path(self, key: str) -> Path:
        return self.root / key

    def load(self, key: str) -> dict[str, Field] | None:
        """The fields stored under ``key``, or None when there is no such entry."""
        entry = self.path(key)
        try:
            meta = json.loads((entry / "meta.json").read_text())
        except FileNotFoundError:
            return None
        fields: dict[str, Field] = {}
        for name, info in meta["fields"].items():
            if info["kind"] == "dataset":
                groups = entry / f"{name}.groups.npy"
                fields[name] = ArrayDataset(
                    x=np.load(entry / f"{name}.x.npy", mmap_mode="c"), y=np.load(entry / f"{name}.y.npy"),
                    num_classes=info["num_classes"], name=info["name"],
                    groups=np.load(groups) if groups.exists() else None)
            else:
                values, offsets = np.load(entry / f"{name}.values.npy"), np.load(entry / f"{name}.offsets.npy")
                fields[name] = tuple(values[a:b] for a, b in zip(offsets[:-1], offsets[1:], strict=True))
        return fields

    def store(self, key: str, fields: Mapping[str, Field]) -> Path:
        """Write ``fields`` under ``key`` atomically; return the entry's directory."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=self.root))
        meta: dict[str, Any] = {"fields": {}}
        for name, value in fields.items():
            if isinstance(value, ArrayDataset):
                np.save(tmp / f"{name}.x.npy", value.x)
                np.save(tmp / f"{name}.y.npy", value.y)
                if value.groups is not None:
                    np.save(tmp / f"{name}.groups.npy", value.groups)
                meta["fields"][name] = {"kind": "dataset", "num_classes": value.num_classes, "name": value.name}
            else:
                parts = [np.asarray(p, dtype=np.int64) for p in value]
                np.save(tmp / f"{name}.values.npy", np.concatenate(parts) if parts else np.empty(0, np.int64))
                np.save(tmp / f"{name}.offsets.npy", np.cumsum([0, *map(len, parts)]))
                meta["fields"][name] = {"kind": "indices"}
        (tmp / "meta.json").write_text(json.dumps(meta))
        target = self.path(key)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "meta.json").exists():
                raise
            shutil.rmtree(tmp)  # another process stored the same entry first
        return target


_ACTIVE: PartitionCache | None = None


def enable(root: str | Path | None = None) -> PartitionCache:
    """Turn the disk cache on in this process (in ``root``, else :func:`default_cache_dir`)."""
    global _ACTIVE
    _ACTIVE = PartitionCache(default_cache_dir() if root is None else root)
    return _ACTIVE


def disable() -> None:
    """Turn the disk cache off in this process (the default)."""
    global _ACTIVE
    _ACTIVE = None


def active() -> PartitionCache | None:
    """This process's disk cache, or None when it is off."""
    return _ACTIVE


def cached(result_type: Callable[..., T]) -> Callable[[Callable[[str, str, int], T]], Callable[[str, str, int], T]]:
    """Decorate a builder ``(data_json, partition_json, seed) -> result_type`` so that, while
    the disk cache is on, its result is read from disk when present and stored when built.

    ``result_type`` is a dataclass whose fields are ArrayDatasets or sequences of index
    arrays, or None (not stored; read back as the field's default); the data settings'
    ``path`` (when they name one) is fingerprinted into the key.
    """

    def decorate(build: Callable[[str, str, int], T]) -> Callable[[str, str, int], T]:
        @functools.wraps(build)
        def load_or_build(data_json: str, partition_json: str, seed: int) -> T:
            cache = active()
            if cache is None:
                return build(data_json, partition_json, seed)
            settings = {"data": json.loads(data_json), "partition": json.loads(partition_json), "seed": seed}
            key = cache.key(settings, source_fingerprint(settings["data"].get("path")))
            if (fields := cache.load(key)) is not None:
                return result_type(**fields)
            result = build(data_json, partition_json, seed)
            cache.store(key, {f.name: value for f in dataclasses.fields(result)
                              if (value := getattr(result, f.name)) is not None})
            return result

        return load_or_build

    return decorate

"""The one registry of algorithms: the entry points of the group ``fedsim.algorithms`` (and of
third-party client features: the group ``fedsim.client_features``).

fedsim's own algorithms are registered in its ``pyproject.toml`` exactly as a third-party
package registers its own, so an installed package adds an algorithm to ``fedsim run``,
``validate``, ``bench``, ``algorithms``, the combination sweep and :mod:`fedsim.flower`::

    [project.entry-points."fedsim.algorithms"]
    feddyn = "fedsim_feddyn:FedDyn"

An entry point is loaded (its module imported) only when its algorithm is asked for.
"""

from __future__ import annotations

import functools
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fedsim.algorithms.api import Algorithm

GROUP = "fedsim.algorithms"
FEATURE_GROUP = "fedsim.client_features"
"""Third-party client features (:class:`fedsim.clients.features.ClientFeature` classes)."""


class UnknownAlgorithm(ValueError):
    """A name no installed package registers."""


@functools.cache
def _entries() -> dict[str, EntryPoint]:
    found: dict[str, EntryPoint] = {}
    for entry in entry_points(group=GROUP):
        if entry.name in found and found[entry.name].value != entry.value:
            raise RuntimeError(f"algorithm {entry.name!r} is registered twice: {found[entry.name].value} and "
                               f"{entry.value} (entry-point group {GROUP})")
        found[entry.name] = entry
    return found


def names() -> list[str]:
    """Every registered algorithm's name, sorted."""
    return sorted(_entries())


def unknown_message(name: object) -> str:
    return f"{name!r} is not an algorithm; known: {', '.join(names())}"


def get(name: str) -> type[Algorithm]:
    """The algorithm registered as ``name``; :class:`UnknownAlgorithm` if there is none."""
    if not isinstance(name, str) or name not in _entries():
        raise UnknownAlgorithm(unknown_message(name))
    return _load(name)


@functools.cache
def _load(name: str) -> type[Algorithm]:
    entry = _entries()[name]
    algorithm = entry.load()
    if getattr(algorithm, "name", None) != name:
        raise RuntimeError(f"entry point {name!r} ({entry.value}) loads {algorithm!r}, whose name is "
                           f"{getattr(algorithm, 'name', None)!r}")
    return algorithm


def all_algorithms() -> dict[str, type[Algorithm]]:
    """Every registered algorithm, loaded, by name."""
    return {name: get(name) for name in names()}


@functools.cache
def client_feature_classes() -> tuple[type, ...]:
    """Every class registered in the entry-point group ``fedsim.client_features``, loaded, by name."""
    return tuple(entry.load() for entry in sorted(entry_points(group=FEATURE_GROUP), key=lambda e: e.name))

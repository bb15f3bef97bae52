"""Attack objects, the name registry, and the choice of Byzantine clients.

An attack object is small, printable data (its parameters) plus one verb, ``__call__``.
``acts_on`` says where the engine applies it:

- ``"updates"``: ``attack(updates, byzantine, generator=None) -> updates`` on the stacked
  ``(N, D)`` updates, server side, before aggregation;
- ``"data"``: ``attack(labels) -> labels`` on a Byzantine client's training labels;
- ``"none"``: nothing to apply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from fedsim.attacks.data_poisoning import label_flip
from fedsim.attacks.model_poisoning import (
    ByzantineRows,
    alie,
    gaussian_noise,
    ipm,
    scaled_update,
    sign_flip,
)

__all__ = [
    "ALIE",
    "ATTACKS",
    "GaussianNoise",
    "IPM",
    "LabelFlip",
    "NoAttack",
    "ScaledUpdate",
    "SignFlip",
    "build_attack",
    "choose_byzantine",
]

_SALT_BYZANTINE = 201


@dataclass(frozen=True)
class NoAttack:
    """No attack (the clean run)."""

    name: ClassVar[str] = "none"
    acts_on: ClassVar[str] = "none"


@dataclass(frozen=True)
class SignFlip:
    """Byzantine rows send ``-scale * x_i``. See :func:`fedsim.attacks.sign_flip`."""

    scale: float = 1.0
    name: ClassVar[str] = "sign_flip"
    acts_on: ClassVar[str] = "updates"

    def __call__(self, updates: torch.Tensor, byzantine: ByzantineRows,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        return sign_flip(updates, byzantine, self.scale)


@dataclass(frozen=True)
class ScaledUpdate:
    """Byzantine rows send ``scale * x_i``. See :func:`fedsim.attacks.scaled_update`."""

    scale: float = 10.0
    name: ClassVar[str] = "scaled"
    acts_on: ClassVar[str] = "updates"

    def __call__(self, updates: torch.Tensor, byzantine: ByzantineRows,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        return scaled_update(updates, byzantine, self.scale)


@dataclass(frozen=True)
class GaussianNoise:
    """Byzantine rows send ``N(0, std^2 I)``. See :func:`fedsim.attacks.gaussian_noise`."""

    std: float = 1.0
    name: ClassVar[str] = "gaussian"
    acts_on: ClassVar[str] = "updates"

    def __call__(self, updates: torch.Tensor, byzantine: ByzantineRows,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        return gaussian_noise(updates, byzantine, self.std, generator)


@dataclass(frozen=True)
class ALIE:
    """A Little Is Enough, ``mu - z sigma``. See :func:`fedsim.attacks.alie`."""

    z: float | None = None
    name: ClassVar[str] = "alie"
    acts_on: ClassVar[str] = "updates"

    def __call__(self, updates: torch.Tensor, byzantine: ByzantineRows,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        return alie(updates, byzantine, self.z)


@dataclass(frozen=True)
class IPM:
    """Inner-product manipulation, ``-epsilon * mean(benign)``. See :func:`fedsim.attacks.ipm`."""

    epsilon: float = 0.1
    name: ClassVar[str] = "ipm"
    acts_on: ClassVar[str] = "updates"

    def __call__(self, updates: torch.Tensor, byzantine: ByzantineRows,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        return ipm(updates, byzantine, self.epsilon)


@dataclass(frozen=True)
class LabelFlip:
    """Byzantine clients train on ``C - 1 - y``. See :func:`fedsim.attacks.label_flip`."""

    num_classes: int
    name: ClassVar[str] = "label_flip"
    acts_on: ClassVar[str] = "data"

    def __call__(self, labels: torch.Tensor) -> torch.Tensor:
        return label_flip(labels, self.num_classes)


ATTACKS: dict[str, type] = {
    cls.name: cls for cls in (NoAttack, SignFlip, ScaledUpdate, GaussianNoise, ALIE, IPM, LabelFlip)
}
"""Attack classes by registry name: none, sign_flip, scaled, gaussian, alie, ipm, label_flip."""


def build_attack(name: str, **kwargs: object) -> object:
    """The attack registered as ``name``, built with ``kwargs`` (its dataclass fields).

    Examples
    --------
    >>> build_attack("sign_flip", scale=2.0)
    SignFlip(scale=2.0)
    """
    if name not in ATTACKS:
        raise ValueError(f"attack {name!r} is not an attack; known: {', '.join(ATTACKS)}")
    try:
        return ATTACKS[name](**kwargs)
    except TypeError as exc:
        raise ValueError(f"attack {name!r}: bad parameters {sorted(kwargs)}: {exc}") from exc


def choose_byzantine(num_clients: int, fraction: float, seed: int = 0) -> list[int]:
    """The fixed, seeded set of Byzantine client ids.

    ``f = floor(fraction * N)`` clients (so the Byzantine share never exceeds ``fraction``;
    a 1e-9 tolerance absorbs float error such as ``0.3 * 10``) drawn without replacement.

    Parameters
    ----------
    num_clients : int
        Total number of clients ``N``.
    fraction : float
        Byzantine fraction, in ``[0, 1)``.
    seed : int, default 0
        Seed (non-negative).

    Returns
    -------
    list of int
        Sorted ids.
    """
    if num_clients < 1:
        raise ValueError(f"choose_byzantine: num_clients must be >= 1, got {num_clients}")
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"choose_byzantine: fraction must be in [0, 1), got {fraction}")
    if int(seed) != seed or seed < 0:
        raise ValueError(f"choose_byzantine: seed must be a non-negative integer, got {seed!r}")
    count = int(np.floor(fraction * num_clients + 1e-9))
    rng = np.random.default_rng([int(seed), _SALT_BYZANTINE])
    return sorted(int(i) for i in rng.choice(num_clients, size=count, replace=False))

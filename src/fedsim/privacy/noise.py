"""Gaussian noise from a cryptographic stream, reproducible under the run's seed.

The noise of a release is drawn from SHAKE-256 (FIPS 202, an extendable-output function)
keyed by the run's seed and the release's identity (purpose, round, client, step): its
bytes are uniform 64-bit words, turned into standard normal draws by the Box-Muller
transform (``z = sqrt(-2 ln u1) (cos 2 pi u2, sin 2 pi u2)``, with ``u`` of 53 bits in (0, 1]).
The same seed gives the same noise on every machine and process (tests rely on it); a run
whose seed is secret gets noise no one can predict or replay without it.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch

__all__ = ["gaussian_noise"]


def gaussian_noise(numel: int, std: float, *key: int | str) -> torch.Tensor:
    """``numel`` independent N(0, ``std``^2) draws (float64) of the stream keyed by ``key``."""
    pairs = (numel + 1) // 2
    stream = hashlib.shake_256("/".join(str(part) for part in key).encode()).digest(16 * pairs)
    words = np.frombuffer(stream, dtype="<u8").reshape(2, pairs)
    u1 = ((words[0] >> np.uint64(11)).astype(np.float64) + 1.0) * 2.0**-53
    u2 = (words[1] >> np.uint64(11)).astype(np.float64) * 2.0**-53
    radius = np.sqrt(-2.0 * np.log(u1))
    draws = np.concatenate([radius * np.cos(2 * math.pi * u2), radius * np.sin(2 * math.pi * u2)])[:numel]
    return torch.from_numpy(draws * std)

"""Gaussian noise from a cryptographic keystream, reproducible under the run's seed.

The noise of a release (a client's round, a DP-SGD step) is drawn from the AES-256-CTR
keystream (NIST SP 800-38A; the generator of NIST SP 800-90A's CTR_DRBG) under the key
SHA-256(run seed, purpose, round, client, step): its bytes are uniform 64-bit words, turned
into standard normal draws by the Box-Muller transform
(``z = sqrt(-2 ln u1) (cos 2 pi u2, sin 2 pi u2)``, ``u`` of 53 bits, ``u1`` in (0, 1]).
The same seed gives the same noise on every machine and process (tests rely on it); a run
whose seed is secret gets noise no one can predict or replay without it.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

__all__ = ["gaussian_noise", "gaussian_noise_rows"]

_MANTISSA = (1 << 53) - 1


def _keystream(nbytes: int, key: Sequence[int | str]) -> bytes:
    digest = hashlib.sha256("/".join(str(part) for part in key).encode()).digest()
    return Cipher(algorithms.AES(digest), modes.CTR(bytes(16))).encryptor().update(bytes(nbytes))


def gaussian_noise_rows(numel: int, std: float, keys: Sequence[Sequence[int | str]]) -> torch.Tensor:
    """``(len(keys), numel)`` independent N(0, ``std``^2) draws (float64), row i from the
    stream keyed by ``keys[i]`` (a row's draws do not depend on the other rows)."""
    pairs = (numel + 1) // 2
    stream = b"".join(_keystream(16 * pairs, key) for key in keys)
    words = torch.frombuffer(bytearray(stream), dtype=torch.int64).reshape(len(keys), 2, pairs)
    u1 = ((words[:, 0] >> 11) & _MANTISSA).double().add_(1.0).mul_(2.0**-53)
    angle = ((words[:, 1] >> 11) & _MANTISSA).double().mul_(2 * math.pi * 2.0**-53)
    radius = u1.log_().mul_(-2.0).sqrt_()
    return torch.cat([radius * angle.cos(), radius * angle.sin()], dim=1)[:, :numel].mul_(std)


def gaussian_noise(numel: int, std: float, *key: int | str) -> torch.Tensor:
    """``numel`` independent N(0, ``std``^2) draws (float64) of the stream keyed by ``key``."""
    return gaussian_noise_rows(numel, std, [key])[0]

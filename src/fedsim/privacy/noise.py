"""Gaussian noise from a cryptographic keystream, reproducible under the run's seed.

The noise of a release (a client's round, a DP-SGD step) is drawn from the AES-256-CTR
keystream (NIST SP 800-38A; the generator of NIST SP 800-90A's CTR_DRBG) under the key
SHA-256(run seed, purpose, round, client, step): its bytes are uniform 64-bit words, turned
into standard normal draws by the Box-Muller transform
(``z = sqrt(-2 ln u1) (cos 2 pi u2, sin 2 pi u2)``, ``u1`` of 52 bits in (0, 1], ``u2`` of 23).
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

_MANTISSA, _ONE = (1 << 52) - 1, 0x3FF0000000000000  # float64: mantissa bits, the bits of 1.0
_MANTISSA32, _ONE32 = (1 << 23) - 1, 0x3F800000  # float32
# Keystream turned into draws at a time: a DP-SGD step of 1,000 clients draws millions, and the
# dozen passes over them cost several times less over a block that stays in the cache
_BLOCK_BYTES = 1 << 20


def _key(parts: Sequence[int | str]) -> bytes:
    return hashlib.sha256("/".join(str(part) for part in parts).encode()).digest()


def gaussian_noise_rows(numel: int, std: float, keys: Sequence[Sequence[int | str]]) -> torch.Tensor:
    """``(len(keys), numel)`` independent N(0, ``std``^2) draws (float32), row i from the
    stream keyed by ``keys[i]`` (a row's draws do not depend on the other rows). The radius
    comes from a 52-bit ``u1`` in float64 (tails to 8.5 std), the angle from 23 bits."""
    pairs = (numel + 1) // 2
    width = 16 * pairs
    block = max(1, _BLOCK_BYTES // width)
    # uninitialised (every byte is written), with a block's room beyond the data that update_into wants
    stream = torch.empty(width * min(block, len(keys)) + 16, dtype=torch.uint8)
    out = torch.empty(len(keys), 2 * pairs)
    for lo in range(0, len(keys), block):
        _draw(out[lo:lo + block], keys[lo:lo + block], stream, std)
    return out[:, :numel]


def _draw(out: torch.Tensor, keys: Sequence[Sequence[int | str]], stream: torch.Tensor, std: float) -> None:
    """Fill ``out`` ``(rows, 2 pairs)`` with the draws of ``keys``' streams (``stream``: room for their bytes)."""
    rows, pairs = len(keys), out.shape[1] // 2
    width = 16 * pairs
    zeros, view = bytes(width), memoryview(stream.numpy())
    for i, key in enumerate(keys):
        encryptor = Cipher(algorithms.AES(_key(key)), modes.CTR(bytes(16))).encryptor()
        encryptor.update_into(zeros, view[i * width:(i + 1) * width + 15])
    words = stream[:width * rows].view(torch.int64).reshape(rows, 2, pairs)
    # 52 random mantissa bits under the exponent of 1.0 make a double in [1, 2): 2 - it is in (0, 1]
    u1 = torch.bitwise_right_shift(words[:, 0], 12).bitwise_and_(_MANTISSA).bitwise_or_(_ONE).view(torch.float64)
    radius = torch.rsub(u1, 2.0).log_().mul_(-2.0).sqrt_().float()
    # 23 bits under the exponent of 1.0f make a float in [1, 2): the angle's fraction of a turn
    half = words[:, 1].view(torch.int32)[..., ::2]
    turn = torch.bitwise_right_shift(half, 9).bitwise_and_(_MANTISSA32).bitwise_or_(_ONE32).view(torch.float32)
    angle = turn.sub_(1.0).mul_(2 * math.pi)
    torch.mul(radius, angle.cos(), out=out[:, :pairs])
    torch.mul(radius, angle.sin_(), out=out[:, pairs:])
    out.mul_(std)


def gaussian_noise(numel: int, std: float, *key: int | str) -> torch.Tensor:
    """``numel`` independent N(0, ``std``^2) draws (float32) of the stream keyed by ``key``."""
    return gaussian_noise_rows(numel, std, [key])[0]

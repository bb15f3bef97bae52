"""Pairwise and self masks of secure aggregation, and SecAgg+'s communication graph.

Bonawitz et al. 2017 (CCS'17, Sec. 4): clients ``u < v`` agree on a seed ``s_uv`` (here
X25519 Diffie-Hellman and HKDF-SHA256, from the ``cryptography`` package); ``u`` adds
``PRG(s_uv)`` and ``v`` subtracts it, so the pairwise masks cancel in the sum; each client
adds ``PRG(b_u)`` of a seed of its own too, so a client wrongly declared dropped keeps its
input hidden. The PRG is the ChaCha20 keystream (a cryptographic generator, where Flower's
SecAgg+ draws masks from ``np.random``).

Bell et al. 2020 (CCS'20, Sec. 3): SecAgg+ masks each client only with its neighbours in a
sparse graph, a Harary graph ``H(k, n)`` on a random ordering of the clients (each client's
``k/2`` nearest on either side of a ring), so costs grow with ``k``, not ``n``.

In simulation the private keys and self-mask seeds are derived from the run's seed (HKDF),
so a run is reproducible; a deployment draws them from the operating system.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

SEED_BYTES = 32
PUBLIC_KEY_BYTES = 32
_NONCE = bytes(16)  # every seed expands to one mask only


def derive(material: bytes, label: str) -> bytes:
    """32 bytes of HKDF-SHA256 output from ``material`` for the purpose ``label``."""
    return HKDF(algorithm=hashes.SHA256(), length=SEED_BYTES, salt=None, info=label.encode()).derive(material)


def private_key(material: bytes, label: str) -> X25519PrivateKey:
    """An X25519 key pair derived from ``material`` (reproducible simulation keys)."""
    return X25519PrivateKey.from_private_bytes(derive(material, label))


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def agreed_seed(own: X25519PrivateKey, peer_public: bytes) -> bytes:
    """The pairwise seed ``s_uv``: HKDF of the X25519 shared secret (equal from both sides)."""
    shared = own.exchange(X25519PublicKey.from_public_bytes(peer_public))
    return derive(shared, "fedsim-secagg-pairwise-mask")


def expand(seed: bytes, dim: int) -> np.ndarray:
    """``PRG(seed)``: ``dim`` uniform uint32 values, the ChaCha20 keystream of ``seed``."""
    stream = Cipher(algorithms.ChaCha20(seed, _NONCE), mode=None).encryptor().update(bytes(4 * dim))
    return np.frombuffer(stream, dtype="<u4").astype(np.uint32)


def harary_neighbours(clients: list[int], degree: int | None, order_seed: bytes) -> dict[int, list[int]]:
    """Each client's neighbours in the Harary graph ``H(degree, n)`` over a random ordering
    of ``clients`` (from ``order_seed``); ``None`` or ``degree >= n - 1``: the complete graph
    (Bonawitz et al.'s SecAgg)."""
    n = len(clients)
    if degree is None or degree >= n - 1:
        return {u: [v for v in clients if v != u] for u in clients}
    rng = np.random.Generator(np.random.PCG64(int.from_bytes(order_seed, "little")))
    ring = [clients[i] for i in rng.permutation(n)]
    half = degree // 2
    return {ring[p]: sorted(ring[(p + off) % n] for off in range(-half, half + 1) if off) for p in range(n)}

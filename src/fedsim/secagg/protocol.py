"""One round of SecAgg+ (Bell et al. 2020, "Secure Single-Server Aggregation with
(Poly)Logarithmic Overhead", CCS'20) over the masking of Bonawitz et al. 2017 ("Practical
Secure Aggregation for Privacy-Preserving Machine Learning", CCS'17): every party's step,
run in one process, with the bytes each client sends.

The four message rounds (:data:`MESSAGE_ROUNDS`):

0. *advertise keys*: client ``u`` sends two X25519 public keys (one agrees the pairwise
   mask seeds, the other the channel its shares travel on);
1. *share keys*: ``u`` splits its mask private key ``sk_u`` and its self-mask seed ``b_u``
   into Shamir shares (threshold ``t_u``, :func:`shares_needed`) and sends one of each,
   encrypted, to each neighbour (via the server);
2. *masked input*: ``u`` sends ``y_u = q_u + PRG(b_u) + sum_{v in N(u)} +-PRG(s_uv)`` in
   Z_(2^32), ``+`` when ``u < v``; the pairwise masks of two senders cancel in the sum;
3. *unmask*: for each neighbour that dropped after round 1, a surviving client sends its
   share of ``sk_v``; for each neighbour that sent ``y_v``, its share of ``b_v``. The server
   rebuilds ``sk_v`` (and from it ``s_vw`` with every surviving neighbour ``w``) and
   ``b_v`` from any ``t`` shares and removes those masks: the result is
   ``sum_u q_u mod 2^32``, bit for bit.

A client whose secret has fewer than ``t`` surviving holders cannot be unmasked: the round
is refused (:attr:`RoundOutcome.refused`, one line). Shamir sharing is pycryptodome's over
GF(2^128), as in Flower (:mod:`fedsim.secagg.shamir`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedsim.secagg.masks import (
    PUBLIC_KEY_BYTES,
    agreed_seed,
    derive,
    expand,
    harary_neighbours,
    private_key,
    public_bytes,
)
from fedsim.secagg.shamir import combine_shares, create_shares

MESSAGE_ROUNDS = 4
"""Client-server round trips of one aggregation: advertise keys, share keys, masked input, unmask."""
SHARE_ENVELOPE_BYTES = 8 + 28
"""Per encrypted share pair: the two client ids (4 bytes each) and AES-GCM's nonce and tag."""


def shares_needed(num_neighbours: int, threshold: float) -> int:
    """Shares that rebuild a secret: a strict ``threshold`` share of the neighbours, at most all."""
    return min(num_neighbours, math.floor(threshold * num_neighbours) + 1)


@dataclass
class RoundOutcome:
    """What the server obtains from one round.

    Attributes
    ----------
    total : numpy.ndarray or None
        ``sum_u q_u mod 2^32`` over the clients that sent a masked input (uint32), or None
        when the round was refused.
    refused : str or None
        Why the masks could not be removed (one line), or None.
    bytes_up : dict[int, int]
        Bytes each client sent over the four message rounds (dropped clients: rounds 0-1).
    bytes_down : dict[int, int]
        Bytes the server sent each client: its neighbours' public keys (round 1), the
        encrypted shares addressed to it (round 2) and, to a client that sent its input, the
        4-byte ids of its neighbours that dropped (round 3).
    recovered : list[int]
        Dropped clients whose pairwise masks were removed from the sum.
    """

    total: np.ndarray | None
    refused: str | None
    bytes_up: dict[int, int]
    bytes_down: dict[int, int]
    recovered: list[int] = field(default_factory=list)
    message_rounds: int = MESSAGE_ROUNDS


class _Client:
    """One client's keys and its steps of the protocol."""

    def __init__(self, cid: int, material: bytes) -> None:
        self.cid = cid
        self.mask_key = private_key(material, f"mask-key/{cid}")
        self.channel_public = public_bytes(private_key(material, f"channel-key/{cid}"))
        self.mask_public = public_bytes(self.mask_key)
        self.self_seed = derive(material, f"self-mask/{cid}")

    def share(self, holders: list[int], threshold: int) -> dict[int, tuple[bytes, bytes]]:
        """Round 1: one Shamir share of ``sk_u`` and one of ``b_u`` per holder."""
        return share_secrets(self.mask_key, self.self_seed, holders, threshold)

    def masked_input(self, levels: np.ndarray, neighbours: list[int], publics: dict[int, bytes]) -> np.ndarray:
        """Round 2: ``y_u``."""
        return mask_input(self.cid, levels, self.self_seed, self.mask_key, {v: publics[v] for v in neighbours})


def share_secrets(mask_key: X25519PrivateKey, self_seed: bytes, holders: list[int], threshold: int
                  ) -> dict[int, tuple[bytes, bytes]]:
    """Round 1: one Shamir share of the mask key ``sk_u`` and one of the self-mask seed ``b_u``
    per holder, any ``threshold`` of which rebuild each."""
    keys = create_shares(mask_key.private_bytes_raw(), threshold, len(holders))
    seeds = create_shares(self_seed, threshold, len(holders))
    return {v: (k, s) for v, k, s in zip(holders, keys, seeds, strict=True)}


def mask_input(cid: int, levels: np.ndarray, self_seed: bytes, mask_key: X25519PrivateKey,
               neighbour_publics: dict[int, bytes]) -> np.ndarray:
    """Client ``cid``'s masked input ``y_u = q_u + PRG(b_u) + sum_v +-PRG(s_uv)`` over the
    neighbours that shared their keys (uint32 arithmetic wraps modulo 2^32)."""
    dim = levels.shape[0]
    masked = levels.astype(np.uint32) + expand(self_seed, dim)
    for v, public in neighbour_publics.items():
        pairwise = expand(agreed_seed(mask_key, public), dim)
        masked = masked + pairwise if cid < v else masked - pairwise
    return masked


def unmask(total: np.ndarray, neighbours: dict[int, list[int]], publics: dict[int, bytes], sent: Iterable[int],
           lost: Iterable[int], shares: dict[int, list[bytes]], needed: dict[int, int]
           ) -> tuple[np.ndarray | None, str | None]:
    """Round 3 at the server: ``total`` (the sum of the masked inputs of ``sent``) without
    their self masks and without the pairwise masks the ``lost`` clients (shared their keys,
    sent no input) left in it; or None and why (one line) when some client's secret has
    fewer shares than ``needed``.

    ``shares[v]``: the shares of ``v``'s mask key (``v`` lost) or self-mask seed (``v`` sent)
    that its surviving neighbours returned; the sum's survivors are ``sent``.
    """
    sent, lost = set(sent), set(lost)
    dim = total.shape[0]
    for v in sorted(sent | lost):
        held = shares.get(v, [])
        if len(held) < needed[v]:
            state = "dropped" if v in lost else "sent its input"
            return None, (f"client {v} {state} and {len(held)} of its {len(neighbours[v])} neighbours replied; "
                          f"{needed[v]} shares rebuild its masks")
        secret = combine_shares(held[:needed[v]])
        if v in lost:
            key = X25519PrivateKey.from_private_bytes(secret)
            for w in neighbours[v]:
                if w in sent:
                    pairwise = expand(agreed_seed(key, publics[w]), dim)
                    total = total - pairwise if w < v else total + pairwise
        else:
            total = total - expand(secret, dim)
    return total, None


def run_round(inputs: dict[int, np.ndarray], dropped: Iterable[int], *, degree: int | None, threshold: float,
              material: bytes) -> RoundOutcome:
    """Aggregate ``inputs`` (client -> uint32 levels) securely, the clients of ``dropped``
    having shared their keys and then sent nothing.

    Parameters
    ----------
    inputs : dict[int, numpy.ndarray]
        The quantised input of each client that sends one, equal lengths.
    dropped : iterable of int
        Clients that took part in rounds 0 and 1 and then dropped out.
    degree : int or None
        SecAgg+'s graph degree ``k`` (even); None: every client is every other's neighbour.
    threshold : float
        Fraction of a client's neighbours whose shares, plus one, rebuild its secrets.
    material : bytes
        Secret material the round's keys derive from (the run's seed and round in simulation).
    """
    survivors = sorted(inputs)
    lost = sorted(set(dropped) - set(survivors))
    everyone = sorted([*survivors, *lost])
    dim = next(iter(inputs.values())).shape[0] if inputs else 0
    clients = {u: _Client(u, material) for u in everyone}
    neighbours = harary_neighbours(everyone, degree, derive(material, "graph"))
    needed = {u: shares_needed(len(neighbours[u]), threshold) for u in everyone}
    publics = {u: c.mask_public for u, c in clients.items()}
    held: dict[int, dict[int, tuple[bytes, bytes]]] = {u: {} for u in everyone}  # holder -> owner -> shares
    bytes_up = {u: 2 * PUBLIC_KEY_BYTES for u in everyone}
    bytes_down = {u: 2 * PUBLIC_KEY_BYTES * len(neighbours[u]) for u in everyone}
    for u in everyone:
        for v, pair in clients[u].share(neighbours[u], needed[u]).items():
            held[v][u] = pair
            bytes_up[u] += len(pair[0]) + len(pair[1]) + SHARE_ENVELOPE_BYTES
            bytes_down[v] += len(pair[0]) + len(pair[1]) + SHARE_ENVELOPE_BYTES
    masked = [clients[u].masked_input(inputs[u], neighbours[u], publics) for u in survivors]
    for u in survivors:
        bytes_up[u] += 4 * dim
        bytes_up[u] += sum(len(held[u][v][0] if v in lost else held[u][v][1]) for v in neighbours[u])
        bytes_down[u] += 4 * sum(v in lost for v in neighbours[u])
    total = np.sum(masked, axis=0, dtype=np.uint32) if masked else np.zeros(dim, dtype=np.uint32)
    alive = set(survivors)
    returned = {v: [held[w][v][0 if v in lost else 1] for w in neighbours[v] if w in alive] for v in everyone}
    total, refused = unmask(total, neighbours, publics, survivors, lost, returned, needed)
    if refused is not None:
        return RoundOutcome(None, refused, bytes_up, bytes_down)
    return RoundOutcome(total, None, bytes_up, bytes_down, recovered=lost)

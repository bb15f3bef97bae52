"""A deployed client's steps of SecAgg+ (:mod:`fedsim.loops.secagg_messages` is the server's half).

Each step answers one Flower message and keeps what the next step needs in the client's
Context state (on its SuperNode; the server never sees it): its keys, its update, its
neighbours' keys and the shares it holds. Every random value is drawn from the operating
system here (``X25519PrivateKey.generate``, :mod:`secrets`), not from the run's seed as in
simulation: the server must not be able to derive any of them.

0. *advertise keys* (the training reply, :func:`advertise`): two fresh X25519 public keys;
   the trained update stays on the client;
1. *share keys* (:func:`share`): Shamir shares of the mask key and the self-mask seed, one
   pair per neighbour, each sealed with AES-GCM under a key agreed with that neighbour's
   channel key, so the server relays shares it cannot read;
2. *masked input* (:func:`masked_input`): the client (with at least its threshold of
   neighbours' shares, else it sends nothing) opens the shares addressed to it,
   scales, (clips and adds its noise share under distributed DP,) quantises its update
   exactly as the simulation does (:func:`fedsim.secagg.engine.client_input`) and sends
   ``y_u`` (uint32), or withholds it; its out-of-range and clipped coordinates travel as counts;
3. *unmask* (:func:`unmask`): for each neighbour the server lists as dropped, its share of
   that neighbour's mask key; for every other one, its share of the self-mask seed; never
   both for one neighbour. The client's secrets then leave its state.
"""

from __future__ import annotations

import secrets
from collections.abc import MutableMapping
from typing import TYPE_CHECKING

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedsim.privacy.noise import gaussian_noise
from fedsim.secagg.engine import client_input
from fedsim.secagg.masks import SEED_BYTES, derive, public_bytes
from fedsim.secagg.protocol import mask_input, share_secrets
from fedsim.secagg.shamir import SHARE_BYTES

if TYPE_CHECKING:
    from fedsim.config import ExperimentConfig

# Training config key: the server runs secure aggregation on the clients (the reply holds keys, not the update)
ADVERTISE_KEYS = "secagg-advertise"
# the records of the protocol's messages
SECAGG, MASKED, COUNTS = "secagg", "masked", "metrics"
SHARE, INPUT, UNMASK = "train.secagg_share", "train.secagg_input", "train.secagg_unmask"
# the client's Context state between the steps
_KEYS, _UPDATE, _PEERS, _HELD = "secagg-keys", "secagg-update", "secagg-peers", "secagg-held"
_NONCE_BYTES = 12


def _channel(own: bytes, peer_public: bytes) -> AESGCM:
    shared = X25519PrivateKey.from_private_bytes(own).exchange(X25519PublicKey.from_public_bytes(peer_public))
    return AESGCM(derive(shared, "fedsim-secagg-share-channel"))


def _associated(server_round: int, sender: int, receiver: int) -> bytes:
    return f"fedsim-secagg/{server_round}/{sender}/{receiver}".encode()


def seal(own_channel_key: bytes, peer_public: bytes, associated: bytes, plaintext: bytes) -> bytes:
    """``plaintext`` sealed for the peer: a random 12-byte nonce and AES-GCM's ciphertext and tag."""
    nonce = secrets.token_bytes(_NONCE_BYTES)
    return nonce + _channel(own_channel_key, peer_public).encrypt(nonce, plaintext, associated)


def open_sealed(own_channel_key: bytes, peer_public: bytes, associated: bytes, envelope: bytes) -> bytes:
    """What :func:`seal` sealed (``cryptography``'s InvalidTag when it was altered or misaddressed)."""
    return _channel(own_channel_key, peer_public).decrypt(envelope[:_NONCE_BYTES], envelope[_NONCE_BYTES:], associated)


def _keys(state: MutableMapping, server_round: int) -> ConfigRecord:
    keys = state.get(_KEYS)
    if keys is None or int(keys["round"]) != server_round:
        raise ValueError(f"secure aggregation: this client holds no keys of round {server_round}")
    return keys


def advertise(state: MutableMapping, update: torch.Tensor, server_round: int) -> ConfigRecord:
    """Step 0: keep ``update`` and fresh keys in ``state``; the two public keys to send."""
    if not torch.isfinite(update).all():
        raise ValueError("secure aggregation: the update holds NaN or Inf; not masking it")
    mask_key, channel_key = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    state[_KEYS] = ConfigRecord({"round": server_round, "mask-key": mask_key.private_bytes_raw(),
                                 "channel-key": channel_key.private_bytes_raw(),
                                 "self-seed": secrets.token_bytes(SEED_BYTES)})
    state[_UPDATE] = ArrayRecord({"update": Array(np.ascontiguousarray(update.numpy()))})
    return ConfigRecord({"mask-public": public_bytes(mask_key), "channel-public": public_bytes(channel_key)})


def share(state: MutableMapping, request: ConfigRecord, partition_id: int) -> RecordDict:
    """Step 1: the sealed share pairs for the neighbours the server names."""
    server_round = int(request["round"])
    keys = _keys(state, server_round)
    ids = [int(v) for v in request["neighbours"]]
    state[_PEERS] = ConfigRecord({"ids": ids, "mask-publics": list(request["mask-publics"]),
                                  "channel-publics": list(request["channel-publics"]),
                                  "threshold": int(request["threshold"])})
    shares = share_secrets(X25519PrivateKey.from_private_bytes(keys["mask-key"]), keys["self-seed"], ids,
                           int(request["threshold"]))
    envelopes = [seal(keys["channel-key"], public, _associated(server_round, partition_id, v), b"".join(shares[v]))
                 for v, public in zip(ids, request["channel-publics"], strict=True)]
    return RecordDict({SECAGG: ConfigRecord({"to": ids, "envelopes": envelopes})})


def masked_input(state: MutableMapping, request: ConfigRecord, partition_id: int, cfg: ExperimentConfig
                 ) -> RecordDict:
    """Step 2: open the shares, then ``y_u`` of the update (or nothing, withheld), with the
    counts of coordinates outside the range."""
    server_round = int(request["round"])
    if cfg.faults.dropped_after_keys(partition_id, server_round):
        raise RuntimeError(f"client {partition_id} dropped after sharing its keys (injected fault)")
    keys, peers = _keys(state, server_round), state[_PEERS]
    channel = dict(zip(peers["ids"], peers["channel-publics"], strict=True))
    masks = dict(zip(peers["ids"], peers["mask-publics"], strict=True))
    owners = [int(v) for v in request["from"]]
    if len(owners) < int(peers["threshold"]):  # Bonawitz et al.: too few neighbours shared to rebuild its secrets
        raise RuntimeError(f"secure aggregation: {len(owners)} neighbours shared their keys, "
                           f"{peers['threshold']} needed; not sending a masked input")
    opened = [open_sealed(keys["channel-key"], channel[v], _associated(server_round, v, partition_id), envelope)
              for v, envelope in zip(owners, request["envelopes"], strict=True)]
    state[_HELD] = ConfigRecord({"owners": owners, "key-shares": [o[:SHARE_BYTES] for o in opened],
                                 "seed-shares": [o[SHARE_BYTES:] for o in opened]})
    update = torch.from_numpy(state[_UPDATE]["update"].numpy().copy())
    if float(request["clip-norm"]) > 0:  # distributed DP
        from fedsim.privacy.mechanisms import clip_rows  # with dp-accounting: only for private runs

        update = clip_rows(update[None].double(), float(request["clip-norm"]))[0][0].to(update.dtype)
    noise_std = float(request["noise-std"])
    # the noise share's stream is keyed by OS randomness: the server cannot subtract it
    noise = (gaussian_noise(update.shape[0], noise_std, "privacy", "secagg", secrets.token_hex(32)).numpy()
             if noise_std > 0 else None)
    given = client_input(update.double().numpy(), float(request["weight"]), noise, cfg.secagg)
    content = RecordDict({COUNTS: MetricRecord({"out-of-range": given.out_of_range, "clipped": given.clipped})})
    if given.levels is not None:
        masked = mask_input(partition_id, given.levels, keys["self-seed"],
                            X25519PrivateKey.from_private_bytes(keys["mask-key"]), {v: masks[v] for v in owners})
        content[MASKED] = ArrayRecord({"masked": Array(masked)})
    del state[_UPDATE]
    return content


def unmask(state: MutableMapping, request: ConfigRecord) -> RecordDict:
    """Step 3: one share per neighbour whose shares this client holds: of its mask key if
    the server lists it as dropped, else of its self-mask seed; then forget the round."""
    _keys(state, int(request["round"]))
    held = state[_HELD]
    dropped = {int(v) for v in request["dropped"]}
    shares = [key if v in dropped else seed
              for v, key, seed in zip(held["owners"], held["key-shares"], held["seed-shares"], strict=True)]
    for name in (_KEYS, _PEERS, _HELD):
        del state[name]
    return RecordDict({SECAGG: ConfigRecord({"owners": list(held["owners"]), "shares": shares})})

"""SecAgg+ between real clients: the server's half of a deployed round (``secagg.enabled``
with ``fedsim deploy``); :mod:`fedsim.clients.secagg_steps` is the clients' half.

Why fedsim's own protocol over Flower messages, and not Flower's ``SecAggPlusWorkflow`` and
``secaggplus_mod``: Flower 1.41's workflow drives a legacy ``Strategy`` through a
``LegacyContext`` (``aggregate_fit`` of ``FitRes``) and its mod wraps the legacy ``fit``,
so fedsim's Message-API strategies cannot sit underneath it; and what it would give them
is weaker than what fedsim's simulation already checks: masks expanded by
``np.random.RandomState`` from the seed folded to 32 bits (guessable), coordinates clipped
to +-8 without a word, int64 masked uploads (twice the float32 update). Here the masks are
ChaCha20 keystreams of X25519-agreed seeds (:mod:`fedsim.secagg.masks`), out-of-range
coordinates are counted in the row, uploads are uint32, and the quantisation, the masking
and the unmasking are the simulation's own functions, so a deployed round gives the
simulation's aggregate bit for bit (``tests/deploy/test_deploy_secagg.py``).

A round, in fedsim's synchronous loop (:class:`fedsim.strategies.base.FedsimStrategy`):

0. the training message asks the clients to *advertise keys*: each trains and replies with
   its example count, its metrics and two public keys, keeping its update
   (:meth:`DeployedSecureAggregation.screen`); the aggregator's weights ``c_i`` of these
   clients are known now;
1. *share keys* (``train.secagg_share``): each client gets its neighbours' public keys (a
   Harary graph of ``secagg.degree`` on a random ordering, or the complete graph) and
   returns its Shamir shares sealed for each neighbour;
2. *masked input* (``train.secagg_input``): each client that shared gets the shares
   addressed to it and its weight ``w_i = c_i / max_j c_j``, and returns ``y_u``;
3. *unmask* (``train.secagg_unmask``): each client that sent ``y_u`` gets the ids of its
   neighbours that shared and sent nothing, and returns one share per neighbour; the server
   removes the masks (:func:`fedsim.secagg.protocol.unmask`), dequantises and rescales to
   the senders' weights (:func:`fedsim.secagg.engine.sender_scale`).

A client that fails or times out in a step drops out of the round; those that dropped
after sharing are recovered while a ``secagg.threshold`` share of each one's neighbours
replies, else the round is refused in one line and skipped, as in simulation. The server
sees public keys, sealed shares, masked vectors, and one share per (client, neighbour):
never a client's update (honest-but-curious server, Bonawitz et al. 2017's semi-honest
setting; no consistency round against a server that lies about dropouts).
"""

from __future__ import annotations

import logging
import secrets

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedsim.clients.secagg_steps import COUNTS, INPUT, MASKED, SECAGG, SHARE, UNMASK
from fedsim.config import ExperimentConfig
from fedsim.privacy.server import ServerPrivacy
from fedsim.secagg.engine import (
    ClientInput,
    Coefficients,
    SecureAggregation,
    distributed_dp,
    input_costs,
    quantiser_weights,
    sender_scale,
)
from fedsim.secagg.masks import PUBLIC_KEY_BYTES, harary_neighbours
from fedsim.secagg.protocol import shares_needed, unmask
from fedsim.secagg.quantization import dequantize_sum
from fedsim.secagg.shamir import SHARE_BYTES
from fedsim.sim.messaging import send_and_collect
from fedsim.strategies.replies import TIMEOUT, TIMEOUT_CODE, ClientUpdate, Failure, scalar_metrics, screen_replies

log = logging.getLogger(__name__)

ID_BYTES = 4
"""A client id on the wire (the sealed shares' addressees, the dropped neighbours' ids)."""
ENVELOPE_BYTES = 12 + 2 * SHARE_BYTES + 16
"""A sealed share pair: AES-GCM's nonce, the two shares, its tag."""


class DeployedSecureAggregation(SecureAggregation):
    """The secure sum of a deployed round's updates, its steps run by the clients over
    ``grid`` (see the module docstring); the same ``aggregate`` as the simulation's.

    Parameters
    ----------
    cfg : ExperimentConfig
        The experiment (``secagg``, ``seed``, ``faults``, ``client.timeout_s``).
    grid : Grid
        The deployment's grid.
    node_of : dict[int, int]
        Partition id -> node id, kept current by the strategy as nodes rejoin.
    dim : int
        Length of the flat update.
    """

    on_clients = True

    def __init__(self, cfg: ExperimentConfig, grid: Grid, node_of: dict[int, int], dim: int) -> None:
        super().__init__(cfg.secagg, cfg.seed, cfg.faults)
        self.grid, self.node_of, self.dim, self.timeout_s = grid, node_of, dim, cfg.client.timeout_s
        self._publics: dict[int, tuple[bytes, bytes]] = {}  # the round's clients: (mask, channel) public keys

    def screen(self, replies: list[Message], sent: dict[int, int]) -> tuple[list[ClientUpdate], list[Failure]]:
        """Step 0's replies: an update-less :class:`ClientUpdate` (its example count, metrics,
        the 64 bytes of its keys) per client that trained and advertised its keys."""
        self._publics = {}

        def screen_one(msg: Message, pid: int) -> ClientUpdate | Failure:
            if msg.has_error():
                return Failure(pid, TIMEOUT if msg.error.code == TIMEOUT_CODE else f"client error: {msg.error.reason}")
            keys = msg.content.get(SECAGG)
            publics = (keys.get("mask-public"), keys.get("channel-public")) if isinstance(keys, ConfigRecord) else ()
            if not all(isinstance(k, bytes) and len(k) == PUBLIC_KEY_BYTES for k in publics) or not publics:
                return Failure(pid, "reply has no secure-aggregation public keys")
            metrics = scalar_metrics(msg.content)
            if int(metrics.get("num-examples", 0)) <= 0:
                return Failure(pid, "reply has no positive 'num-examples'")
            self._publics[pid] = publics
            return ClientUpdate(pid, int(metrics["num-examples"]), torch.empty(0), 2 * PUBLIC_KEY_BYTES, metrics)

        return screen_replies(replies, sent, screen_one)

    def aggregate(self, server_round: int, updates: list[ClientUpdate], dropped: list[int],
                  coefficients: Coefficients, privacy: ServerPrivacy | None = None
                  ) -> tuple[torch.Tensor | None, dict[str, int], int, int]:
        """Steps 1-3 with the clients of ``updates`` (those of ``dropped`` never advertised
        keys and take no part); the same results as :meth:`SecureAggregation.aggregate`."""
        cfg = self.cfg
        clip_norm = noise_std = 0.0
        if privacy is not None:
            clip_norm, noise_std, coefficients = distributed_dp(privacy)
        c = coefficients(updates)
        _, weights = quantiser_weights(c)
        weight = {u.partition_id: w for u, w in zip(updates, weights, strict=True)}
        ids = sorted(weight)
        neighbours = harary_neighbours(ids, cfg.degree, secrets.token_bytes(32))
        needed = {u: shares_needed(len(neighbours[u]), cfg.threshold) for u in ids}
        up = dict.fromkeys(ids, 2 * PUBLIC_KEY_BYTES)
        down = {u: 2 * PUBLIC_KEY_BYTES * len(neighbours[u]) for u in ids}

        replies = self._step(server_round, SHARE, {u: {
            "threshold": needed[u], "neighbours": neighbours[u],
            "mask-publics": [self._publics[v][0] for v in neighbours[u]],
            "channel-publics": [self._publics[v][1] for v in neighbours[u]]} for u in ids})
        sealed: dict[int, dict[int, bytes]] = {}  # owner -> holder -> sealed share pair
        for u, content in replies.items():
            record = content.get(SECAGG)
            if (not isinstance(record, ConfigRecord) or list(record.get("to", [])) != neighbours[u]
                    or any(len(e) != ENVELOPE_BYTES for e in record.get("envelopes", []))):
                log.warning("round %d: client %d dropped out of secure aggregation: malformed shares", server_round, u)
                continue
            sealed[u] = dict(zip(neighbours[u], record["envelopes"], strict=True))
            up[u] += len(neighbours[u]) * (ENVELOPE_BYTES + 2 * ID_BYTES)

        requests = {}
        for u in sealed:
            owners = [v for v in neighbours[u] if v in sealed]
            requests[u] = {"from": owners, "envelopes": [sealed[v][u] for v in owners], "weight": weight[u],
                           "clip-norm": clip_norm, "noise-std": noise_std}
            down[u] += len(owners) * (ENVELOPE_BYTES + 2 * ID_BYTES)
        inputs: dict[int, ClientInput] = {}  # here each one's masked vector (None: withheld) and its counts
        for u, content in self._step(server_round, INPUT, requests).items():
            counts = content.get(COUNTS, {})
            masked = content.get(MASKED)
            vector = masked["masked"].numpy() if isinstance(masked, ArrayRecord) and "masked" in masked else None
            if vector is not None and (vector.dtype != np.uint32 or vector.shape != (self.dim,)):
                log.warning("round %d: client %d dropped out of secure aggregation: a masked input of %s %s",
                            server_round, u, vector.dtype, vector.shape)
                continue
            inputs[u] = ClientInput(vector, int(counts.get("out-of-range", 0)), int(counts.get("clipped", 0)))
            up[u] += 0 if vector is None else vector.nbytes
        costs = input_costs(server_round, inputs, cfg)
        sent = {u: i.levels for u, i in inputs.items() if i.levels is not None}
        if not sent:
            log.warning("round %d skipped: secure aggregation: no client sent its input", server_round)
            return None, costs, sum(up.values()), sum(down.values())
        lost = sorted(set(sealed) - set(sent))
        total = np.sum(list(sent.values()), axis=0, dtype=np.uint32)

        requests = {u: {"dropped": [v for v in neighbours[u] if v in lost]} for u in sent}
        for u, request in requests.items():
            down[u] += ID_BYTES * len(request["dropped"])
        returned: dict[int, list[bytes]] = {v: [] for v in sealed}
        for u, content in self._step(server_round, UNMASK, requests).items():
            record = content.get(SECAGG)
            owners = [v for v in neighbours[u] if v in sealed]
            if not isinstance(record, ConfigRecord) or list(record.get("owners", [])) != owners:
                log.warning("round %d: client %d sent no usable shares to unmask", server_round, u)
                continue
            for v, held in zip(owners, record["shares"], strict=True):
                returned[v].append(held)
                up[u] += len(held)
        costs["secagg_bytes_per_client"] = round(float(np.mean([up[u] for u in sent])))
        costs["secagg_bytes_down_per_client"] = round(float(np.mean([down[u] for u in sent])))
        nbytes = (sum(up.values()), sum(down.values()))
        total, refused = unmask(total, neighbours, {v: p[0] for v, p in self._publics.items()}, sent, lost,
                                returned, needed)
        if refused is not None:
            log.warning("round %d refused: secure aggregation cannot unmask: %s (secagg.threshold %g)",
                        server_round, refused, cfg.threshold)
            return None, costs, *nbytes
        costs["secagg_recovered"] = len(lost)
        scale = sender_scale(server_round, updates, c, set(sent), coefficients)
        if scale is None:
            return None, costs, *nbytes
        aggregate = dequantize_sum(total, len(sent), cfg.value_range, cfg.bits) * scale
        return torch.from_numpy(aggregate).to(torch.float32), costs, *nbytes

    def _step(self, server_round: int, message_type: str, requests: dict[int, dict]) -> dict[int, RecordDict]:
        """Send each client its request of one step; the replies' contents by client (a
        client that fails or does not reply in ``client.timeout_s`` drops out, in one line)."""
        sent = {self.node_of[u]: u for u in requests}
        messages = [Message(RecordDict({SECAGG: ConfigRecord({"round": server_round, **request}),
                                        "config": ConfigRecord({"server-round": server_round, "partition-id": u})}),
                            message_type=message_type, dst_node_id=self.node_of[u]) for u, request in requests.items()]
        contents, answered = {}, set()
        for reply in send_and_collect(self.grid, messages, self.timeout_s):
            u = sent.get(reply.metadata.src_node_id)
            if u is None:
                continue
            answered.add(u)
            if reply.has_error():
                log.warning("round %d: client %d dropped out of secure aggregation (%s): %s", server_round, u,
                            message_type.removeprefix("train."), reply.error.reason)
            else:
                contents[u] = reply.content
        for u in sorted(set(requests) - set(contents) - answered):
            log.warning("round %d: client %d dropped out of secure aggregation (%s): no reply before the timeout",
                        server_round, u, message_type.removeprefix("train."))
        return contents

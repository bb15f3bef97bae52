"""Checking client replies before aggregation.

Flower raises on the first inconsistent reply and ends the run. fedsim drops that one
reply, records the client and the reason, and goes on: a client that raised, a reply
without an update, an update of the wrong shape, or one holding NaN/Inf never reaches
an aggregator.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from flwr.app import ArrayRecord, Message, RecordDict
from flwr.common.constant import ErrorCode

from fedsim.quant.codecs import Codec, Identity
from fedsim.records import to_numpy

IDENTITY = Identity()
TIMEOUT = "no reply before the timeout"
# The error code of a reply that fedsim's simulated nodes mark as late (a client that took
# longer than ``client.timeout_s``): Flower's REPLY_MESSAGE_UNAVAILABLE, the code Flower's
# SuperLink itself gives the reply to a message whose TTL ran out before its node answered,
# so a late client reads the same in simulation and deployment. (NODE_UNAVAILABLE says the
# node is gone, MESSAGE_UNAVAILABLE that the instruction itself is unknown or expired.)
TIMEOUT_CODE = ErrorCode.REPLY_MESSAGE_UNAVAILABLE
# Training-config flag: the server dropped this client's last reply and reset its copy of the
# client's EF21/EControl estimate; the client clears its memory too
EF_RESET = "ef-reset"

log = logging.getLogger(__name__)


@dataclass
class ClientUpdate:
    """One client's accepted training reply."""

    partition_id: int
    num_examples: int
    update: torch.Tensor
    nbytes: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Failure:
    """A client whose reply was not used this round, and why."""

    partition_id: int
    reason: str


def scalar_metrics(content: RecordDict) -> dict[str, float]:
    """Every number of a reply's metric records, as floats (lists and text left out)."""
    return {k: float(v) for rec in content.metric_records.values() for k, v in rec.items()
            if isinstance(v, int | float)}


def decode_record(msg: Message, partition_id: int, record: str, dim: int, codec: Codec
            ) -> tuple[torch.Tensor, int] | Failure:
    """The flat vector (and its size on the wire) that ``record`` of the reply encodes with
    ``codec``, or why it cannot be used."""
    if msg.has_error():
        if msg.error.code == TIMEOUT_CODE:
            return Failure(partition_id, TIMEOUT)
        return Failure(partition_id, f"client error: {msg.error.reason}")
    arrays = msg.content.get(record)
    if not isinstance(arrays, ArrayRecord):
        return Failure(partition_id, f"reply has no '{record}' record")
    try:
        payload = codec.from_arrays({k: to_numpy(v) for k, v in arrays.items()})
        vector = codec.decode(payload)
    except (KeyError, TypeError, ValueError) as exc:
        return Failure(partition_id, f"{record} cannot be decoded: {exc}")
    if vector.dim() != 1 or vector.numel() != dim:
        return Failure(partition_id, f"{record} has shape {tuple(vector.shape)}, expected ({dim},)")
    if not torch.isfinite(vector).all():
        return Failure(partition_id, f"{record} holds NaN or Inf")
    return vector.to(torch.float32), payload.nbytes


def screen_train_reply(msg: Message, partition_id: int, dim: int, codec: Codec) -> ClientUpdate | Failure:
    """Decode a training reply with the uplink ``codec`` into a :class:`ClientUpdate`, or
    explain why it is rejected."""
    decoded = decode_record(msg, partition_id, "update", dim, codec)
    if isinstance(decoded, Failure):
        return decoded
    metrics = scalar_metrics(msg.content)
    num_examples = int(metrics.get("num-examples", 0))
    if num_examples <= 0:
        return Failure(partition_id, "reply has no positive 'num-examples'")
    return ClientUpdate(partition_id, num_examples, *decoded, metrics)


def screen_model_reply(msg: Message, partition_id: int, dim: int) -> ClientUpdate | Failure:
    """A reply that carries a whole flat model in its ``model`` record, float32 (a gossip
    node's mixed model): a :class:`ClientUpdate` whose ``update`` is that model."""
    decoded = decode_record(msg, partition_id, "model", dim, IDENTITY)
    if isinstance(decoded, Failure):
        return decoded
    return ClientUpdate(partition_id, 0, *decoded, scalar_metrics(msg.content))


def screen_replies(
    replies: list[Message], sent: dict[int, int], screen: Callable[[Message, int], ClientUpdate | Failure]
) -> tuple[list[ClientUpdate], list[Failure]]:
    """Screen the replies of one round.

    Parameters
    ----------
    replies : list[Message]
        Replies received before the timeout.
    sent : dict[int, int]
        node id -> partition id of every client asked this round; a client with no reply
        timed out.
    screen : callable
        ``screen(reply, partition_id)``: one reply's :class:`ClientUpdate` or
        :class:`Failure` (e.g. :func:`screen_train_reply` with its dim and codec bound).

    Returns
    -------
    accepted updates sorted by partition id (so aggregation order is reproducible), and
    the failures.
    """
    accepted: list[ClientUpdate] = []
    failures: list[Failure] = []
    answered = set()
    for msg in replies:
        node = msg.metadata.src_node_id
        if node not in sent:
            continue
        answered.add(node)
        result = screen(msg, sent[node])
        (failures if isinstance(result, Failure) else accepted).append(result)
    failures += [Failure(pid, TIMEOUT) for node, pid in sent.items() if node not in answered]
    for f in failures:
        log.warning("client %d rejected: %s", f.partition_id, f.reason)
    accepted.sort(key=lambda u: u.partition_id)
    failures.sort(key=lambda f: f.partition_id)
    return accepted, failures


def screen_train_replies(
    replies: list[Message], sent: dict[int, int], dim: int, codec: Codec
) -> tuple[list[ClientUpdate], list[Failure]]:
    """:func:`screen_replies` of training replies whose updates ``codec`` encodes, of
    length ``dim``."""
    return screen_replies(replies, sent, lambda msg, pid: screen_train_reply(msg, pid, dim, codec))

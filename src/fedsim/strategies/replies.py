"""Checking client replies before aggregation.

Flower raises on the first inconsistent reply and ends the run. fedsim drops that one
reply, records the client and the reason, and goes on: a client that raised, a reply
without an update, an update of the wrong shape, or one holding NaN/Inf never reaches
an aggregator.

A training reply that never leaves the server's process (the in-process backends) travels
as a :class:`LocalReply`: a Flower reply Message whose records are built from the client's
:class:`TrainReply` only when its ``content`` is first read. Screening reads the payload and
the metrics straight from the :class:`TrainReply` (the numbers the records would hold), so
a round of small clients does not write every update into ``.npy`` bytes and parse it back.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode

from fedsim.quant.codecs import Codec, Identity, Payload
from fedsim.records import to_numpy, to_record

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


def _numbers(records) -> dict[str, float]:
    return {k: float(v) for rec in records for k, v in rec.items() if isinstance(v, int | float)}


def scalar_metrics(content: RecordDict) -> dict[str, float]:
    """Every number of a reply's metric records, as floats (lists and text left out)."""
    return _numbers(content.metric_records.values())


@dataclass(frozen=True, eq=False)
class TrainReply:
    """A client's training reply before it becomes records: its encoded update, its metrics
    and its features' records. :meth:`records` is the content it is sent as."""

    payload: Payload
    metrics: dict[str, int | float]
    records: dict[str, ArrayRecord | MetricRecord]

    def content(self) -> RecordDict:
        """The reply's records: ``update`` (the payload's arrays), ``metrics``, then the features' records."""
        content = RecordDict({"update": to_record(self.payload.to_arrays()), "metrics": MetricRecord(self.metrics)})
        for name, record in self.records.items():
            content[name] = record
        return content

    def scalar_metrics(self) -> dict[str, float]:
        """:func:`scalar_metrics` of :meth:`content`, without building it."""
        return _numbers([self.metrics, *(r for r in self.records.values() if isinstance(r, MetricRecord))])


def reply_content(reply: RecordDict | TrainReply) -> RecordDict:
    """The records a client sends for ``reply``."""
    return reply.content() if isinstance(reply, TrainReply) else reply


class LocalReply(Message):
    """The reply to ``reply_to`` carrying ``reply``, in the server's own process: its content
    is built on first read (after which it is an ordinary Flower reply)."""

    def __init__(self, reply: TrainReply, reply_to: Message) -> None:
        super().__init__(RecordDict(), reply_to=reply_to)
        self.__dict__["_train_reply"] = reply

    @property
    def content(self) -> RecordDict:
        if (reply := self.__dict__["_train_reply"]) is not None:
            self.__dict__["_content"], self.__dict__["_train_reply"] = reply.content(), None
        return Message.content.fget(self)

    @content.setter
    def content(self, value: RecordDict) -> None:
        self.__dict__["_train_reply"] = None
        Message.content.fset(self, value)

    def unread(self) -> TrainReply | None:
        """The client's reply while the content has not been read, else None."""
        return self.__dict__["_train_reply"]


def _unread(msg: Message) -> TrainReply | None:
    return msg.unread() if isinstance(msg, LocalReply) else None


class _MissingRecord(LookupError):
    """A reply without the record asked for."""


def _payload(msg: Message, record: str, codec: Codec) -> Payload:
    """The payload that ``record`` of the reply holds, as ``codec`` reads it."""
    local = _unread(msg)
    if local is not None and record == "update":
        return local.payload  # what codec.from_arrays rebuilds from the update record
    arrays = msg.content.get(record)
    if not isinstance(arrays, ArrayRecord):
        raise _MissingRecord(record)
    return codec.from_arrays({k: to_numpy(v) for k, v in arrays.items()})


def decode_record(msg: Message, partition_id: int, record: str, dim: int, codec: Codec
            ) -> tuple[torch.Tensor, int] | Failure:
    """The flat vector (and its size on the wire) that ``record`` of the reply encodes with
    ``codec``, or why it cannot be used."""
    if msg.has_error():
        if msg.error.code == TIMEOUT_CODE:
            return Failure(partition_id, TIMEOUT)
        return Failure(partition_id, f"client error: {msg.error.reason}")
    try:
        payload = _payload(msg, record, codec)
        vector = codec.decode(payload)
    except _MissingRecord:
        return Failure(partition_id, f"reply has no '{record}' record")
    except (KeyError, TypeError, ValueError) as exc:
        return Failure(partition_id, f"{record} cannot be decoded: {exc}")
    if vector.dim() != 1 or vector.numel() != dim:
        return Failure(partition_id, f"{record} has shape {tuple(vector.shape)}, expected ({dim},)")
    # numpy's isfinite: torch's costs about ten times as much on a CPU tensor, once per reply
    if not np.isfinite(vector.numpy()).all():
        return Failure(partition_id, f"{record} holds NaN or Inf")
    return vector.to(torch.float32), payload.nbytes


def screen_train_reply(msg: Message, partition_id: int, dim: int, codec: Codec) -> ClientUpdate | Failure:
    """Decode a training reply with the uplink ``codec`` into a :class:`ClientUpdate`, or
    explain why it is rejected."""
    decoded = decode_record(msg, partition_id, "update", dim, codec)
    if isinstance(decoded, Failure):
        return decoded
    local = _unread(msg)
    metrics = local.scalar_metrics() if local is not None else scalar_metrics(msg.content)
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

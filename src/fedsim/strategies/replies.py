"""Checking client replies before aggregation.

Flower raises on the first inconsistent reply and ends the run. fedsim drops that one
reply, records the client and the reason, and goes on: a client that raised, a reply
without an update, an update of the wrong shape, or one holding NaN/Inf never reaches
an aggregator.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from flwr.app import Message

from fedsim.quant.codecs import Codec

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


def _metrics(msg: Message) -> dict[str, float]:
    records = msg.content.metric_records
    return {k: float(v) for rec in records.values() for k, v in rec.items() if isinstance(v, int | float)}


def screen_train_reply(msg: Message, partition_id: int, dim: int, codec: Codec) -> ClientUpdate | Failure:
    """Decode a training reply with the uplink ``codec`` into a :class:`ClientUpdate`, or
    explain why it is rejected."""
    if msg.has_error():
        return Failure(partition_id, f"client error: {msg.error.reason}")
    arrays = msg.content.array_records.get("update")
    if arrays is None:
        return Failure(partition_id, "reply has no 'update' record")
    metrics = _metrics(msg)
    num_examples = int(metrics.get("num-examples", 0))
    if num_examples <= 0:
        return Failure(partition_id, "reply has no positive 'num-examples'")
    try:
        payload = codec.from_arrays({k: v.numpy() for k, v in arrays.items()})
        update = codec.decode(payload)
    except (KeyError, TypeError, ValueError) as exc:
        return Failure(partition_id, f"update cannot be decoded: {exc}")
    if update.dim() != 1 or update.numel() != dim:
        return Failure(partition_id, f"update has shape {tuple(update.shape)}, expected ({dim},)")
    if not torch.isfinite(update).all():
        return Failure(partition_id, "update holds NaN or Inf")
    return ClientUpdate(partition_id, num_examples, update.to(torch.float32), payload.nbytes, metrics)


def screen_train_replies(
    replies: list[Message], sent: dict[int, int], dim: int, codec: Codec
) -> tuple[list[ClientUpdate], list[Failure]]:
    """Screen the replies of one round.

    Parameters
    ----------
    replies : list[Message]
        Replies received before the timeout.
    sent : dict[int, int]
        node id -> partition id of every client asked to train this round; a client with
        no reply timed out.
    dim : int
        Length of the flat model vector.
    codec : Codec
        The uplink codec the clients encode with.

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
        result = screen_train_reply(msg, sent[node], dim, codec)
        (failures if isinstance(result, Failure) else accepted).append(result)
    failures += [Failure(pid, "no reply before the timeout") for node, pid in sent.items() if node not in answered]
    for f in failures:
        log.warning("client %d rejected: %s", f.partition_id, f.reason)
    accepted.sort(key=lambda u: u.partition_id)
    failures.sort(key=lambda f: f.partition_id)
    return accepted, failures

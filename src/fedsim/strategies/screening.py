"""Checking the replies a Flower app's strategy receives, one reply at a time, by node id.

Flower's FedAvg checks the replies of a round together and raises
``InconsistentMessageReplies`` on the first malformed one, which ends the run. The
strategies of :mod:`fedsim.flower` check every reply on its own instead, as fedsim's own
engine does (:mod:`fedsim.strategies.replies`): a reply that carries an error, arrays that
do not match the global model (missing or extra keys, another shape, NaN or Inf), or no
usable weight (the ``weighted_by_key`` entry of its one MetricRecord) is dropped with a
warning that names the node and the reason, and the round goes on with the others. A
reply whose MetricRecord has another form (keys, list lengths) than most replies of the
round is dropped too, so the metric aggregation never mixes records of different form.

The warnings go to Flower's logger, beside the strategy's own log lines.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import WARNING

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.supercore import log

__all__ = ["AcceptedReply", "Rejection", "screen_evaluate_replies", "screen_train_replies"]


@dataclass(frozen=True)
class AcceptedReply:
    """A reply that passed the checks.

    Attributes
    ----------
    node_id : int
        The Flower node that sent it.
    weight : float
        Its ``weighted_by_key`` value (e.g. its number of training examples), > 0.
    content : RecordDict
        The reply's content, for the metric aggregation.
    arrays : dict of str to numpy.ndarray
        Training replies: the node's trained arrays, named and shaped as the global model's.
    """

    node_id: int
    weight: float
    content: RecordDict
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class Rejection:
    """A reply that was dropped, and why."""

    node_id: int
    reason: str


def _metric_record(content: RecordDict) -> MetricRecord | str:
    records = content.metric_records
    if len(records) != 1:
        return f"reply has {len(records)} MetricRecords, expected 1"
    return next(iter(records.values()))


def _weight(metrics: MetricRecord, weighted_by_key: str) -> float | str:
    """The reply's weight, or why it has none."""
    if weighted_by_key not in metrics:
        return f"its MetricRecord has no {weighted_by_key!r}"
    value = metrics[weighted_by_key]
    if isinstance(value, list) or not math.isfinite(value) or value <= 0:
        return f"{weighted_by_key!r} must be a positive number, got {value!r}"
    return float(value)


def _arrays(content: RecordDict, reference: ArrayRecord) -> dict[str, np.ndarray] | str:
    """The reply's arrays if they match ``reference`` key for key and shape for shape and
    hold finite numbers, or why they do not."""
    records = content.array_records
    if len(records) != 1:
        return f"reply has {len(records)} ArrayRecords, expected 1"
    arrays = next(iter(records.values()))
    missing = [name for name in reference if name not in arrays]
    unexpected = [name for name in arrays if name not in reference]
    if missing or unexpected:
        return f"arrays do not match the global model's: missing {missing}, unexpected {unexpected}"
    values = {}
    for name, expected in reference.items():
        got = arrays[name]
        if tuple(got.shape) != tuple(expected.shape):
            return f"array {name!r} has shape {tuple(got.shape)}, expected {tuple(expected.shape)}"
        value = got.numpy()
        if value.dtype.kind not in "biuf":
            return f"array {name!r} holds {value.dtype}, not numbers"
        if not np.isfinite(value).all():
            return f"array {name!r} holds NaN or Inf"
        values[name] = value
    return values


def _form(metrics: MetricRecord) -> frozenset[tuple[str, int | None]]:
    """The keys of a MetricRecord with the length of each list value (None for a number)."""
    return frozenset((key, len(value) if isinstance(value, list) else None) for key, value in metrics.items())


def _same_form(accepted: list[AcceptedReply]) -> tuple[list[AcceptedReply], list[Rejection]]:
    """Keep the replies whose MetricRecord has the round's most common form (ties: the
    form of the lowest node id); ``accepted`` is sorted by node id."""
    forms = [_form(_metric_record(reply.content)) for reply in accepted]
    counts = Counter(forms)
    common = max(counts, key=lambda form: (counts[form], -forms.index(form)))
    keys = sorted(key for key, _ in common)
    kept = [reply for reply, form in zip(accepted, forms, strict=True) if form == common]
    dropped = [Rejection(reply.node_id, f"its MetricRecord ({sorted(key for key, _ in form)}) differs in form "
                                        f"from the other replies' ({keys})")
               for reply, form in zip(accepted, forms, strict=True) if form != common]
    return kept, dropped


def _screen(replies: Iterable[Message], weighted_by_key: str, reference: ArrayRecord | None
            ) -> tuple[list[AcceptedReply], list[Rejection]]:
    accepted: list[AcceptedReply] = []
    rejected: list[Rejection] = []
    for msg in replies:
        node = msg.metadata.src_node_id
        if msg.has_error():
            rejected.append(Rejection(node, f"client error: {msg.error.reason}"))
            continue
        metrics = _metric_record(msg.content)
        weight = metrics if isinstance(metrics, str) else _weight(metrics, weighted_by_key)
        arrays = {} if reference is None or isinstance(weight, str) else _arrays(msg.content, reference)
        reason = next((r for r in (weight, arrays) if isinstance(r, str)), None)
        if reason is not None:
            rejected.append(Rejection(node, reason))
        else:
            accepted.append(AcceptedReply(node, weight, msg.content, arrays))
    accepted.sort(key=lambda reply: reply.node_id)
    if accepted:
        accepted, inconsistent = _same_form(accepted)
        rejected += inconsistent
    rejected.sort(key=lambda rejection: rejection.node_id)
    for rejection in rejected:
        log(WARNING, "node %d: reply dropped: %s", rejection.node_id, rejection.reason)
    return accepted, rejected


def screen_train_replies(replies: Iterable[Message], reference: ArrayRecord, weighted_by_key: str
                         ) -> tuple[list[AcceptedReply], list[Rejection]]:
    """Screen a round's training replies against the global model they trained from.

    Parameters
    ----------
    replies : iterable of Message
        The replies of the round.
    reference : ArrayRecord
        The global arrays sent this round: every reply must carry one ArrayRecord with the
        same keys and shapes, holding finite numbers.
    weighted_by_key : str
        The MetricRecord entry that weighs each reply (positive number).

    Returns
    -------
    The accepted replies sorted by node id (so aggregation order is reproducible), and the
    rejections sorted by node id; each rejection is logged as a warning.
    """
    return _screen(replies, weighted_by_key, reference)


def screen_evaluate_replies(replies: Iterable[Message], weighted_by_key: str
                            ) -> tuple[list[AcceptedReply], list[Rejection]]:
    """Screen a round's evaluation replies: one MetricRecord with a positive
    ``weighted_by_key``, of the same form as the other replies'. Returns as
    :func:`screen_train_replies` does."""
    return _screen(replies, weighted_by_key, None)

"""Client-level outcomes of a round: federated evaluation (the example-weighted means over
the clients' test splits, and their spread), the mean of the training metrics.

Under skew the example-weighted mean accuracy over the clients' test splits hides the clients
a method leaves behind; the spread of the per-client accuracies shows them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from flwr.app import Message

    from fedsim.strategies.replies import ClientUpdate

__all__ = ["PERCENTILES", "QUANTILES", "TRAIN_METRICS", "ClientEvaluation", "accuracy_quantiles",
           "client_accuracy_percentiles", "client_evaluations",
           "federated_metrics", "mean_train_metrics", "perplexity_metrics", "personal_accuracy_metrics"]

TRAIN_METRICS = ("train_loss", "train_accuracy", "train_tokens_per_s")
"""Training metrics a row averages over the round's clients (a language model's clients report
the tokens they trained on per second of their training)."""

PERCENTILES = (10, 50, 90)
QUANTILES = tuple(range(0, 101, 5))
"""The percents of ``client_accuracy_quantiles`` and ``personal_accuracy_quantiles``."""

log = logging.getLogger(__name__)


def client_accuracy_percentiles(accuracies: Sequence[float]) -> dict[str, float]:
    """The 10th, 50th and 90th percentile of the clients' own test accuracies.

    Parameters
    ----------
    accuracies : sequence of float
        One accuracy per evaluated client (clients without test samples left out).

    Returns
    -------
    dict[str, float]
        ``client_accuracy_p10``, ``client_accuracy_p50``, ``client_accuracy_p90``
        (linear interpolation between the sorted values, numpy's default); empty when there
        are no accuracies.
    """
    if len(accuracies) == 0:
        return {}
    values = np.percentile(np.asarray(accuracies, dtype=np.float64), PERCENTILES)
    return {f"client_accuracy_p{q}": float(v) for q, v in zip(PERCENTILES, values, strict=True)}


def accuracy_quantiles(accuracies: Sequence[float]) -> list[float]:
    """The clients' accuracies at the ``QUANTILES`` (0, 5, ..., 100 percent; numpy's linear
    interpolation): the sorted-accuracy curve of the clients in a fixed number of values,
    however many clients there are (the distribution figures of ``fedsim bench`` draw it)."""
    return [float(v) for v in np.percentile(np.asarray(accuracies, dtype=np.float64), QUANTILES)]


def mean_train_metrics(updates: Sequence[ClientUpdate]) -> dict[str, float]:
    """The example-weighted mean of each training metric over the updates that report it
    (the denominator counts the examples of those updates only); absent when none does."""
    means = {}
    for key in TRAIN_METRICS:
        reported = [u for u in updates if key in u.metrics]
        examples = sum(u.num_examples for u in reported)
        if examples:
            means[key] = sum(u.metrics[key] * u.num_examples for u in reported) / examples
    return means


@dataclass(frozen=True)
class ClientEvaluation:
    """What one client's evaluation reply reports: its test examples, and the model's mean
    loss and accuracy on them."""

    num_examples: int
    loss: float
    accuracy: float
    personal_accuracy: float | None = None
    perplexity: float | None = None


def client_evaluations(replies: Iterable[Message], pid_of: Mapping[int, int]) -> list[ClientEvaluation]:
    """The evaluations the replies carry (``num-examples``, ``eval_loss``, ``eval_accuracy`` of
    their metric record, and ``personal_accuracy`` where the client has a personal model), in
    reply order; a reply with an error is logged with its client
    (``pid_of``: node id -> partition id) and left out."""
    evaluations = []
    for msg in replies:
        if msg.has_error():
            log.warning("evaluation failed on client %s: %s", pid_of.get(msg.metadata.src_node_id), msg.error.reason)
            continue
        record = next(iter(msg.content.metric_records.values()))
        personal = float(record["personal_accuracy"]) if "personal_accuracy" in record else None
        perplexity = float(record["eval_perplexity"]) if "eval_perplexity" in record else None
        evaluations.append(ClientEvaluation(int(record["num-examples"]), float(record["eval_loss"]),
                                            float(record["eval_accuracy"]), personal, perplexity))
    return evaluations


def federated_metrics(evaluations: Sequence[ClientEvaluation]) -> dict[str, Any]:
    """``federated_loss`` and ``federated_accuracy``, example-weighted over the clients' test
    splits, and the percentiles of the accuracies of the clients that have test examples
    (:func:`client_accuracy_percentiles`) with their ``client_accuracy_quantiles``
    (:func:`accuracy_quantiles`), and of their personalised models' accuracies where
    they have them (:func:`personal_accuracy_metrics`); empty when no client has any."""
    total = sum(e.num_examples for e in evaluations)
    if total == 0:
        return {}
    loss, correct = 0.0, 0.0
    for e in evaluations:
        loss += e.loss * e.num_examples
        correct += e.accuracy * e.num_examples
    return {"federated_loss": loss / total, "federated_accuracy": correct / total,
            **client_accuracy_percentiles([e.accuracy for e in evaluations if e.num_examples > 0]),
            "client_accuracy_quantiles": accuracy_quantiles([e.accuracy for e in evaluations if e.num_examples > 0]),
            **personal_accuracy_metrics([e.personal_accuracy for e in evaluations
                                         if e.num_examples > 0 and e.personal_accuracy is not None]),
            **perplexity_metrics([e.perplexity for e in evaluations if e.num_examples > 0 and e.perplexity is not None],
                                 loss / total)}


def perplexity_metrics(perplexities: Sequence[float], federated_loss: float) -> dict[str, float]:
    """A language model's ``client_perplexity_p10/p50/p90`` (percentiles of the clients' own
    perplexities ``exp(mean token NLL)`` on their test splits) and ``federated_perplexity``,
    ``exp(federated_loss)``: the perplexity of all their test tokens together; empty when no
    client reports one (not a language model)."""
    if len(perplexities) == 0:
        return {}
    values = np.percentile(np.asarray(perplexities, dtype=np.float64), PERCENTILES)
    return {**{f"client_perplexity_p{q}": float(v) for q, v in zip(PERCENTILES, values, strict=True)},
            "federated_perplexity": float(np.exp(federated_loss))}


def personal_accuracy_metrics(accuracies: Sequence[float]) -> dict[str, Any]:
    """``personal_accuracy_p10/p50/p90``, ``personal_accuracy_mean`` and
    ``personal_accuracy_quantiles`` (:func:`accuracy_quantiles`) of the clients' personalised
    models on their own test splits, one client one value (weighted by nothing); empty when no
    client reports one."""
    if len(accuracies) == 0:
        return {}
    percentiles = client_accuracy_percentiles(accuracies)
    return {**{key.replace("client_", "personal_"): value for key, value in percentiles.items()},
            "personal_accuracy_mean": float(np.mean(accuracies)),
            "personal_accuracy_quantiles": accuracy_quantiles(accuracies)}

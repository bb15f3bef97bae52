"""Client-level outcomes of a round: the spread of federated evaluation, the mean of the
training metrics.

Under skew the example-weighted mean accuracy over the clients' test splits hides the clients
a method leaves behind; the spread of the per-client accuracies shows them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from fedsim.strategies.replies import ClientUpdate

__all__ = ["PERCENTILES", "TRAIN_METRICS", "client_accuracy_percentiles", "mean_train_metrics"]

TRAIN_METRICS = ("train_loss", "train_accuracy")

PERCENTILES = (10, 50, 90)


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

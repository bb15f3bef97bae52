"""Client-level outcomes of federated evaluation.

Under skew the example-weighted mean accuracy over the clients' test splits hides the clients
a method leaves behind; the spread of the per-client accuracies shows them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["PERCENTILES", "client_accuracy_percentiles"]

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

"""How heterogeneous a partition is: measures of label and size skew, and a heatmap.

NIID-Bench (Li et al., "Federated Learning on Non-IID Data Silos: An Experimental Study",
ICDE 2022, arXiv:2102.02079) sorts non-IID settings into label distribution skew, label
quantity skew, feature skew and quantity skew. The measures here put a number on the
label and size kinds, from the clients x labels count matrix alone:

- label skew: the total-variation distance between client ``i``'s label distribution
  ``p_i`` and the global one ``p`` (all clients' samples pooled),
  ``TV_i = 1/2 sum_c |p_i(c) - p(c)|``, 0 for a client that looks like the whole, 1 at most;
  and the number of labels a client holds;
- size skew: the spread of client sizes ``n_i`` (min, max, mean, standard deviation and the
  coefficient of variation ``std / mean``).

Hand-written: flwr-datasets has partitioners and plots of label counts, no measures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


def label_tv_distances(hist: np.ndarray) -> np.ndarray:
    """Total-variation distance of every client's label distribution to the global one.

    Parameters
    ----------
    hist : np.ndarray
        Label counts, shape ``(num_clients, num_classes)``; every client holds a sample.

    Returns
    -------
    np.ndarray
        ``TV_i = 1/2 sum_c |n_ic / n_i - N_c / N|``, shape ``(num_clients,)``.
    """
    hist = _counts(hist)
    sizes = hist.sum(axis=1, keepdims=True)
    if (sizes == 0).any():
        raise ValueError("label_tv_distances: every client needs at least one sample")
    client = hist / sizes
    overall = hist.sum(axis=0) / hist.sum()
    return 0.5 * np.abs(client - overall).sum(axis=1)


def heterogeneity(hist: np.ndarray) -> dict[str, float]:
    """Summary measures of label and size skew of a partition.

    Parameters
    ----------
    hist : np.ndarray
        Label counts, shape ``(num_clients, num_classes)``.

    Returns
    -------
    dict[str, float]
        ``label_tv_mean`` and ``label_tv_max`` (see :func:`label_tv_distances`),
        ``labels_per_client_mean``, and the size spread ``size_min``, ``size_max``,
        ``size_mean``, ``size_std`` (population) and ``size_cv`` (``std / mean``).
    """
    hist = _counts(hist)
    tv = label_tv_distances(hist)
    sizes = hist.sum(axis=1).astype(np.float64)
    return {
        "label_tv_mean": float(tv.mean()),
        "label_tv_max": float(tv.max()),
        "labels_per_client_mean": float((hist > 0).sum(axis=1).mean()),
        "size_min": int(sizes.min()),
        "size_max": int(sizes.max()),
        "size_mean": float(sizes.mean()),
        "size_std": float(sizes.std()),
        "size_cv": float(sizes.std() / sizes.mean()),
    }


def partition_report(
    hist: np.ndarray, train_sizes: list[int] | None = None, noise_std: list[float] | None = None
) -> dict[str, Any]:
    """The content of ``partition.json``: per client its size and label counts, and the
    :func:`heterogeneity` measures.

    Parameters
    ----------
    hist : np.ndarray
        Label counts of every client's samples (train and test split together),
        shape ``(num_clients, num_classes)``.
    train_sizes : list[int] or None, default None
        Size of each client's train split (the rest is its test split), if known.
    noise_std : list[float] or None, default None
        Standard deviation of each client's input noise (feature-noise skew), if any.

    Returns
    -------
    dict
        ``{"clients": [{"id", "size", "label_counts", ...}], "heterogeneity": {...}}``.
    """
    hist = _counts(hist)
    clients = []
    for i, counts in enumerate(hist):
        entry: dict[str, Any] = {"id": i, "size": int(counts.sum()), "label_counts": counts.tolist()}
        if train_sizes is not None:
            entry["train_size"] = int(train_sizes[i])
            entry["test_size"] = int(counts.sum()) - int(train_sizes[i])
        if noise_std is not None:
            entry["noise_std"] = float(noise_std[i])
        clients.append(entry)
    measures: dict[str, Any] = heterogeneity(hist)
    if noise_std is not None:
        measures["noise_std_max"] = float(max(noise_std))
    return {"clients": clients, "heterogeneity": measures}


def plot_partition(hist: np.ndarray, path: str | Path, title: str = "") -> None:
    """Save a clients x labels heatmap of a partition, with the client sizes above it.

    Each column is a client; its cells are the shares of its samples per label, so label
    skew shows as a few bright cells per column, whatever the client's size; the bars above
    give the sizes. Columns stay one pixel wide or more at a few hundred clients.

    Parameters
    ----------
    hist : np.ndarray
        Label counts, shape ``(num_clients, num_classes)``.
    path : str or Path
        Where to write the PNG.
    title : str, default ""
        Shown before the heterogeneity measures in the title.
    """
    hist = _counts(hist)
    num_clients, num_classes = hist.shape
    sizes = hist.sum(axis=1)
    shares = hist / np.maximum(sizes[:, None], 1)
    measures = heterogeneity(hist)
    width = float(np.clip(3.0 + 0.06 * num_clients, 6.0, 18.0))
    height = float(np.clip(1.5 + 0.22 * num_classes, 3.0, 12.0)) + 1.2
    fig = Figure(figsize=(width, height), layout="constrained")
    size_ax, heat_ax = fig.subplots(2, 1, sharex=True, height_ratios=[1, 3.5])
    clients = np.arange(num_clients)
    size_ax.bar(clients, sizes, width=1.0, color="0.45")
    size_ax.set_ylabel("samples")
    size_ax.set_title(
        f"{title + ': ' if title else ''}{num_clients} clients; mean label TV "
        f"{measures['label_tv_mean']:.2f}, {measures['labels_per_client_mean']:.1f} labels per "
        f"client, size CV {measures['size_cv']:.2f}",
        fontsize="medium",
    )
    image = heat_ax.imshow(
        shares.T, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0.0, vmax=1.0,
        extent=(-0.5, num_clients - 0.5, num_classes - 0.5, -0.5),
    )
    heat_ax.set_xlabel("client")
    heat_ax.set_ylabel("label")
    heat_ax.xaxis.set_major_locator(MaxNLocator(nbins=12, integer=True))
    heat_ax.yaxis.set_major_locator(MaxNLocator(nbins=min(num_classes, 20), integer=True))
    fig.colorbar(image, ax=heat_ax, label="share of the client's samples", pad=0.01)
    fig.savefig(path, format="png", dpi=100)


def _counts(hist: np.ndarray) -> np.ndarray:
    hist = np.asarray(hist)
    if hist.ndim != 2 or hist.shape[0] == 0 or hist.shape[1] == 0:
        raise ValueError(f"hist must be 2-D (clients, labels), non-empty; got shape {hist.shape}")
    if (hist < 0).any():
        raise ValueError("hist holds negative counts")
    return hist

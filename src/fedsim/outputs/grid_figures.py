"""Figures of a benchmark grid that stay legible with many settings: small multiples of
curves (one panel per cell of the grid, one colour per compared method, one legend) and
annotated heatmaps (methods x settings)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

Series = dict[str, list[dict[str, Any]]]


def plot_panels(panels: dict[str, Series], path: Path, key: str = "centralised_accuracy", x_key: str = "round",
                ylabel: str | None = None, max_columns: int = 4) -> Path:
    """Small multiples: one panel per entry of ``panels``, in it one curve of ``key`` against
    ``x_key`` per named series, shaded between the rows' ``<key>_min`` and ``<key>_max``
    where they have them (the seeds' spread). A name keeps its colour in every panel and
    appears once in the legend under the panels; the panels share their axes.

    Parameters
    ----------
    panels : dict of str to dict of str to list of dict
        Panel title -> series name -> metrics rows.
    path : Path
        Where to write the PNG.
    key, x_key : str
        The row keys drawn on the y and x axis.
    ylabel : str or None
        The y axis name (else ``key``).
    max_columns : int, default 4
        Panels per row.
    """
    names = list(dict.fromkeys(name for series in panels.values() for name in series))
    colours = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    colour = {name: colours(i % colours.N) for i, name in enumerate(names)}
    count = max(len(panels), 1)
    columns = min(count, max_columns)
    rows = math.ceil(count / columns)
    legend_rows = math.ceil(len(names) / min(max(len(names), 1), 4))
    height = 2.8 * rows + 0.28 * legend_rows + 0.4
    fig, axes = plt.subplots(rows, columns, figsize=(3.8 * columns + 0.4, height), sharex=True, sharey=True,
                             squeeze=False)
    for ax, (title, series) in zip(axes.flat, panels.items()):
        for name, points in series.items():
            xy = [(r[x_key], r[key]) for r in points if r.get(key) is not None and r.get(x_key) is not None]
            if xy:
                ax.plot(*zip(*xy, strict=True), color=colour[name], linewidth=1.4)
            band = [(r[x_key], r[f"{key}_min"], r[f"{key}_max"]) for r in points
                    if r.get(f"{key}_min") is not None and r.get(f"{key}_max") is not None]
            if band:
                ax.fill_between(*zip(*band, strict=True), color=colour[name], alpha=0.18, linewidth=0)
        ax.set_title(title, fontsize="small")
        ax.grid(alpha=0.3)
        if x_key == "round":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for column in range(columns):  # the lowest panel of every column carries the x axis
        lowest = axes[max(r for r in range(rows) if r * columns + column < count), column]
        lowest.xaxis.set_tick_params(labelbottom=True)
        lowest.set_xlabel(x_key.replace("_", " "))
    for ax in axes[:, 0]:
        ax.set_ylabel(ylabel or key.replace("_", " "))
    handles = [plt.Line2D([], [], color=colour[name], linewidth=2) for name in names]
    fig.legend(handles, names, loc="lower center", ncols=min(len(names), 4) or 1, fontsize="small",
               frameon=False)
    fig.tight_layout(rect=(0, (0.28 * legend_rows + 0.2) / height, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_heatmaps(tables: dict[str, tuple[list[str], list[str], np.ndarray, np.ndarray]], path: Path, label: str,
                  max_columns: int = 2) -> Path:
    """Annotated heatmaps, one panel per table, on one colour scale; each cell shows its
    value and, under it, its spread (``±`` the seeds' standard deviation).

    Parameters
    ----------
    tables : dict of str to (list of str, list of str, np.ndarray, np.ndarray)
        Panel title -> (row names, column names, values of shape (rows, columns), their
        spreads of the same shape); NaN for a missing cell or spread.
    path : Path
        Where to write the PNG.
    label : str
        What the values are (the colour bar's name).
    max_columns : int, default 2
        Panels per row.
    """
    values = [v for _, _, v, _ in tables.values() if np.isfinite(v).any()]
    low = min((float(np.nanmin(v)) for v in values), default=0.0)
    high = max((float(np.nanmax(v)) for v in values), default=1.0)
    count = max(len(tables), 1)
    columns = min(count, max_columns)
    rows = math.ceil(count / columns)
    widest = max((len(c) for _, c, _, _ in tables.values()), default=1)
    tallest = max((len(r) for r, _, _, _ in tables.values()), default=1)
    name_width = max((len(n) for r, _, _, _ in tables.values() for n in r), default=4)
    fig, axes = plt.subplots(rows, columns, squeeze=False, layout="constrained",
                             figsize=(columns * (0.09 * name_width + 0.95 * widest + 1.2), rows * (0.6 * tallest + 1.6)))
    image = None
    for ax, (title, (row_names, column_names, matrix, spread)) in zip(axes.flat, tables.items()):
        image = ax.imshow(np.ma.masked_invalid(matrix), cmap="viridis", vmin=low, vmax=high, aspect="auto")
        ax.set_xticks(range(len(column_names)), column_names, rotation=30, ha="right", fontsize="small")
        ax.set_yticks(range(len(row_names)), row_names, fontsize="small")
        ax.set_title(title, fontsize="medium")
        middle = (low + high) / 2
        for (i, j), value in np.ndenumerate(matrix):
            text = "-" if not np.isfinite(value) else f"{value:.2f}"
            if np.isfinite(value) and np.isfinite(spread[i, j]):
                text += f"\n±{spread[i, j]:.2f}"
            ax.text(j, i, text, ha="center", va="center", fontsize="x-small",
                    color="white" if not np.isfinite(value) or value < middle else "black")
    for ax in axes.flat[len(tables):]:
        ax.set_visible(False)
    if image is not None:
        fig.colorbar(image, ax=axes, label=label, shrink=0.8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

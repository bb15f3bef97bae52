"""Accuracy and loss curves of one run, and comparison plots of several."""

from __future__ import annotations

from pathlib import Path
from typing import Any

CURVES = (("accuracy", ("centralised_accuracy", "federated_accuracy", "robust_accuracy")),
          ("loss", ("centralised_loss", "federated_loss", "train_loss")))


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend, imported when a plot is drawn (it
    takes a second to import, and client processes never draw)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_run(rows: list[dict[str, Any]], out_dir: Path, x_key: str = "round") -> list[Path]:
    """Write accuracy.png and loss.png for one run's metrics rows."""
    plt = _pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, keys in CURVES:
        fig, ax = plt.subplots(figsize=(6, 4))
        for key in keys:
            points = [(r[x_key], r[key]) for r in rows if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points, strict=True), marker=".", label=key.replace("_", " "))
        ax.set_xlabel(x_key.replace("_", " "))
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        if ax.lines:  # a run without these metrics (evaluation off) draws empty axes, no legend
            ax.legend()
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_comparison(series: dict[str, list[dict[str, Any]]], path: Path,
                    key: str = "centralised_accuracy", x_key: str = "round", ylabel: str | None = None) -> Path:
    """One curve of ``key`` per labelled run, in one figure (y axis named ``ylabel``, else
    after ``key``)."""
    plt = _pyplot()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, rows in series.items():
        points = [(r[x_key], r[key]) for r in rows if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points, strict=True), label=label)
    ax.set_xlabel(x_key.replace("_", " "))
    ax.set_ylabel(ylabel or key.replace("_", " "))
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

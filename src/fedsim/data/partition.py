"""Client partitions of a labelled dataset, drawn with flwr-datasets' partitioners.

The partitioners work on a Hugging Face ``datasets.Dataset``; fedsim hands them a
one-column dataset of labels plus the row index, and reads the indices back, so the
samples themselves stay in numpy.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedsim.notices import warnings_dropped_while

if TYPE_CHECKING:
    from flwr_datasets.partitioner import Partitioner

PARTITIONS = ("iid", "dirichlet", "shards", "quantity", "natural", "pathological", "feature_noise")

PARTITIONER_NOTICES = (
    # flwr-datasets' PathologicalPartitioner, when clients x labels per client leave labels
    # to no client: fedsim's label histograms (fedsim partition) show which
    (r"Classes: \[.*\] will NOT be used due to the chosen configuration", UserWarning,
     r"flwr_datasets\.partitioner\.pathological_partitioner"),
    # pyarrow 25 deprecates an option that Hugging Face datasets' sort (ShardPartitioner) sets
    (r"Specifying null_placement in SortOptions is deprecated", FutureWarning, r"pyarrow\.compute"),
)
"""Warnings of the partitioners that fedsim drops while it partitions (fedsim.notices)."""


class PartitionError(ValueError):
    """A partition the data cannot satisfy (more clients than samples, more labels per
    client than classes, ...); the message is one line naming the setting."""


def partition_indices(
    labels: np.ndarray,
    scheme: str,
    num_partitions: int,
    seed: int,
    *,
    alpha: float = 0.5,
    shards_per_client: int = 2,
    quantity_alpha: float = 0.5,
    min_size: int = 2,
    classes_per_client: int = 2,
    groups: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Split sample indices among clients.

    Parameters
    ----------
    labels : np.ndarray
        Integer class label of every sample, shape ``(N,)``.
    scheme : str
        One of ``PARTITIONS``:

        - ``"iid"``: a seeded shuffle cut into ``num_partitions`` equal parts.
        - ``"dirichlet"``: label skew, each class split among clients with proportions
          drawn from Dirichlet(``alpha``) (Yurochkin et al., arXiv:1905.12022).
        - ``"shards"``: label skew, the label-sorted data cut into
          ``num_partitions * shards_per_client`` equal shards, each client getting
          ``shards_per_client`` random ones (McMahan et al., arXiv:1602.05629); the
          remainder of the division is left out.
        - ``"quantity"``: quantity skew, client sizes ``min_size`` plus a share drawn
          from Dirichlet(``quantity_alpha``), labels IID.
        - ``"natural"``: one client per distinct value of ``groups``; partition ``i``
          holds the ``i``-th smallest group id.
        - ``"pathological"``: label quantity skew #C=k of NIID-Bench (Li et al.,
          arXiv:2102.02079): each client holds exactly ``classes_per_client`` labels,
          the first ``i mod K`` (so every label is used once there are K clients), the
          others drawn at random; each label's samples are split equally among the
          clients that hold it (flwr-datasets' ``PathologicalPartitioner``,
          ``first-deterministic``).
        - ``"feature_noise"``: IID labels, as ``"iid"``; the noise of NIID-Bench's
          noise-based feature skew is added to the inputs by :func:`feature_noise`.
    num_partitions : int
        Number of clients; for ``"natural"`` it must equal the number of groups.
    seed : int
        Seed; the same arguments always give the same partitions.
    alpha : float, default 0.5
        Dirichlet concentration of ``"dirichlet"``; smaller is more skewed.
    shards_per_client : int, default 2
        Shards per client of ``"shards"``.
    quantity_alpha : float, default 0.5
        Dirichlet concentration of the client sizes of ``"quantity"``.
    min_size : int, default 2
        Smallest client of ``"dirichlet"`` and ``"quantity"``.
    classes_per_client : int, default 2
        Labels per client of ``"pathological"``.
    groups : np.ndarray or None, default None
        Natural client id of every sample, needed by ``"natural"``.

    Returns
    -------
    list[np.ndarray]
        ``num_partitions`` sorted int64 index arrays, none empty.

    Raises
    ------
    PartitionError
        When the data cannot satisfy the setting; one line naming it.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array; got {labels.ndim}-D {labels.dtype}")
    if scheme not in PARTITIONS:
        raise PartitionError(f"'{scheme}' is not a partition scheme; known: {', '.join(PARTITIONS)}")
    if num_partitions < 1:
        raise PartitionError(f"{scheme}: num_partitions must be >= 1; got {num_partitions}")
    if scheme != "natural" and num_partitions > len(labels):
        raise PartitionError(
            f"{scheme}: {num_partitions} partitions need at least as many samples; "
            f"got {len(labels)}"
        )
    if scheme == "pathological":
        _check_pathological(labels, num_partitions, classes_per_client)
    columns = {"label": labels, "idx": np.arange(len(labels))}
    if scheme == "natural":
        if groups is None:
            raise PartitionError("natural: needs groups (the natural client id of every sample)")
        groups = np.asarray(groups)
        if groups.shape != labels.shape:
            raise PartitionError(
                f"natural: groups has shape {groups.shape} but labels has {labels.shape}"
            )
        num_groups = len(np.unique(groups))
        if num_groups != num_partitions:
            raise PartitionError(
                f"natural: the groups hold {num_groups} natural clients "
                f"but num_partitions is {num_partitions}"
            )
        return natural_partitions(groups)
    import datasets  # Hugging Face datasets takes seconds to import; only the partitioners need it

    table = datasets.Dataset.from_dict(columns)
    if scheme in ("iid", "quantity", "feature_noise"):
        table = table.shuffle(seed=seed)
    partitioner = _make_partitioner(
        scheme,
        num_partitions,
        len(labels),
        seed,
        alpha=alpha,
        shards_per_client=shards_per_client,
        quantity_alpha=quantity_alpha,
        min_size=min_size,
        classes_per_client=classes_per_client,
    )
    partitioner.dataset = table
    try:
        with warnings_dropped_while(PARTITIONER_NOTICES):
            parts = [
                np.sort(partitioner.load_partition(pid).with_format("numpy")[:]["idx"])
                for pid in range(num_partitions)
            ]
    except ValueError as err:
        if scheme == "dirichlet":  # DirichletPartitioner gives up after 10 draws
            raise PartitionError(
                f"dirichlet: no draw at alpha {alpha} gave every one of {num_partitions} "
                f"partitions >= {min_size} samples; raise alpha or lower min_size"
            ) from err
        if scheme == "pathological":  # a random extra label drew more holders than samples
            raise PartitionError(
                f"pathological: at {num_partitions} clients x {classes_per_client} labels some "
                f"label has fewer samples than clients holding it; use fewer clients or labels"
            ) from err
        raise
    empty = [pid for pid, part in enumerate(parts) if len(part) == 0]
    if empty:
        raise PartitionError(f"{scheme}: partitions {empty} came out empty; use fewer partitions")
    return [part.astype(np.int64) for part in parts]


def natural_partitions(groups: np.ndarray) -> list[np.ndarray]:
    """One partition per distinct group id, partition ``i`` holding the ``i``-th smallest.

    The split of flwr-datasets' ``NaturalIdPartitioner`` (tested equal), computed with one
    stable sort: the partitioner materialises each partition as a Hugging Face dataset
    (about 20 ms each), minutes for a 10,000-client federation.
    """
    order = np.argsort(groups, kind="stable")
    _, starts = np.unique(groups[order], return_index=True)
    return [part.astype(np.int64) for part in np.split(order, starts[1:])]


def _make_partitioner(
    scheme: str,
    num_partitions: int,
    num_samples: int,
    seed: int,
    *,
    alpha: float,
    shards_per_client: int,
    quantity_alpha: float,
    min_size: int,
    classes_per_client: int,
) -> Partitioner:
    """Build the flwr-datasets partitioner that implements ``scheme``."""
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        PathologicalPartitioner,
        ShardPartitioner,
        SizePartitioner,
    )

    if scheme in ("iid", "feature_noise"):  # feature skew: IID labels, noisy inputs
        return IidPartitioner(num_partitions=num_partitions)
    if scheme == "pathological":
        return PathologicalPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            num_classes_per_partition=int(classes_per_client),
            class_assignment_mode="first-deterministic",
            seed=seed,
        )
    if scheme == "dirichlet":
        if alpha <= 0:
            raise PartitionError(f"dirichlet: alpha must be > 0; got {alpha}")
        return DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=float(alpha),
            min_partition_size=min_size,
            seed=seed,
        )
    if scheme == "shards":
        if shards_per_client < 1:
            raise PartitionError(f"shards: shards_per_client must be >= 1; got {shards_per_client}")
        if num_partitions * shards_per_client > num_samples:
            raise PartitionError(
                f"shards: {num_partitions} partitions x {shards_per_client} shards "
                f"need at least {num_partitions * shards_per_client} samples; got {num_samples}"
            )
        return ShardPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            num_shards_per_partition=int(shards_per_client),
            seed=seed,
        )
    return SizePartitioner(
        partition_sizes=_quantity_skewed_sizes(num_samples, num_partitions, quantity_alpha, min_size, seed)
    )


def _quantity_skewed_sizes(
    num_samples: int, num_partitions: int, quantity_alpha: float, min_size: int, seed: int
) -> list[int]:
    """Client sizes: ``min_size`` each, the rest shared by Dirichlet(quantity_alpha)."""
    if quantity_alpha <= 0:
        raise PartitionError(f"quantity: quantity_alpha must be > 0; got {quantity_alpha}")
    if min_size < 1 or num_partitions * min_size > num_samples:
        raise PartitionError(
            f"quantity: min_size {min_size} x {num_partitions} partitions must be >= 1 "
            f"and at most the {num_samples} samples"
        )
    rng = np.random.default_rng(seed)
    shares = rng.dirichlet(np.full(num_partitions, quantity_alpha))
    extra = rng.multinomial(num_samples - num_partitions * min_size, shares)
    return [int(min_size + e) for e in extra]


def _check_pathological(labels: np.ndarray, num_partitions: int, classes_per_client: int) -> None:
    """Refuse a #C=k setting the labels cannot satisfy, before the partitioner draws it.

    Every label is shared equally by the clients holding it, so each label needs at least
    one sample per holder; with ``first-deterministic`` assignment label ``c`` has at least
    ``ceil((num_partitions - c) / K)`` holders.
    """
    classes, counts = np.unique(labels, return_counts=True)
    if not 1 <= classes_per_client <= len(classes):
        raise PartitionError(
            f"pathological: classes_per_client {classes_per_client} is not possible with the "
            f"{len(classes)} classes in the data; allowed 1..{len(classes)}"
        )
    first_holders = [len(range(c, num_partitions, len(classes))) for c in range(len(classes))]
    short = [(int(c), int(n), h) for c, n, h in zip(classes, counts, first_holders, strict=True) if h > n]
    if short:
        label, count, holders = short[0]
        raise PartitionError(
            f"pathological: label {label} has {count} samples but {num_partitions} clients "
            f"give it {holders} holders at least; use fewer clients"
        )


def feature_noise(
    x: np.ndarray, partitions: list[np.ndarray], noise_std: float, seed: int
) -> np.ndarray:
    """NIID-Bench's noise-based feature skew: client ``i`` of ``n`` sees its inputs plus
    Gaussian noise of standard deviation ``noise_std * i / n``.

    From "Federated Learning on Non-IID Data Silos: An Experimental Study" (Li et al.,
    ICDE 2022, arXiv:2102.02079), ``x_hat = x + N(0, sigma_i^2)``; there
    ``sigma_i = noise * i / (n - 1)``, here ``noise_std * i / n`` as fedsim's issue
    defines it, so client 0 keeps clean inputs and the last one gets ``(n - 1) / n`` of
    ``noise_std``. The noise is drawn once, seeded per client, so a client sees the same
    noisy samples every round (a property of its device, not an augmentation).

    Parameters
    ----------
    x : np.ndarray
        Inputs of every sample, shape ``(N, ...)``.
    partitions : list[np.ndarray]
        Index arrays, one per client, disjoint.
    noise_std : float
        The largest client's noise scale; must be >= 0.
    seed : int
        Seed of the noise.

    Returns
    -------
    np.ndarray
        A noisy copy of ``x`` (same dtype); samples outside every partition are unchanged.
    """
    if noise_std < 0:
        raise PartitionError(f"feature_noise: noise_std must be >= 0; got {noise_std}")
    noisy = np.array(x, copy=True)
    for client, part in enumerate(partitions):
        std = noise_std * client / len(partitions)
        rng = np.random.default_rng([seed, client])
        noisy[part] = x[part] + rng.normal(0.0, std, size=x[part].shape).astype(x.dtype)
    return noisy


def split_client(
    indices: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split one client's indices into a seeded local train and test part.

    Hand-written rather than sklearn's ``train_test_split`` because that refuses
    the one- and two-sample clients that skewed partitions produce; here the train
    part always keeps at least one sample.

    Parameters
    ----------
    indices : np.ndarray
        The client's sample indices.
    test_fraction : float
        Fraction for the test part, in [0, 1); rounded, at most ``len(indices) - 1``.
    seed : int
        Seed of the split.

    Returns
    -------
    tuple[np.ndarray, np.ndarray]
        Sorted ``(train, test)`` index arrays.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction: {test_fraction} is not in [0, 1)")
    indices = np.asarray(indices, dtype=np.int64)
    num_test = min(round(test_fraction * len(indices)), max(len(indices) - 1, 0))
    shuffled = np.random.default_rng(seed).permutation(indices)
    return np.sort(shuffled[num_test:]), np.sort(shuffled[:num_test])


def label_histograms(
    labels: np.ndarray, partitions: list[np.ndarray], num_classes: int
) -> np.ndarray:
    """Count the labels of every partition.

    Parameters
    ----------
    labels : np.ndarray
        Integer label of every sample.
    partitions : list[np.ndarray]
        Index arrays, one per client.
    num_classes : int
        Number of classes.

    Returns
    -------
    np.ndarray
        int64 counts, shape ``(len(partitions), num_classes)``.
    """
    labels = np.asarray(labels)
    return np.stack(
        [np.bincount(labels[part], minlength=num_classes) for part in partitions]
    ).astype(np.int64)


def plot_label_histograms(hist: np.ndarray, path: str | Path) -> None:
    """Save a stacked bar chart of per-client label counts as a PNG.

    Hand-written because flwr-datasets' ``plot_label_distributions`` needs a live
    partitioner, while fedsim also plots histograms stored with a run's results.

    Parameters
    ----------
    hist : np.ndarray
        Counts of shape ``(num_partitions, num_classes)``, as from ``label_histograms``.
    path : str or Path
        Where to write the PNG.
    """
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    hist = np.asarray(hist)
    if hist.ndim != 2:
        raise ValueError(f"hist must be 2-D (partitions, classes); got shape {hist.shape}")
    num_partitions, num_classes = hist.shape
    fig = Figure(figsize=(max(4.0, 0.25 * num_partitions + 2.0), 3.5))
    ax = fig.add_subplot()
    clients = np.arange(num_partitions)
    bottom = np.zeros(num_partitions)
    colors = colormaps["tab20" if num_classes > 10 else "tab10"]
    for label in range(num_classes):
        ax.bar(
            clients,
            hist[:, label],
            bottom=bottom,
            color=colors(label % colors.N),
            label=str(label),
        )
        bottom += hist[:, label]
    ax.set_xlabel("client")
    ax.set_ylabel("samples")
    ax.legend(
        title="label",
        fontsize="small",
        ncols=1 + num_classes // 20,
        loc="upper left",
        bbox_to_anchor=(1.0, 1.0),
    )
    fig.tight_layout()
    fig.savefig(path, format="png")

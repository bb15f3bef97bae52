"""Client partitions of a labelled dataset: NIID-Bench's, and McMahan et al.'s shards.

``iid``, ``dirichlet``, ``pathological`` (#C=k) and ``quantity`` are NIID-Bench's
``partition_data`` (Li et al., "Federated Learning on Non-IID Data Silos: An Experimental
Study", ICDE 2022, arXiv:2102.02079; Xtra-Computing/NIID-Bench ``utils.py``, partitions
``homo``, ``noniid-labeldir``, ``noniid-#label{k}`` and ``iid-diff-quantity``), transcribed
call for call: numpy's legacy ``RandomState`` and Python's ``random.Random`` seeded with the
run's seed make the same draws as NIID-Bench's ``np.random.seed(s)`` and ``random.seed(s)``
(``experiments.py`` seeds both with ``--init_seed`` just before ``partition_data``), so on
the same labels in the same order fedsim's seed ``s`` gives NIID-Bench's partition of
``--init_seed s`` (tested against a transcription of NIID-Bench's code). Hand-written
because flwr-datasets' partitioners differ: its ``DirichletPartitioner`` splits each label
in dataset order, balances with ``>`` instead of ``>=`` the mean size and gives up after
10 draws; its ``PathologicalPartitioner`` splits each label in dataset order too, which on
digits gives the clients of one label contiguous blocks of writers. ``shards`` is still
flwr-datasets' ``ShardPartitioner``, through a one-column Hugging Face dataset of labels
and row indices.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from fedsim.notices import warnings_dropped_while

if TYPE_CHECKING:
    from flwr_datasets.partitioner import Partitioner

PARTITIONS = ("iid", "dirichlet", "shards", "quantity", "natural", "pathological", "feature_noise")

SHARD_NOTICES = (
    # pyarrow 25 deprecates an option that Hugging Face datasets' sort (ShardPartitioner) sets
    (r"Specifying null_placement in SortOptions is deprecated", FutureWarning, r"pyarrow\.compute"),
)
"""Warnings of flwr-datasets' shard partitioner that fedsim drops while it partitions (fedsim.notices)."""

MAX_DRAWS = 10_000
"""How many Dirichlet draws ``dirichlet`` and ``quantity`` make before refusing a setting
whose minimum size does not hold (NIID-Bench draws until it holds, forever if it cannot)."""


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
    min_size: int = 10,
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

        - ``"iid"``: NIID-Bench's ``homo``, a seeded permutation cut into
          ``num_partitions`` equal parts (``np.array_split``).
        - ``"dirichlet"``: label distribution skew, NIID-Bench's ``noniid-labeldir``
          (:func:`dirichlet_partitions`): each label's samples shuffled and split among the
          clients with proportions drawn from Dirichlet(``alpha``), clients already holding
          ``N / num_partitions`` samples or more getting none of the later labels; drawn
          again until every client holds ``min_size`` samples.
        - ``"shards"``: label skew, the label-sorted data cut into
          ``num_partitions * shards_per_client`` equal shards, each client getting
          ``shards_per_client`` random ones (McMahan et al., arXiv:1602.05629); the
          remainder of the division is left out.
        - ``"quantity"``: quantity skew, NIID-Bench's ``iid-diff-quantity``
          (:func:`quantity_partitions`): a seeded permutation cut at shares drawn from
          Dirichlet(``quantity_alpha``), drawn again until every share holds ``min_size``
          samples; labels IID.
        - ``"natural"``: one client per distinct value of ``groups``; partition ``i``
          holds the ``i``-th smallest group id.
        - ``"pathological"``: label quantity skew #C=k, NIID-Bench's ``noniid-#label{k}``
          (:func:`label_quantity_partitions`): client ``i`` holds label ``i mod K`` and
          ``classes_per_client - 1`` others drawn at random; each label's samples are
          shuffled and split equally among the clients holding it.
        - ``"feature_noise"``: NIID-Bench's noise-based feature skew: the partition of
          ``"iid"``; :class:`FeatureNoise` adds each client's noise to its inputs.
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
    min_size : int, default 10
        Smallest client of ``"dirichlet"`` and ``"quantity"`` (NIID-Bench's 10).
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
    if scheme == "natural":
        parts = _natural(labels, num_partitions, groups)
    elif scheme in ("iid", "feature_noise"):
        parts = iid_partitions(len(labels), num_partitions, seed)
    elif scheme == "dirichlet":
        parts = dirichlet_partitions(labels, num_partitions, alpha, min_size, seed)
    elif scheme == "quantity":
        parts = quantity_partitions(len(labels), num_partitions, quantity_alpha, min_size, seed)
    elif scheme == "pathological":
        parts = label_quantity_partitions(labels, num_partitions, classes_per_client, seed)
    else:
        parts = _shards(labels, num_partitions, shards_per_client, seed)
    empty = [pid for pid, part in enumerate(parts) if len(part) == 0]
    if empty:
        raise PartitionError(f"{scheme}: partitions {empty} came out empty; use fewer partitions")
    return [np.sort(part).astype(np.int64) for part in parts]


def iid_partitions(num_samples: int, num_partitions: int, seed: int) -> list[np.ndarray]:
    """NIID-Bench's ``homo``: a seeded permutation of the samples cut into
    ``num_partitions`` parts whose sizes differ by one at most."""
    return np.array_split(_numpy_rng(seed).permutation(num_samples), num_partitions)


def dirichlet_partitions(
    labels: np.ndarray, num_partitions: int, alpha: float, min_size: int, seed: int
) -> list[np.ndarray]:
    """Label distribution skew, NIID-Bench's ``noniid-labeldir`` (``utils.partition_data``).

    One draw: for every label (in increasing order), shuffle its samples, draw proportions
    ``p ~ Dirichlet(alpha * 1_n)``, zero the proportion of every client that already holds
    ``N / n`` samples or more (NIID-Bench's balance step), renormalise, and cut the
    shuffled samples at ``floor(cumsum(p) * N_label)``. The draw is repeated until every
    client holds at least ``min_size`` samples (NIID-Bench: 10), at most :data:`MAX_DRAWS`
    times. A draw in which every client still open has a proportion of exactly 0 (only at
    a tiny ``alpha``; NIID-Bench would divide by 0) counts as failed.

    Parameters
    ----------
    labels : np.ndarray
        Integer label of every sample.
    num_partitions : int
        Number of clients ``n``.
    alpha : float
        Dirichlet concentration (NIID-Bench's ``--beta``); must be > 0.
    min_size : int
        Smallest client; ``n * min_size`` may not exceed the number of samples.
    seed : int
        Seed of numpy's ``RandomState`` (NIID-Bench's ``np.random.seed``), taken mod 2^32.

    Returns
    -------
    list[np.ndarray]
        One index array per client (unsorted).
    """
    if alpha <= 0:
        raise PartitionError(f"dirichlet: alpha must be > 0; got {alpha}")
    labels = np.asarray(labels)
    num_samples = len(labels)
    _check_min_size("dirichlet", num_samples, num_partitions, min_size)
    rng = _numpy_rng(seed)
    classes = np.unique(labels)
    for _ in range(MAX_DRAWS):
        splits: list[tuple[np.ndarray, np.ndarray]] = []  # (shuffled samples, cuts) per label
        sizes = np.zeros(num_partitions, dtype=np.int64)
        for label in classes:
            members = np.where(labels == label)[0]
            rng.shuffle(members)
            proportions = rng.dirichlet(np.repeat(alpha, num_partitions))
            proportions = proportions * (sizes < num_samples / num_partitions)
            if proportions.sum() == 0:
                break
            proportions = proportions / proportions.sum()
            cuts = (np.cumsum(proportions) * len(members)).astype(int)[:-1]
            splits.append((members, cuts))
            sizes += np.diff(cuts, prepend=0, append=len(members))
        else:
            if sizes.min() >= min_size:
                pieces = [np.split(members, cuts) for members, cuts in splits]
                return [np.concatenate([label_pieces[client] for label_pieces in pieces])
                        for client in range(num_partitions)]
    raise PartitionError(
        f"dirichlet: no draw of {MAX_DRAWS} at alpha {alpha} gave every one of {num_partitions} "
        f"clients >= {min_size} samples (partition.min_size); raise alpha or lower partition.min_size"
    )


def quantity_partitions(
    num_samples: int, num_partitions: int, quantity_alpha: float, min_size: int, seed: int
) -> list[np.ndarray]:
    """Quantity skew, NIID-Bench's ``iid-diff-quantity`` (``utils.partition_data``).

    A seeded permutation of the samples, cut at ``floor(cumsum(p) * N)`` with client shares
    ``p ~ Dirichlet(quantity_alpha * 1_n)``, drawn again until ``min(p) * N >= min_size``
    (NIID-Bench: 10), which makes every client hold ``min_size`` samples or more; at most
    :data:`MAX_DRAWS` draws. Labels are IID.

    Parameters
    ----------
    num_samples : int
        Number of samples ``N``.
    num_partitions : int
        Number of clients ``n``.
    quantity_alpha : float
        Dirichlet concentration of the shares (NIID-Bench's ``--beta``); must be > 0.
    min_size : int
        Smallest client; ``n * min_size`` may not exceed ``N``.
    seed : int
        Seed of numpy's ``RandomState``, taken mod 2^32.

    Returns
    -------
    list[np.ndarray]
        One index array per client (unsorted).
    """
    if quantity_alpha <= 0:
        raise PartitionError(f"quantity: quantity_alpha must be > 0; got {quantity_alpha}")
    _check_min_size("quantity", num_samples, num_partitions, min_size)
    rng = _numpy_rng(seed)
    order = rng.permutation(num_samples)
    for _ in range(MAX_DRAWS):
        proportions = rng.dirichlet(np.repeat(quantity_alpha, num_partitions))
        proportions = proportions / proportions.sum()
        if np.min(proportions * len(order)) >= min_size:
            cuts = (np.cumsum(proportions) * len(order)).astype(int)[:-1]
            return np.split(order, cuts)
    raise PartitionError(
        f"quantity: no draw of {MAX_DRAWS} at quantity_alpha {quantity_alpha} gave every one of "
        f"{num_partitions} clients >= {min_size} samples (partition.min_size); raise "
        "quantity_alpha or lower partition.min_size"
    )


def label_quantity_partitions(
    labels: np.ndarray, num_partitions: int, classes_per_client: int, seed: int
) -> list[np.ndarray]:
    """Label quantity skew #C=k, NIID-Bench's ``noniid-#label{k}`` (``utils.partition_data``).

    Client ``i`` holds the ``(i mod K)``-th label and ``k - 1`` other labels drawn uniformly
    at random, one at a time, redrawn while already held (Python's ``random.randint``);
    with ``k = K`` every client holds every label and nothing is drawn. Then for every
    label in increasing order: its samples are shuffled (numpy) and cut into as many
    near-equal parts as clients hold it (``np.array_split``), given to its holders in
    client order. A label no client holds (fewer clients than labels) is left out, where
    NIID-Bench fails.

    Parameters
    ----------
    labels : np.ndarray
        Integer label of every sample; its ``K`` distinct values are the labels.
    num_partitions : int
        Number of clients.
    classes_per_client : int
        Labels per client ``k``, in ``1..K``.
    seed : int
        Seed of Python's ``random.Random`` (the labels held; NIID-Bench's ``random.seed``)
        and of numpy's ``RandomState`` (the shuffles), the latter taken mod 2^32.

    Returns
    -------
    list[np.ndarray]
        One index array per client (unsorted).
    """
    labels = np.asarray(labels)
    _check_pathological(labels, num_partitions, classes_per_client)
    classes, counts = np.unique(labels, return_counts=True)
    num_classes = len(classes)
    if classes_per_client == num_classes:
        held = [list(range(num_classes))] * num_partitions
    else:
        draw = random.Random(seed)
        held = []
        for client in range(num_partitions):
            current = [client % num_classes]
            while len(current) < classes_per_client:
                label = draw.randint(0, num_classes - 1)
                if label not in current:
                    current.append(label)
            held.append(current)
    holders = [[client for client in range(num_partitions) if c in held[client]] for c in range(num_classes)]
    short = [(int(classes[c]), int(counts[c]), len(h)) for c, h in enumerate(holders) if len(h) > counts[c]]
    if short:
        label, count, num_holders = short[0]
        raise PartitionError(
            f"pathological: label {label} has {count} samples but {num_holders} of the {num_partitions} "
            f"clients hold it; use fewer clients or labels"
        )
    rng = _numpy_rng(seed)
    pieces: list[list[np.ndarray]] = [[] for _ in range(num_partitions)]
    for c in range(num_classes):
        members = np.where(labels == classes[c])[0]
        rng.shuffle(members)
        if holders[c]:
            for client, piece in zip(holders[c], np.array_split(members, len(holders[c])), strict=True):
                pieces[client].append(piece)
    return [np.concatenate(p) for p in pieces]


def natural_partitions(groups: np.ndarray) -> list[np.ndarray]:
    """One partition per distinct group id, partition ``i`` holding the ``i``-th smallest.

    The split of flwr-datasets' ``NaturalIdPartitioner`` (tested equal), computed with one
    stable sort: the partitioner materialises each partition as a Hugging Face dataset
    (about 20 ms each), minutes for a 10,000-client federation.
    """
    order = np.argsort(groups, kind="stable")
    _, starts = np.unique(groups[order], return_index=True)
    return [part.astype(np.int64) for part in np.split(order, starts[1:])]


def _natural(labels: np.ndarray, num_partitions: int, groups: np.ndarray | None) -> list[np.ndarray]:
    if groups is None:
        raise PartitionError("natural: needs groups (the natural client id of every sample)")
    groups = np.asarray(groups)
    if groups.shape != labels.shape:
        raise PartitionError(f"natural: groups has shape {groups.shape} but labels has {labels.shape}")
    num_groups = len(np.unique(groups))
    if num_groups != num_partitions:
        raise PartitionError(
            f"natural: the groups hold {num_groups} natural clients but num_partitions is {num_partitions}"
        )
    return natural_partitions(groups)


def _shards(labels: np.ndarray, num_partitions: int, shards_per_client: int, seed: int) -> list[np.ndarray]:
    """McMahan et al.'s shards, drawn by flwr-datasets' ``ShardPartitioner``."""
    if shards_per_client < 1:
        raise PartitionError(f"shards: shards_per_client must be >= 1; got {shards_per_client}")
    if num_partitions * shards_per_client > len(labels):
        raise PartitionError(
            f"shards: {num_partitions} partitions x {shards_per_client} shards "
            f"need at least {num_partitions * shards_per_client} samples; got {len(labels)}"
        )
    import datasets  # Hugging Face datasets takes seconds to import; only the partitioner needs it
    from flwr_datasets.partitioner import ShardPartitioner

    partitioner: Partitioner = ShardPartitioner(
        num_partitions=num_partitions,
        partition_by="label",
        num_shards_per_partition=int(shards_per_client),
        seed=seed,
    )
    partitioner.dataset = datasets.Dataset.from_dict({"label": labels, "idx": np.arange(len(labels))})
    with warnings_dropped_while(SHARD_NOTICES):
        return [partitioner.load_partition(pid).with_format("numpy")[:]["idx"] for pid in range(num_partitions)]


def _numpy_rng(seed: int) -> np.random.RandomState:
    """NIID-Bench's generator: numpy's legacy ``RandomState`` (its stream is frozen across
    numpy versions), seeded as ``np.random.seed(seed)``."""
    return np.random.RandomState(seed % 2**32)


def _check_min_size(scheme: str, num_samples: int, num_partitions: int, min_size: int) -> None:
    """Refuse a minimum size that no draw can give every client."""
    if min_size < 1 or num_partitions * min_size > num_samples:
        raise PartitionError(
            f"{scheme}: partition.num_clients {num_partitions} x partition.min_size {min_size} "
            f"needs {num_partitions * min_size} samples but the data has {num_samples}; "
            "lower partition.min_size or partition.num_clients"
        )


def _check_pathological(labels: np.ndarray, num_partitions: int, classes_per_client: int) -> None:
    """Refuse a #C=k setting the labels cannot satisfy, before drawing it.

    Every label is shared equally by the clients holding it, so each label needs at least
    one sample per holder; label ``c`` has at least ``ceil((num_partitions - c) / K)``
    holders (clients ``c, c + K, ...`` hold it first).
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


def noise_scales(noise_std: float, num_clients: int) -> list[float]:
    """NIID-Bench's noise level of every client: ``noise_std / (n - 1) * i`` for client ``i``
    of ``n`` (``experiments.py``, ``--noise_type level``), so client 0 stays clean and the
    last one gets ``noise_std``; a single client gets none."""
    if noise_std < 0:
        raise PartitionError(f"feature_noise: noise_std must be >= 0; got {noise_std}")
    if num_clients == 1:
        return [0.0]
    return [noise_std / (num_clients - 1) * i for i in range(num_clients)]


@dataclass(frozen=True)
class FeatureNoise:
    """NIID-Bench's noise-based feature skew: client ``i`` sees its inputs plus Gaussian
    noise ``N(0, sigma_i^2)`` with ``sigma_i = scales[i]`` (:func:`noise_scales`).

    From "Federated Learning on Non-IID Data Silos: An Experimental Study" (Li et al., ICDE
    2022, arXiv:2102.02079). NIID-Bench adds the noise in a torchvision transform
    (``utils.AddGaussianNoise``), so every access to a sample draws it afresh: every local
    epoch, every evaluation. fedsim's training loops hold a client's inputs as one array for
    the whole of its local training, so the noise is drawn when a client's data is taken:

    - ``draw="round"`` (the default): a fresh draw per (round, client, split), seeded by
      ``(seed, round, client, split)``. It differs from NIID-Bench within a round only: a
      sample keeps its noise over the round's local epochs (NIID-Bench redraws it each
      epoch), and the round's evaluation of the client's test split uses one draw too.
    - ``draw="once"``: one draw per (client, split) for the whole run, seeded by
      ``(seed, client, split)``: the noise is a property of the client's device, not an
      augmentation.

    The client's test split takes its client's noise (NIID-Bench's local test data is noisy
    too); the server's test set stays clean, where NIID-Bench's global test set in noise runs
    is the test set once per client, each copy with that client's noise.

    Parameters
    ----------
    scales : tuple[float, ...]
        Standard deviation of each client's noise.
    seed : int
        Seed of the draws.
    draw : {"round", "once"}, default "round"
        A fresh draw every round, or one for the whole run.
    """

    scales: tuple[float, ...]
    seed: int
    draw: Literal["round", "once"] = "round"

    def apply(self, x: np.ndarray, client: int, server_round: int | None = None,
              split: Literal["train", "test"] = "train") -> np.ndarray:
        """``x`` (client ``client``'s samples of ``split``) plus the client's noise, drawn for
        ``server_round`` (needed when ``draw`` is ``"round"``); ``x`` is not modified."""
        scale = self.scales[client]
        if scale == 0:
            return x
        if self.draw == "round" and server_round is None:
            raise ValueError("feature noise drawn every round (partition.noise_draw round) needs the server round")
        stream = ["train", "test"].index(split)
        key = [self.seed, client, stream] if self.draw == "once" else [self.seed, server_round, client, stream]
        noise = np.random.default_rng(key).standard_normal(x.shape, dtype=np.float32)
        return x + noise * np.float32(scale)


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

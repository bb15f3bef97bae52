"""fedsim's partitions equal NIID-Bench's, checked against a reference restating its code.

The reference below restates ``partition_data`` of Xtra-Computing/NIID-Bench ``utils.py``
(branches ``homo``, ``noniid-labeldir``, ``noniid-#label{k}`` and ``iid-diff-quantity``), data
loading left out and the number of labels taken from the labels: the same draws from the
global ``np.random`` and ``random``, in the same order, seeded as NIID-Bench's
``experiments.py`` seeds them (``np.random.seed(init_seed)``, ``random.seed(init_seed)``) just
before it partitions. It is written independently of ``fedsim.data.partition``: lists grown
client by client, as NIID-Bench does.
"""

import random

import numpy as np
import pytest
from sklearn.datasets import load_digits

from fedsim.data import (
    PartitionError,
    heterogeneity,
    label_histograms,
    partition_indices,
)

DIGITS = load_digits().target.astype(np.int64)  # dataset order: writers in blocks
UNIFORM = np.random.default_rng(0).integers(0, 10, 3000)
NIID_BENCH_MIN_SIZE = 10  # hard-coded in noniid-labeldir and iid-diff-quantity


def niid_bench_partition(labels, partition, num_clients, beta, init_seed):
    """NIID-Bench's partition of ``labels`` (sorted index arrays), the global generators
    seeded with ``init_seed`` and restored afterwards."""
    numpy_state, python_state = np.random.get_state(), random.getstate()
    np.random.seed(init_seed)
    random.seed(init_seed)
    try:
        if partition == "homo":
            clients = np.array_split(np.random.permutation(len(labels)), num_clients)
        elif partition == "noniid-labeldir":
            clients = _label_dirichlet(labels, num_clients, beta)
        elif partition.startswith("noniid-#label"):
            clients = _label_quantity(labels, num_clients, int(partition.removeprefix("noniid-#label")))
        else:
            clients = _diff_quantity(len(labels), num_clients, beta)
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)
    return [np.sort(np.asarray(c, dtype=np.int64)) for c in clients]


def _label_dirichlet(labels, num_clients, beta):
    """noniid-labeldir: per label, shuffle, Dirichlet shares zeroed for clients at N/n or more,
    cut; the whole split redrawn until its smallest client holds 10 samples."""
    while True:
        clients = [[] for _ in range(num_clients)]
        for label in range(len(np.unique(labels))):
            samples = np.flatnonzero(labels == label)
            np.random.shuffle(samples)
            shares = np.random.dirichlet([beta] * num_clients)
            still_open = np.array([len(c) < len(labels) / num_clients for c in clients])
            shares = shares * still_open
            shares = shares / shares.sum()
            bounds = (np.cumsum(shares) * len(samples)).astype(int)[:-1]
            for client, piece in zip(clients, np.split(samples, bounds), strict=True):
                client.extend(piece.tolist())
        if min(len(c) for c in clients) >= NIID_BENCH_MIN_SIZE:
            return clients


def _label_quantity(labels, num_clients, k):
    """noniid-#label{k}: client i holds label i mod K and k - 1 others (random.randint, redrawn
    while held; none drawn when k is every label); each label shuffled and cut equally among
    its holders in client order."""
    num_labels = len(np.unique(labels))
    if k == num_labels:
        held = [list(range(num_labels)) for _ in range(num_clients)]
    else:
        held = []
        for i in range(num_clients):
            mine = [i % num_labels]
            while len(mine) < k:
                candidate = random.randint(0, num_labels - 1)
                if candidate not in mine:
                    mine.append(candidate)
            held.append(mine)
    clients = [[] for _ in range(num_clients)]
    for label in range(num_labels):
        samples = np.flatnonzero(labels == label)
        np.random.shuffle(samples)
        owners = [i for i in range(num_clients) if label in held[i]]
        for owner, piece in zip(owners, np.array_split(samples, len(owners)), strict=True):
            clients[owner].extend(piece.tolist())
    return clients


def _diff_quantity(num_samples, num_clients, beta):
    """iid-diff-quantity: a permutation cut at Dirichlet shares, redrawn until every share
    holds 10 samples."""
    order = np.random.permutation(num_samples)
    while True:
        shares = np.random.dirichlet([beta] * num_clients)
        shares = shares / shares.sum()
        if (shares * num_samples).min() >= NIID_BENCH_MIN_SIZE:
            return np.split(order, (np.cumsum(shares) * num_samples).astype(int)[:-1])


SETTINGS = [  # (NIID-Bench partition, fedsim scheme, fedsim keyword arguments, beta)
    ("homo", "iid", {}, 0.5),
    ("noniid-labeldir", "dirichlet", {"alpha": 0.5}, 0.5),
    ("noniid-labeldir", "dirichlet", {"alpha": 0.1}, 0.1),
    ("noniid-#label1", "pathological", {"classes_per_client": 1}, 0.5),
    ("noniid-#label2", "pathological", {"classes_per_client": 2}, 0.5),
    ("noniid-#label3", "pathological", {"classes_per_client": 3}, 0.5),
    ("noniid-#label10", "pathological", {"classes_per_client": 10}, 0.5),
    ("iid-diff-quantity", "quantity", {"quantity_alpha": 0.5}, 0.5),
    ("iid-diff-quantity", "quantity", {"quantity_alpha": 1.0}, 1.0),
]


@pytest.mark.parametrize(("niid_bench", "scheme", "kwargs", "beta"), SETTINGS,
                         ids=[f"{s[0]}-{s[3]}" for s in SETTINGS])
@pytest.mark.parametrize("num_clients", [10, 20])
def test_partitions_equal_niid_bench_partition_data_for_the_same_seed(niid_bench, scheme, kwargs, beta, num_clients):
    for labels in (DIGITS, UNIFORM):
        for seed in (0, 1, 7):
            ours = partition_indices(labels, scheme, num_clients, seed, **kwargs)
            theirs = niid_bench_partition(labels, niid_bench, num_clients, beta, seed)
            for mine, reference in zip(ours, theirs, strict=True):
                np.testing.assert_array_equal(mine, reference)


@pytest.mark.parametrize(("niid_bench", "scheme", "kwargs", "beta"), SETTINGS,
                         ids=[f"{s[0]}-{s[3]}" for s in SETTINGS])
def test_heterogeneity_statistics_equal_niid_bench(niid_bench, scheme, kwargs, beta):
    """Size CV, labels per client, smallest client and label TV, seed by seed, on digits."""
    for seed in range(5):
        ours = partition_indices(DIGITS, scheme, 10, seed, **kwargs)
        theirs = niid_bench_partition(DIGITS, niid_bench, 10, beta, seed)
        ours, theirs = (heterogeneity(label_histograms(DIGITS, parts, 10)) for parts in (ours, theirs))
        assert ours == pytest.approx(theirs, rel=1e-12)
        if scheme in ("dirichlet", "quantity"):
            assert ours["size_min"] >= 10
        if scheme == "pathological":
            assert ours["labels_per_client_mean"] == kwargs["classes_per_client"]


def test_dirichlet_balance_step_keeps_sizes_closer_than_no_balance():
    """NIID-Bench's balance step: a client holding N/n samples or more takes no later label,
    so the spread of sizes at alpha 0.5 is well below that of the plain Dirichlet split."""
    cvs = [heterogeneity(label_histograms(DIGITS, partition_indices(DIGITS, "dirichlet", 10, s, alpha=0.5), 10))
           ["size_cv"] for s in range(10)]
    assert np.mean(cvs) < 0.35


def test_label_quantity_shuffles_each_label_before_splitting_it():
    """#C=1 on digits: the two holders of a label get random halves of it, not its first and
    second half in dataset order (blocks of the same writers)."""
    parts = partition_indices(DIGITS, "pathological", 20, seed=0, classes_per_client=1)
    first, second = (p for p in parts if DIGITS[p[0]] == 0)
    assert first.max() > second.min() and second.max() > first.min()  # interleaved, not two blocks


@pytest.mark.parametrize("scheme", ["dirichlet", "quantity"])
def test_a_minimum_size_no_draw_can_give_is_refused_naming_both_keys(scheme):
    with pytest.raises(PartitionError, match=rf"^{scheme}: partition.num_clients 200 x partition.min_size 10 "
                                             r"needs 2000 samples but the data has 1797; lower"):
        partition_indices(DIGITS, scheme, 200, seed=0)


def test_an_improbable_minimum_size_is_refused_after_max_draws(monkeypatch):
    import fedsim.data.partition as partition

    monkeypatch.setattr(partition, "MAX_DRAWS", 5)
    with pytest.raises(PartitionError, match="dirichlet: no draw of 5 at alpha 0.01 gave every one of 100 clients "
                                             r">= 10 samples \(partition.min_size\)"):
        partition_indices(DIGITS, "dirichlet", 100, seed=0, alpha=0.01)

import numpy as np
import pytest

from fedsim.data import (
    PARTITIONS,
    label_histograms,
    partition_indices,
    plot_label_histograms,
    split_client,
)

LABELS = np.random.default_rng(0).integers(0, 10, 1000)


def _mean_label_entropy(labels, parts, num_classes=10):
    hist = label_histograms(labels, parts, num_classes).astype(float)
    probs = hist / hist.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(probs > 0, -probs * np.log(probs), 0.0)
    return terms.sum(axis=1).mean()


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "quantity"])
def test_partitions_are_a_disjoint_cover(scheme):
    parts = partition_indices(LABELS, scheme, 10, seed=0)
    assert len(parts) == 10 and all(len(p) > 0 and p.dtype == np.int64 for p in parts)
    joined = np.concatenate(parts)
    assert len(joined) == len(LABELS)
    np.testing.assert_array_equal(np.sort(joined), np.arange(len(LABELS)))


def test_shards_are_disjoint_equal_and_drop_only_the_remainder():
    parts = partition_indices(LABELS, "shards", 7, seed=0, shards_per_client=2)
    joined = np.concatenate(parts)
    assert len(np.unique(joined)) == len(joined)
    assert {len(p) for p in parts} == {2 * (1000 // 14)}


def test_natural_groups_become_partitions():
    groups = np.repeat(np.array([3, 1, 2]), [4, 5, 6])
    parts = partition_indices(np.zeros(15, int), "natural", 3, seed=0, groups=groups)
    assert sorted(len(p) for p in parts) == [4, 5, 6]
    for part in parts:
        assert len(np.unique(groups[part])) == 1


def test_natural_partitions_equal_flwr_datasets_natural_id_partitioner():
    import datasets
    from flwr_datasets.partitioner import NaturalIdPartitioner

    groups = np.random.default_rng(3).choice([7, 2, 40, 11, 5], size=300)
    partitioner = NaturalIdPartitioner(partition_by="group")
    partitioner.dataset = datasets.Dataset.from_dict({"group": groups, "idx": np.arange(300)})
    reference = [np.sort(partitioner.load_partition(i)["idx"]) for i in range(5)]
    ours = partition_indices(np.zeros(300, int), "natural", 5, seed=0, groups=groups)
    for mine, theirs in zip(ours, reference, strict=True):
        np.testing.assert_array_equal(mine, theirs)


@pytest.mark.parametrize("scheme", PARTITIONS)
def test_same_seed_same_partitions_other_seed_other(scheme):
    groups = np.arange(1000) % 10
    first = partition_indices(LABELS, scheme, 10, seed=1, groups=groups)
    again = partition_indices(LABELS, scheme, 10, seed=1, groups=groups)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    if scheme != "natural":
        other = partition_indices(LABELS, scheme, 10, seed=2, groups=groups)
        assert any(not np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_small_dirichlet_alpha_skews_labels_more():
    skewed = partition_indices(LABELS, "dirichlet", 10, seed=0, alpha=0.1)
    balanced = partition_indices(LABELS, "dirichlet", 10, seed=0, alpha=100.0)
    assert _mean_label_entropy(LABELS, skewed) < _mean_label_entropy(LABELS, balanced) - 0.5
    assert _mean_label_entropy(LABELS, balanced) > 0.95 * np.log(10)


def test_shards_give_at_most_k_labels_per_client():
    sorted_labels = np.repeat(np.arange(10), 20)
    parts = partition_indices(sorted_labels, "shards", 10, seed=0, shards_per_client=2)
    assert all(len(np.unique(sorted_labels[p])) <= 2 for p in parts)
    assert sum(len(p) for p in parts) == 200


def test_quantity_skew_gives_unequal_sizes_with_iid_labels():
    parts = partition_indices(LABELS, "quantity", 10, seed=0, quantity_alpha=0.5, min_size=2)
    sizes = np.array([len(p) for p in parts])
    assert sizes.min() >= 2 and sizes.max() > 3 * sizes.min()
    biggest = parts[int(sizes.argmax())]
    label_share = np.bincount(LABELS[biggest], minlength=10) / len(biggest)
    assert np.abs(label_share - 0.1).max() < 0.08


@pytest.mark.parametrize(
    ("scheme", "kwargs", "message"),
    [
        ("iidd", {}, "'iidd' is not a partition scheme; known: iid, dirichlet"),
        ("shards", {"shards_per_client": 200}, "shards: 10 partitions x 200 shards"),
        ("quantity", {"min_size": 200}, "quantity: partition.num_clients 10 x partition.min_size 200 needs 2000"),
        ("natural", {}, "natural: needs groups"),
        ("natural", {"groups": np.arange(1000) % 4}, "4 natural clients but num_partitions is 10"),
        ("dirichlet", {"alpha": 0.0}, "dirichlet: alpha must be > 0"),
    ],
)
def test_bad_settings_raise_naming_the_scheme(scheme, kwargs, message):
    with pytest.raises(ValueError, match=message):
        partition_indices(LABELS, scheme, 10, seed=0, **kwargs)


def test_more_partitions_than_samples_is_refused():
    with pytest.raises(ValueError, match="iid: 20 partitions need at least as many samples; got 5"):
        partition_indices(np.zeros(5, int), "iid", 20, seed=0)


def test_split_client_is_seeded_disjoint_and_keeps_a_train_sample():
    indices = np.arange(100, 110)
    train, test = split_client(indices, 0.3, seed=4)
    assert len(test) == 3 and len(train) == 7
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), indices)
    again = split_client(indices, 0.3, seed=4)
    np.testing.assert_array_equal(test, again[1])
    train, test = split_client(np.array([5]), 0.9, seed=0)
    assert train.tolist() == [5] and len(test) == 0


def test_label_histograms_count_per_client_and_plot(tmp_path):
    labels = np.array([0, 0, 1, 2, 2, 2])
    hist = label_histograms(labels, [np.array([0, 1, 2]), np.array([3, 4, 5])], 4)
    np.testing.assert_array_equal(hist, [[2, 1, 0, 0], [0, 0, 3, 0]])
    plot_label_histograms(hist, tmp_path / "labels.png")
    assert (tmp_path / "labels.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

"""NIID-Bench's partitions (label quantity skew #C=k, noise-based feature skew), their
refusals, and the heterogeneity measures of a partition."""

import numpy as np
import pytest

from fedsim.data import (
    FeatureNoise,
    PartitionError,
    heterogeneity,
    label_histograms,
    label_tv_distances,
    noise_scales,
    partition_indices,
    partition_report,
    plot_partition,
)

LABELS = np.random.default_rng(0).integers(0, 10, 2000)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_pathological_gives_every_client_exactly_k_labels(k):
    parts = partition_indices(LABELS, "pathological", 20, seed=0, classes_per_client=k)
    joined = np.concatenate(parts)
    assert len(np.unique(joined)) == len(joined)  # disjoint
    assert all(len(np.unique(LABELS[p])) == k for p in parts)
    if k == 1:  # 'first-deterministic': client i holds label i mod 10; label c split by its 2 holders
        assert [int(LABELS[p][0]) for p in parts] == [i % 10 for i in range(20)]
        np.testing.assert_array_equal(np.sort(joined), np.arange(len(LABELS)))
    for label in range(10):  # each label's samples are split equally among its holders
        shares = [int((LABELS[p] == label).sum()) for p in parts if (LABELS[p] == label).any()]
        assert max(shares) - min(shares) <= 1


def test_pathological_refuses_more_labels_than_classes_and_too_many_holders():
    with pytest.raises(PartitionError, match="classes_per_client 11 is not possible with the 10 classes"):
        partition_indices(LABELS, "pathological", 10, seed=0, classes_per_client=11)
    few = np.repeat(np.arange(3), [50, 50, 2])  # label 2 has 2 samples, 9 clients give it 3 holders
    with pytest.raises(PartitionError, match="label 2 has 2 samples but 9 clients give it 3 holders"):
        partition_indices(few, "pathological", 9, seed=0, classes_per_client=1)


def test_more_clients_than_samples_is_a_partition_error():
    with pytest.raises(PartitionError, match="pathological: 30 partitions need at least as many samples; got 20"):
        partition_indices(LABELS[:20], "pathological", 30, seed=0, classes_per_client=1)


def test_feature_noise_partitions_labels_as_iid():
    noisy = partition_indices(LABELS, "feature_noise", 10, seed=3)
    iid = partition_indices(LABELS, "iid", 10, seed=3)
    for a, b in zip(noisy, iid, strict=True):
        np.testing.assert_array_equal(a, b)


def test_noise_scales_are_niid_benchs_noise_over_n_minus_one_times_i():
    # experiments.py: noise_level = args.noise / (args.n_parties - 1) * net_id
    assert noise_scales(0.3, 4) == [0.3 / 3 * i for i in range(4)]
    assert noise_scales(0.3, 4)[0] == 0.0 and noise_scales(0.3, 4)[-1] == pytest.approx(0.3)
    assert noise_scales(0.3, 1) == [0.0]


def test_feature_noise_std_grows_linearly_with_the_client_index():
    x = np.zeros((1000, 1, 8, 8), dtype=np.float32)
    noise = FeatureNoise(tuple(noise_scales(0.6, 4)), seed=5)
    for client in range(4):  # std 0.6 * i / 3: 0, 0.2, 0.4, 0.6
        noisy = noise.apply(x, client, server_round=1)
        assert noisy.dtype == np.float32
        np.testing.assert_allclose(noisy.std(), 0.2 * client, rtol=0.02, atol=1e-7)
    assert not x.any()  # the clean inputs are left alone


def test_feature_noise_is_drawn_afresh_every_round_and_seeded():
    x = np.ones((500, 4), dtype=np.float32)
    noise = FeatureNoise((0.0, 0.5), seed=3)
    first = noise.apply(x, 1, server_round=1)
    np.testing.assert_array_equal(first, noise.apply(x, 1, server_round=1))  # a resumed run draws the same
    assert not np.array_equal(first, noise.apply(x, 1, server_round=2))
    assert not np.array_equal(first, noise.apply(x, 1, server_round=1, split="test"))
    assert not np.array_equal(first, FeatureNoise((0.0, 0.5), seed=4).apply(x, 1, server_round=1))
    with pytest.raises(ValueError, match="needs the server round"):
        noise.apply(x, 1)


def test_feature_noise_drawn_once_is_the_same_every_round():
    x = np.ones((500, 4), dtype=np.float32)
    once = FeatureNoise((0.0, 0.5), seed=3, draw="once")
    np.testing.assert_array_equal(once.apply(x, 1, server_round=1), once.apply(x, 1, server_round=7))
    np.testing.assert_array_equal(once.apply(x, 1), once.apply(x, 1, server_round=2))


def test_label_tv_and_size_spread_match_hand_computed_values():
    hist = np.array([[3, 1], [1, 1]])
    # global distribution (4/6, 2/6); client 0 (3/4, 1/4): TV 1/12; client 1 (1/2, 1/2): TV 1/6
    np.testing.assert_allclose(label_tv_distances(hist), [1 / 12, 1 / 6])
    measures = heterogeneity(hist)
    assert measures["label_tv_mean"] == pytest.approx(0.125)
    assert measures["label_tv_max"] == pytest.approx(1 / 6)
    assert (measures["size_min"], measures["size_max"], measures["size_mean"]) == (2, 4, 3.0)
    assert measures["size_std"] == pytest.approx(1.0) and measures["size_cv"] == pytest.approx(1 / 3)
    assert measures["labels_per_client_mean"] == 2.0
    assert heterogeneity(np.array([[5, 0], [0, 5]]))["label_tv_mean"] == pytest.approx(0.5)


def test_stronger_skew_measures_larger():
    def tv(scheme, **kwargs):
        parts = partition_indices(LABELS, scheme, 20, seed=0, **kwargs)
        return heterogeneity(label_histograms(LABELS, parts, 10))

    iid, mild, strong = tv("iid"), tv("dirichlet", alpha=0.5), tv("dirichlet", alpha=0.1)
    one_label = tv("pathological", classes_per_client=1)
    # IID draws 100 samples per client: sampling noise alone gives a TV of about 0.1
    assert iid["label_tv_mean"] < 0.2 < mild["label_tv_mean"] < strong["label_tv_mean"] < one_label["label_tv_mean"]
    assert one_label["labels_per_client_mean"] == 1.0 and one_label["label_tv_mean"] == pytest.approx(0.9, abs=0.01)
    assert iid["size_cv"] == 0.0 and tv("quantity", quantity_alpha=0.5)["size_cv"] > 0.5


def test_partition_report_lists_clients_and_measures():
    hist = np.array([[3, 1], [1, 1]])
    report = partition_report(hist, train_sizes=[3, 2], noise_std=[0.0, 0.05])
    assert report["clients"][0] == {"id": 0, "size": 4, "label_counts": [3, 1], "train_size": 3,
                                    "test_size": 1, "noise_std": 0.0}
    assert report["heterogeneity"]["noise_std_max"] == 0.05
    assert report["heterogeneity"]["label_tv_mean"] == pytest.approx(0.125)


def test_heatmap_is_written_for_hundreds_of_clients(tmp_path):
    parts = partition_indices(LABELS, "dirichlet", 200, seed=0, alpha=0.5, min_size=1)
    plot_partition(label_histograms(LABELS, parts, 10), tmp_path / "p.png", title="dirichlet")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

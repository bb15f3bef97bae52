"""Client speed profiles and simulated durations."""

import numpy as np
import pytest

from fedsim.sim.speeds import client_duration, client_speeds


def test_linear_spread_makes_fastest_80_percent_faster():
    speeds = client_speeds("linear", 20, seed=3)
    assert speeds.max() / speeds.min() == pytest.approx(1.8)
    np.testing.assert_allclose(np.sort(speeds), np.linspace(1.0, 1.8, 20))
    np.testing.assert_array_equal(speeds, client_speeds("linear", 20, seed=3))
    assert client_speeds("linear", 5, seed=0, spread=1.0, base=2.0).max() == pytest.approx(4.0)


def test_lognormal_is_positive_and_seeded():
    speeds = client_speeds("lognormal", 50, seed=1, sigma=0.3)
    assert (speeds > 0).all()
    np.testing.assert_array_equal(speeds, client_speeds("lognormal", 50, seed=1, sigma=0.3))
    assert not np.array_equal(speeds, client_speeds("lognormal", 50, seed=2, sigma=0.3))


def test_two_tier_has_the_requested_slow_clients():
    speeds = client_speeds("two_tier", 10, seed=0, slow_fraction=0.3, slow_factor=5.0)
    assert sorted(speeds.tolist()) == [0.2] * 3 + [1.0] * 7


def test_csv_loader_reads_one_speed_per_client(tmp_path):
    path = tmp_path / "speeds.csv"
    path.write_text("client_id,speed\n0,1.5\n1,0.5\n2,2\n")
    np.testing.assert_array_equal(client_speeds("csv", 3, path=path), [1.5, 0.5, 2.0])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("speed\n1.0\n2.0\n", "has 2 speeds, expected one per client \\(3\\)"),
        ("speed\n1.0\n-2.0\n3.0\n", "client 1 has -2.0"),
        ("speed\n1.0\n0\n3.0\n", "client 1 has 0.0"),
        ("speed\n1.0\nfast\n3.0\n", "line 3: 'fast' is not a number"),
        ("rate\n1.0\n2.0\n3.0\n", "no 'speed' column"),
    ],
)
def test_bad_csv_fails_with_a_clear_error(tmp_path, content, message):
    path = tmp_path / "speeds.csv"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        client_speeds("csv", 3, path=path)


def test_missing_csv_file_and_unknown_profile_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        client_speeds("csv", 3, path=tmp_path / "absent.csv")
    with pytest.raises(ValueError, match="known: linear, lognormal, two_tier, csv"):
        client_speeds("gaussian", 3)
    with pytest.raises(ValueError, match="sigma"):
        client_speeds("linear", 3, sigma=0.1)


def test_client_duration_adds_compute_and_network_time():
    assert client_duration(10.0, 4.0) == 2.5
    assert client_duration(10.0, 4.0, network_delay=0.5) == 3.0
    assert client_duration(1.0, 1.0, rng=np.random.default_rng(0), dropout=1.0) is None
    with pytest.raises(ValueError, match="needs an rng"):
        client_duration(1.0, 1.0, dropout=0.1)
    with pytest.raises(ValueError, match="speed must be finite and > 0"):
        client_duration(1.0, 0.0)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: client_speeds("linear", 0), "num_clients must be >= 1"),
        (lambda: client_speeds("lognormal", 3, sigma=-1.0), "sigma must be >= 0"),
        (lambda: client_speeds("two_tier", 3, slow_fraction=1.5), "slow_fraction must be in"),
        (lambda: client_speeds("two_tier", 3, slow_factor=0.5), "slow_factor must be >= 1"),
        (lambda: client_speeds("csv", 3), "missing a required argument: 'path'"),
        (lambda: client_duration(-1.0, 1.0), "work must be finite and >= 0"),
        (lambda: client_duration(1.0, 1.0, network_delay=-0.1), "network_delay must be >= 0"),
        (lambda: client_duration(1.0, 1.0, dropout=1.5), "dropout must be in"),
    ],
)
def test_bad_speed_arguments_fail_clearly(call, message):
    with pytest.raises(ValueError, match=message):
        call()

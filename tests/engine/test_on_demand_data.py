"""Clients' data made on demand: Synthetic's devices generated from (seed, device) when a
client is sampled give the numbers of eager generation; the server's test set and federated
evaluation are bounded; a million-client federation runs a round."""

import numpy as np
import pytest
import torch

from fedsim.config import ConfigError, validate_config
from fedsim.data import ArrayDataset, generate_synthetic
from fedsim.data.client_cache import ClientCache
from fedsim.data.synthetic import SyntheticDevices
from fedsim.outputs.results import RunDir
from fedsim.runner import run_experiment
from fedsim.sim.components import federated_data
from fedsim.sim.on_demand import OnDemandSynthetic
from fedsim.strategies.participation import evaluation_sample


def _config(tmp_path, clients, on_demand=None, **sections):
    synthetic = {"dim": 8, **({} if on_demand is None else {"on_demand": on_demand})}
    return validate_config({
        "name": "on-demand", "seed": 3, "rounds": 2,
        "data": {"name": "synthetic", "synthetic": synthetic},
        "partition": {"scheme": "natural", "num_clients": clients},
        "model": {"name": "mlp", "hidden": [8]},
        "client": {"local_steps": 2, "lr": 0.05},
        "sim": {"backend": "batched"},
        "output": {"dir": str(tmp_path), "plots": False},
        **sections,
    })


def _rows(path):
    return [{k: v for k, v in row.items() if k != "wall_time_s"} for row in RunDir.open(path).rows()]


def test_every_device_on_its_own_equals_the_eager_generation():
    devices = SyntheticDevices(alpha=0.5, beta=0.5, num_devices=12, dim=5, seed=4)
    train, test = generate_synthetic(alpha=0.5, beta=0.5, num_devices=12, dim=5, seed=4)
    for device in reversed(range(12)):  # any order
        own_train, own_test = devices.device(device)
        for own, pool in ((own_train, train), (own_test, test)):
            rows = pool.groups == device
            np.testing.assert_array_equal(own.x, pool.x[rows])
            np.testing.assert_array_equal(own.y, pool.y[rows])
    np.testing.assert_array_equal(devices.train_sizes, np.bincount(train.groups))
    np.testing.assert_array_equal(devices.test_sizes, np.bincount(test.groups))


def test_on_demand_and_eager_federations_give_every_client_the_same_arrays(tmp_path):
    lazy = federated_data(_config(tmp_path, 40, eval={"test_samples": 150}))
    eager = federated_data(_config(tmp_path, 40, on_demand=False, eval={"test_samples": 150}))
    assert isinstance(lazy, OnDemandSynthetic) and not isinstance(eager, OnDemandSynthetic)
    for pid in (39, 0, 17):
        for own, pooled in zip(lazy.client(pid), eager.client(pid), strict=True):
            np.testing.assert_array_equal(own.x, pooled.x)
            np.testing.assert_array_equal(own.y, pooled.y)
    assert len(lazy.test) == 150
    np.testing.assert_array_equal(lazy.test.x, eager.test.x)
    np.testing.assert_array_equal(lazy.train_sizes(), eager.train_sizes())
    np.testing.assert_array_equal(lazy.label_counts(with_test=True), eager.label_counts(with_test=True))
    np.testing.assert_array_equal(lazy.calibration_inputs(500), eager.calibration_inputs(500))


def test_lazy_and_eager_synthetic_runs_are_identical_at_1000_clients(tmp_path):
    sections = {"strategy": {"name": "fedavg", "fraction_train": 0.02}, "eval": {"federated_fraction": 0.01}}
    lazy, _ = run_experiment(_config(tmp_path / "lazy", 1000, **sections))
    eager, _ = run_experiment(_config(tmp_path / "eager", 1000, on_demand=False, **sections))
    rows = _rows(lazy)
    assert rows == _rows(eager)
    assert rows[-1]["num_success"] == 20 and "federated_accuracy" in rows[-1]
    lazy_model, eager_model = (RunDir.open(p).latest_checkpoint().model for p in (lazy, eager))
    for name, value in lazy_model.items():
        assert torch.equal(value, eager_model[name])


def test_a_million_client_federation_runs_a_round(tmp_path):
    cfg = _config(tmp_path, 1_000_000, rounds=1, strategy={"name": "fedavg", "fraction_train": 3e-6},
                  eval={"federated_fraction": 3e-6, "test_samples": 100})
    path, summary = run_experiment(cfg)
    row = RunDir.open(path).rows()[-1]
    assert summary["status"] == "completed"
    assert row["num_success"] == 3 and row["num_sampled"] == 3
    assert 0.0 <= row["centralised_accuracy"] <= 1.0 and "federated_accuracy" in row


def test_federated_evaluation_draws_its_clients_per_step():
    first = evaluation_sample(1_000_000, 1e-5, seed=0, step=4)
    assert first == evaluation_sample(1_000_000, 1e-5, seed=0, step=4) == sorted(set(first))
    assert len(first) == 10 and first != evaluation_sample(1_000_000, 1e-5, seed=0, step=5)
    assert len(evaluation_sample(10, 1e-9, seed=0, step=1)) == 1


def test_the_client_cache_keeps_the_most_recent_clients_within_its_bytes():
    def client(rows):
        return (ArrayDataset(x=np.zeros((rows, 4), np.float32), y=np.zeros(rows, np.int64), num_classes=2,
                             name="t"),)

    built = []
    cache = ClientCache(max_bytes=3 * 10 * 24)  # three clients of 10 rows (24 bytes a row)
    for key in (0, 1, 2, 0, 3):
        cache.get(key, lambda key=key: built.append(key) or client(10))
    assert built == [0, 1, 2, 3] and len(cache) == 3 and cache.bytes <= cache.max_bytes
    cache.get(1, lambda: built.append(1) or client(10))  # 1 was the least recently used: dropped for 3
    assert built[-1] == 1
    for _ in range(2):  # larger than the whole cache: served, not kept
        cache.get(9, lambda: built.append(9) or client(1000))
    assert built.count(9) == 2


@pytest.mark.parametrize(("sections", "message"), [
    ({"data": {"name": "synthetic", "synthetic": {"on_demand": True}}, "partition": {"scheme": "iid"}},
     "data.synthetic.on_demand: .* partition.scheme natural; got 'iid'"),
    ({"eval": {"federated_fraction": 0.1}, "strategy": {"name": "fedavg", "fraction_evaluate": 0.5}},
     "eval.federated_fraction: .* strategy.fraction_evaluate 0.5"),
    ({"eval": {"federated_fraction": 0.1, "federated": False}},
     "eval.federated_fraction: .* eval.federated false"),
    ({"eval": {"test_samples": 100, "centralised": False}}, "eval.test_samples: .* eval.centralised false"),
])
def test_settings_that_cannot_combine_are_refused_in_one_line_naming_both_keys(sections, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(sections)

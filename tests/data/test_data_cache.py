import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from fedsim.config import load_config
from fedsim.data import ArrayDataset
from fedsim.data import cache as partition_cache
from fedsim.data.cache import PartitionCache, source_fingerprint
from fedsim.sim.components import federated_data

ROOT = Path(__file__).parents[2]


def _dataset(n: int, groups: bool) -> ArrayDataset:
    rng = np.random.default_rng(n)
    return ArrayDataset(x=rng.normal(size=(n, 1, 4, 4)).astype(np.float32), y=rng.integers(0, 3, n).astype(np.int64),
                        num_classes=3, name="toy", groups=np.arange(n, dtype=np.int64) % 2 if groups else None)


@dataclass(frozen=True)
class Split:
    train: ArrayDataset
    client_train: tuple[np.ndarray, ...]


@pytest.fixture
def disk_cache(tmp_path):
    cache = partition_cache.enable(tmp_path)
    yield cache
    partition_cache.disable()


def test_an_entry_reads_back_exactly_what_was_stored(tmp_path):
    cache = PartitionCache(tmp_path)
    train, test = _dataset(20, groups=True), _dataset(5, groups=False)
    parts = (np.array([0, 3, 7]), np.array([], dtype=np.int64), np.arange(8, 20))
    cache.store("k", {"train": train, "test": test, "parts": parts})
    got = cache.load("k")
    for name, expected in (("train", train), ("test", test)):
        assert np.array_equal(got[name].x, expected.x) and np.array_equal(got[name].y, expected.y)
        assert (got[name].num_classes, got[name].name) == (expected.num_classes, expected.name)
    assert np.array_equal(got["train"].groups, train.groups) and got["test"].groups is None
    assert [p.tolist() for p in got["parts"]] == [p.tolist() for p in parts]
    assert got["train"].subset(np.array([1, 2])).x.flags.writeable  # a node's rows are its own copy
    assert cache.load("other") is None


def test_a_second_writer_of_the_same_entry_keeps_the_first_and_leaves_no_temporary_files(tmp_path):
    cache = PartitionCache(tmp_path)
    first, second = _dataset(6, groups=False), _dataset(7, groups=False)
    cache.store("k", {"train": first})
    cache.store("k", {"train": second})
    assert len(cache.load("k")["train"]) == 6
    assert [p.name for p in cache.root.iterdir()] == ["k"]


def test_the_key_follows_the_settings_fedsim_and_the_data_files(tmp_path):
    data = tmp_path / "data.npz"
    data.write_bytes(b"one")
    settings = {"data": {"name": "npz", "path": str(data)}, "seed": 0}
    key = PartitionCache.key(settings, source_fingerprint(data))
    assert PartitionCache.key(settings, source_fingerprint(data)) == key
    assert PartitionCache.key({**settings, "seed": 1}, source_fingerprint(data)) != key
    data.write_bytes(b"other content")
    assert PartitionCache.key(settings, source_fingerprint(data)) != key
    assert source_fingerprint(tmp_path) == source_fingerprint(data)  # a directory: every file under it
    assert source_fingerprint(None) == []


def test_the_cached_builder_builds_once_and_then_reads_from_disk(disk_cache):
    calls = []

    @partition_cache.cached(Split)
    def build(data_json: str, partition_json: str, seed: int) -> Split:
        calls.append(seed)
        return Split(_dataset(10, groups=False), (np.arange(4), np.arange(4, 10)))

    first = build('{"name": "toy"}', '{"num_clients": 2}', 3)
    again = build('{"name": "toy"}', '{"num_clients": 2}', 3)
    other_seed = build('{"name": "toy"}', '{"num_clients": 2}', 4)
    assert calls == [3, 4]
    assert isinstance(again, Split) and np.array_equal(again.train.x, first.train.x)
    assert [p.tolist() for p in again.client_train] == [p.tolist() for p in first.client_train]
    assert len(other_seed.train) == 10 and len(list(disk_cache.root.iterdir())) == 2


def test_without_the_disk_cache_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDSIM_CACHE_DIR", str(tmp_path))
    assert partition_cache.active() is None
    federated_data(load_config(ROOT / "configs" / "quickstart.yaml", ["partition.num_clients=4", "seed=11"]))
    assert list(tmp_path.iterdir()) == []


def test_a_node_reads_its_partition_from_the_cache_without_importing_the_data_libraries(tmp_path):
    """The partition a deployed node reads back equals the one built, and reading it needs
    neither scikit-learn nor Hugging Face datasets (seconds of import per message)."""
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", ["partition.num_clients=3"])
    code = ("import json, sys; from fedsim.config import ExperimentConfig; from fedsim.data import cache; "
            "from fedsim.sim.components import federated_data; cache.enable(sys.argv[2]); "
            "d = federated_data(ExperimentConfig.model_validate_json(sys.argv[1])); "
            "print(json.dumps({'sklearn': 'sklearn' in sys.modules, 'datasets': 'datasets' in sys.modules, "
            "'parts': [p.tolist() for p in d.client_train], 'x': float(d.train.x.sum())}))")

    def node() -> dict:
        result = subprocess.run([sys.executable, "-c", code, cfg.model_dump_json(), str(tmp_path)],
                                capture_output=True, text=True, check=True, env={**os.environ})
        return json.loads(result.stdout)

    built, read = node(), node()
    assert built["sklearn"]  # the digits; NIID-Bench's partitions need no Hugging Face datasets
    assert not read["sklearn"] and not read["datasets"]
    assert read["parts"] == built["parts"] and read["x"] == built["x"]
    expected = federated_data(cfg)
    assert read["parts"] == [p.tolist() for p in expected.client_train]


def test_the_default_cache_directory_is_the_users_unless_set(monkeypatch, tmp_path):
    monkeypatch.delenv("FEDSIM_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert partition_cache.default_cache_dir() == tmp_path / "fedsim"
    monkeypatch.setenv("FEDSIM_CACHE_DIR", str(tmp_path / "mine"))
    assert partition_cache.default_cache_dir() == tmp_path / "mine"

"""The clients' states of every simulation backend: bounded in memory, spilled to the run
directory, checkpointed by what changed, and resumed exactly."""

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord

from fedsim.config import load_config
from fedsim.outputs.results import RunDir
from fedsim.runner import run_experiment
from fedsim.sim.client_states import ClientStateStore

QUICKSTART = Path(__file__).parents[2] / "configs" / "quickstart.yaml"
# error feedback: every client that trains keeps a model-sized memory
EF = ("sim.backend=batched", "partition.num_clients=8", "rounds=6", "output.checkpoint_every=3", "output.plots=false",
      "eval.federated=false", "strategy.fraction_train=0.25", "client.local_steps=2", "quant.uplink.codec=topk",
      "quant.uplink.fraction=0.05", "quant.uplink.error_feedback=ef")


def _rows(path):
    return [{k: v for k, v in row.items() if k != "wall_time_s"} for row in RunDir.open(path).rows()]


def test_states_beyond_the_bound_spill_to_files_and_come_back_unchanged(tmp_path):
    store = ClientStateStore(max_bytes=10_000, spill_dir=tmp_path / "spill")
    for pid in range(3):
        store.state(pid)["memory"] = ArrayRecord({"m": torch.full((1000,), float(pid))})  # 4 kB each
    store.state(3)["round"] = ConfigRecord({"r": 1})  # no arrays: held, weighs nothing
    store.state(4)  # nothing kept: dropped
    store.trim()
    assert store.in_memory_bytes() <= 10_000  # the least recently used one went to its file
    assert [p.name for p in (tmp_path / "spill").iterdir()] == ["0.pkl"]
    assert store.keys() == {0, 1, 2, 3}
    assert np.array_equal(store.state(0)["memory"]["m"].numpy(), np.zeros(1000, np.float32))  # read back


def test_a_checkpoint_writes_the_states_of_the_clients_addressed_since_the_last_one(tmp_path):
    store = ClientStateStore(max_bytes=10**6, spill_dir=tmp_path / "spill")
    for pid in (0, 1):
        store.state(pid)["memory"] = ArrayRecord({"m": torch.ones(3)})
    first = store.save(tmp_path / "ckpt", step=3)
    store.state(1)["memory"] = ArrayRecord({"m": torch.zeros(3)})
    second = store.save(tmp_path / "ckpt", step=6)
    assert first == {0: "0-00003.pkl", 1: "1-00003.pkl"} and second == {0: "0-00003.pkl", 1: "1-00006.pkl"}
    store.load(first, tmp_path / "ckpt")
    assert np.array_equal(store.state(1)["memory"]["m"].numpy(), np.ones(3, np.float32))


def test_a_run_whose_states_spill_resumes_exactly_and_checkpoints_only_what_changed(tmp_path):
    bounded = load_config(QUICKSTART, [f"output.dir={tmp_path / 'bounded'}", *EF, "sim.client_state_mb=0"])
    reference, _ = run_experiment(load_config(QUICKSTART, [f"output.dir={tmp_path / 'unbounded'}", *EF]))
    interrupted, _ = run_experiment(bounded)
    run = RunDir.open(interrupted)
    assert any((interrupted / "client_states").iterdir()), "nothing spilled under a bound of 0"
    assert _rows(interrupted) == _rows(reference)
    at_3, at_6 = (torch.load(run.checkpoint_dir / f"round-0000{r}.pt", weights_only=False)["clients"] for r in (3, 6))
    written_at_6 = {pid for pid, name in at_6.items() if name.endswith("-00006.pkl")}
    assert written_at_6 and set(at_6) - written_at_6 <= set(at_3)
    assert len(list((run.checkpoint_dir / "clients").iterdir())) == len(at_3) + len(written_at_6)
    (run.checkpoint_dir / "round-00006.pt").unlink()  # as if killed during round 4
    run_experiment(bounded, resume=interrupted)
    assert _rows(interrupted) == _rows(reference)


def test_grouped_ray_nodes_spill_their_clients_states_transparently_and_resume_exactly(tmp_path):
    # 8 clients on 4 Flower nodes; the states travel with the messages, the server's store spills them
    ray = ("sim.backend=ray", "sim.clients_per_node=2", "rounds=4", "output.checkpoint_every=2")
    bounded = load_config(QUICKSTART, [f"output.dir={tmp_path / 'bounded'}", *EF, *ray, "sim.client_state_mb=0"])
    reference, _ = run_experiment(load_config(QUICKSTART, [f"output.dir={tmp_path / 'unbounded'}", *EF, *ray]))
    interrupted, _ = run_experiment(bounded)
    assert any((interrupted / "client_states").iterdir()), "nothing spilled under a bound of 0"
    assert not (reference / "client_states").exists(), "the default bound spilled"
    assert _rows(interrupted) == _rows(reference)
    run = RunDir.open(interrupted)
    at_2 = torch.load(run.checkpoint_dir / "round-00002.pt", weights_only=False)["clients"]
    assert at_2 and all(isinstance(name, str) for name in at_2.values())  # files, not the records
    (run.checkpoint_dir / "round-00004.pt").unlink()  # as if killed during round 3
    run_experiment(bounded, resume=interrupted)
    assert _rows(interrupted) == _rows(reference)


@pytest.mark.parametrize("strategy", ["fedavg", "median"])
def test_ef21_server_estimates_spill_transparently_and_resume_exactly(tmp_path, strategy):
    # fedavg: EF21-PP's mean is the estimates' running sum; median reads every h_i, streamed from
    # the server's store; a bound of 0 spills every estimate and every client state
    ef21 = [*EF[:-1], "quant.uplink.error_feedback=ef21", f"strategy.name={strategy}", "strategy.fraction_train=0.5"]
    bounded = load_config(QUICKSTART, [f"output.dir={tmp_path / 'bounded'}", *ef21, "sim.client_state_mb=0"])
    reference, _ = run_experiment(load_config(QUICKSTART, [f"output.dir={tmp_path / 'unbounded'}", *ef21]))
    interrupted, _ = run_experiment(bounded)
    assert len(list((interrupted / "server_estimates").iterdir())) == 8, "the server's h_i did not spill"
    assert _rows(interrupted) == _rows(reference)
    run = RunDir.open(interrupted)
    files = [torch.load(run.checkpoint_dir / f"round-0000{r}.pt", weights_only=False)["strategy"]["uplink_estimates"]
             ["files"] for r in (3, 6)]
    written_at_6 = {pid for pid, name in files[1].items() if name.endswith("-00002.pkl")}
    assert written_at_6 and len(list((run.checkpoint_dir / "estimates").iterdir())) == len(files[0]) + len(written_at_6)
    (run.checkpoint_dir / "round-00006.pt").unlink()  # as if killed during round 4
    run_experiment(bounded, resume=interrupted)
    assert _rows(interrupted) == _rows(reference)

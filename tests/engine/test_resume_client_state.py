"""Exact resume with client state, and reproducible runs with every stateful feature.

A checkpoint holds the server's state and, under the simulation backends, every client's
Context state (error-feedback memories, EF21/EControl estimates, per-sample loss state, LSQ
step sizes, SCAFFOLD's control variates). A run resumed from round 3's checkpoint, in a fresh
client runtime (as after a kill -9: the clients' memory is gone), must end with exactly the
numbers of a run that was never interrupted. Half the clients train each round, so state
kept across skipped rounds matters.
"""

import pickle
from pathlib import Path

import pytest
import torch

from fedsim.config import load_config
from fedsim.outputs.results import RunDir
from fedsim.runner import run_experiment

QUICKSTART = Path(__file__).parents[2] / "configs" / "quickstart.yaml"

COMMON = ("sim.backend=inprocess", "partition.num_clients=4", "rounds=6", "output.checkpoint_every=3",
          "output.plots=false", "eval.federated=false", "strategy.fraction_train=0.5", "client.local_steps=3")
TOPK = ("quant.uplink.codec=topk", "quant.uplink.fraction=0.05")

STATEFUL = {
    "ef": [*TOPK, "quant.uplink.error_feedback=ef"],
    "ef21": [*TOPK, "quant.uplink.error_feedback=ef21"],
    "econtrol": [*TOPK, "quant.uplink.error_feedback=econtrol", "quant.uplink.eta=0.1"],
    "aldr_kl": ["loss.name=aldr_kl", "client.batch_size=8"],
    "sogclr": ["loss.name=sogclr", "client.batch_size=16"],  # per-sample state, augmented views
    "lsq": ["quant.qat.weight_bits=4", "quant.qat.granularity=per_tensor", "quant.qat.lsq=true"],
    "scaffold": ["strategy.name=scaffold"],
}
# features that draw random numbers every round, without state of their own
RANDOM = {
    "lowbit": ["quant.lowbit.bits=8", "quant.lowbit.grad_bits=8"],
    "qsgd": ["quant.uplink.codec=qsgd", "quant.uplink.bits=2"],
    "gaussian_attack": ["attack.name=gaussian", "attack.fraction=0.25", "attack.std=1.0"],
}
# what differs between two runs of the same config: the clock
VOLATILE = {"wall_time_s"}


def _rows(path):
    return [{k: v for k, v in row.items() if k not in VOLATILE} for row in RunDir.open(path).rows()]


def _config(tmp_path, name, *extra):
    return load_config(QUICKSTART, [f"output.dir={tmp_path / name}", *COMMON, *{**STATEFUL, **RANDOM}[name], *extra])


@pytest.mark.parametrize("name", STATEFUL)
def test_a_run_resumed_from_a_checkpoint_ends_exactly_like_an_uninterrupted_one(tmp_path, name):
    cfg = _config(tmp_path, name)
    reference, _ = run_experiment(cfg)
    interrupted, _ = run_experiment(cfg)
    run = RunDir.open(interrupted)
    (run.checkpoint_dir / "round-00006.pt").unlink()  # as if killed during round 4
    checkpoint = run.latest_checkpoint()
    assert checkpoint.round == 3 and checkpoint.clients, "the checkpoint holds no client state"
    run_experiment(cfg, resume=interrupted)
    assert _rows(interrupted) == _rows(reference)


@pytest.mark.parametrize("name", [*STATEFUL, *RANDOM])
def test_the_same_config_twice_gives_the_same_numbers(tmp_path, name):
    cfg = _config(tmp_path, name, "rounds=3")
    first, _ = run_experiment(cfg)
    second, _ = run_experiment(cfg)
    assert _rows(first) == _rows(second)


def test_ray_runs_repeat_and_match_the_in_process_numbers_with_every_random_feature(tmp_path):
    # low-bit rounding, a stochastic codec with error feedback and a noise attack at once,
    # on Ray nodes serving two clients each
    sets = [f"output.dir={tmp_path}", *COMMON, "rounds=2", "quant.lowbit.bits=8", "quant.uplink.codec=qsgd",
            "quant.uplink.bits=2", "quant.uplink.error_feedback=ef", "attack.name=gaussian", "attack.fraction=0.25",
            "attack.std=1.0"]
    on_ray = load_config(QUICKSTART, [*sets, "sim.backend=ray", "sim.clients_per_node=2"])
    first, _ = run_experiment(on_ray)
    second, _ = run_experiment(on_ray)
    in_process, _ = run_experiment(load_config(QUICKSTART, [*sets, "sim.backend=inprocess"]))
    assert _rows(first) == _rows(second) == _rows(in_process)


def test_a_checkpoint_holding_every_ef21_estimate_itself_still_resumes(tmp_path):
    # fedsim before the running sum checkpointed every h_i and each client's examples
    cfg = _config(tmp_path, "ef21")
    reference, _ = run_experiment(cfg)
    interrupted, _ = run_experiment(cfg)
    run = RunDir.open(interrupted)
    (run.checkpoint_dir / "round-00006.pt").unlink()
    path = run.checkpoint_dir / "round-00003.pt"
    raw = torch.load(path, weights_only=False)
    saved = raw["strategy"]["uplink_estimates"]
    raw["strategy"]["uplink_estimates"] = {
        str(pid): pickle.loads((run.checkpoint_dir / "estimates" / name).read_bytes()) for pid, name in saved["files"].items()}
    raw["strategy"]["uplink_examples"] = {pid: int(weight) for pid, weight in saved["weights"].items()}
    torch.save(raw, path)
    run_experiment(cfg, resume=interrupted)
    for resumed, expected in zip(_rows(interrupted), _rows(reference), strict=True):
        assert resumed["centralised_accuracy"] == pytest.approx(expected["centralised_accuracy"], abs=0.01)

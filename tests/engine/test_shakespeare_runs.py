"""configs/shakespeare.yaml end to end on a small play written here: FedAvg over speaking roles
with LEAF's char_lstm (narrowed for CI), under the in-process loop and the batched backend."""

import math
from pathlib import Path

import pytest
import torch

from fedsim.config import load_config
from fedsim.outputs.results import RunDir
from fedsim.runner import run_experiment

CONFIG = Path(__file__).parents[2] / "configs" / "shakespeare.yaml"
LINES = {
    "First Citizen": "We are accounted poor citizens, the patricians good.",
    "MENENIUS": "Why, masters, my good friends, mine honest neighbours, will you undo yourselves?",
    "All": "Speak, speak. We know't, we know't. No more talking on't; let it be done: away, away!",
    "Second Citizen": "One word, good citizens. Would you proceed especially against Caius Marcius?",
}


@pytest.fixture
def play(tmp_path):
    """Four roles, six speeches each (about 300 samples per role)."""
    path = tmp_path / "play.txt"
    path.write_text("\n".join(f"{role}:\n{speech}\n" for _ in range(6) for role, speech in LINES.items()))
    return path


@pytest.fixture
def one_thread():
    """The in-process backends train in this process; a step of this small LSTM is some 300
    small operations, which a second thread slows (and a loaded host slows a hundredfold)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_fedavg_over_roles_learns_below_the_uniform_guess_and_the_lstm_stacks(play, tmp_path, one_thread):
    cfg = load_config(CONFIG, [
        "rounds=2", f"data.path={play}", "data.stride=1", "data.min_samples=100", "partition.num_clients=4",
        "strategy.fraction_train=0.5", "strategy.fraction_evaluate=0.5", "model.lstm_hidden=32",
        "client.local_steps=10", "output.plots=false", f"output.dir={tmp_path / 'runs'}",
    ])
    losses = {}
    for backend in ("inprocess", "batched"):
        path, summary = run_experiment(cfg.model_copy(update={"sim": cfg.sim.model_copy(update={"backend": backend})}))
        rows = RunDir.open(path).rows()
        assert summary["status"] == "completed" and [r["round"] for r in rows] == [1, 2]
        assert all(r["num_success"] == 2 and r["num_failed"] == 0 for r in rows)
        losses[backend] = [r["centralised_loss"] for r in rows]
    assert losses["inprocess"][-1] < math.log(80)  # the uniform guess over LEAF's 80 characters
    # batched trains the round's roles as one stacked model (vmap), computing what one at a time does
    assert losses["batched"] == pytest.approx(losses["inprocess"], rel=1e-4)


def test_a_resumed_run_over_roles_ends_exactly_like_an_uninterrupted_one(play, tmp_path, one_thread):
    cfg = load_config(CONFIG, [
        "rounds=4", f"data.path={play}", "data.stride=2", "data.min_samples=50", "partition.num_clients=4",
        "strategy.fraction_train=0.5", "strategy.fraction_evaluate=0.5", "model.lstm_hidden=16", "client.local_steps=3",
        "output.checkpoint_every=2", "output.plots=false", f"output.dir={tmp_path / 'runs'}",
    ])

    def rows(path):
        return [{k: v for k, v in row.items() if k != "wall_time_s"} for row in RunDir.open(path).rows()]

    reference, _ = run_experiment(cfg)
    interrupted, _ = run_experiment(cfg)
    (RunDir.open(interrupted).checkpoint_dir / "round-00004.pt").unlink()  # as if killed during round 3
    run_experiment(cfg, resume=interrupted)
    assert rows(interrupted) == rows(reference)

"""Private runs end to end: every row has the epsilon spent so far, the summary the final one
and delta; a kill -9 and resume continue the accountant (and the noise) exactly;
``privacy.max_epsilon`` stops a run cleanly before it is exceeded."""

from pathlib import Path

import pytest

from fedsim.config import load_config
from fedsim.outputs.results import RunDir
from fedsim.privacy.accounting import GaussianRelease, epsilon
from fedsim.runner import run_experiment

QUICKSTART = Path(__file__).parents[2] / "configs" / "quickstart.yaml"
COMMON = ("partition.num_clients=6", "rounds=4", "output.checkpoint_every=2", "output.plots=false",
          "eval.federated=false", "client.local_steps=2", "model.hidden=[16]", "sim.backend=batched")
CENTRAL = ("strategy.fraction_train=0.5", "privacy.mechanism=central", "privacy.noise_multiplier=1.2",
           "privacy.accountant=rdp", "privacy.clip_norm=0.5")
MECHANISMS = {
    "central": CENTRAL,
    "adaptive": (*CENTRAL, "privacy.clipping=adaptive", "privacy.count_noise_multiplier=2.0"),
    "local": ("privacy.mechanism=local", "privacy.target_epsilon=20"),
    "sample": ("participation.model=bernoulli", "participation.p_low=0.5", "participation.p_high=0.5",
               "privacy.mechanism=sample", "privacy.noise_multiplier=1.0", "privacy.accountant=rdp"),
}


def _config(tmp_path, name, *extra):
    return load_config(QUICKSTART, [f"output.dir={tmp_path / name}", *COMMON, *MECHANISMS[name], *extra])


def _rows(path):
    return [{k: v for k, v in row.items() if k != "wall_time_s"} for row in RunDir.open(path).rows()]


def test_every_row_has_the_epsilon_of_the_rounds_so_far(tmp_path):
    path, summary = run_experiment(_config(tmp_path, "central"))
    rows = _rows(path)
    release = GaussianRelease(1.2, "fixed", 0.5, 3, 6)
    assert [row["epsilon"] for row in rows] == [epsilon({release: r}, 1e-5, "rdp") for r in range(1, 5)]
    assert summary["epsilon"] == rows[-1]["epsilon"] and summary["delta"] == 1e-5


@pytest.mark.parametrize("name", ["adaptive", "local", "sample"])
def test_a_resumed_private_run_continues_its_accountant_and_noise_exactly(tmp_path, name):
    cfg = _config(tmp_path, name)
    reference, _ = run_experiment(cfg)
    interrupted, _ = run_experiment(cfg)
    run = RunDir.open(interrupted)
    (run.checkpoint_dir / "round-00004.pt").unlink()  # as if killed during round 3
    run_experiment(cfg, resume=interrupted)
    rows = _rows(interrupted)
    assert rows == _rows(reference)
    assert rows[-1]["epsilon"] > rows[0]["epsilon"] > 0
    if name == "adaptive":
        assert len({row["clip_norm"] for row in rows}) == 4  # the clip norm moved every round


def test_max_epsilon_stops_the_run_before_it_would_be_exceeded(tmp_path):
    budget = epsilon({GaussianRelease(1.2, "fixed", 0.5, 3, 6): 2}, 1e-5, "rdp") * 1.001
    path, summary = run_experiment(_config(tmp_path, "central", f"privacy.max_epsilon={budget}"))
    assert summary["status"] == "stopped" and summary["rounds_completed"] == 2
    assert summary["epsilon"] <= budget

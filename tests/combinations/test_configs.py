"""Every experiment file in configs/ validates (the data and host checks included) and runs
2 steps in-process with finite metrics; the overrides only shorten it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from fedsim.config import load_config
from fedsim.preflight import preflight
from fedsim.runner import run_experiment

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))


def test_every_config_file_is_covered():
    assert len(CONFIGS) >= 16 and {p.stem for p in CONFIGS} >= {"quickstart", "gossip", "fedbuff", "qat_int8"}


@pytest.fixture
def one_thread():
    """The runs train in this process; one torch thread, which small models (shakespeare's LSTM:
    hundreds of small operations a step) run fastest on, and which a loaded host cannot
    oversubscribe (two threads there made shakespeare's two steps take minutes)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_a_config_file_validates_and_runs_two_steps(path, tmp_path, one_thread):
    family = load_config(path).strategy.family
    length = ["strategy.horizon=2", "strategy.eval_every=1"] if family == "async" else ["rounds=2"]
    # an algorithm with its own loop (family custom: sgc's simulated workers) trains no client
    clients = [] if family == "custom" else ["sim.backend=inprocess", "client.local_steps=1"]
    cfg = load_config(path, [*length, *clients, "output.plots=false", f"output.dir={tmp_path}"])
    preflight(cfg)
    run_dir, summary = run_experiment(cfg)
    assert summary["status"] == "completed"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and not any(r.get("skipped") for r in rows)
    assert math.isfinite(summary["final_accuracy"]) and math.isfinite(summary["final_loss"])

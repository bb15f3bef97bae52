"""A FedDyn run killed with SIGKILL and resumed (`fedsim run --resume`) ends with exactly the
numbers of a run never interrupted: the server's h is in the checkpoint's strategy state,
every client's h_i in the checkpoint's client states. Half the clients train each round, so
an h_i carried across rounds a client skips matters."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from fedsim_feddyn import GRADIENT_STATE_KEY

from fedsim.config import load_config
from fedsim.outputs.results import RunDir
from fedsim.runner import run_experiment

QUICKSTART = Path(__file__).parents[3] / "configs" / "quickstart.yaml"
ROUNDS = 8
OVERRIDES = ("strategy.name=feddyn", "strategy.alpha=0.01", f"rounds={ROUNDS}", "output.checkpoint_every=2",
             "strategy.fraction_train=0.5", "sim.backend=inprocess", "eval.federated=false", "output.plots=false")


def _rows(path: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "wall_time_s"} for row in RunDir.open(path).rows()]


def test_a_killed_feddyn_run_resumes_to_exactly_the_uninterrupted_numbers(tmp_path):
    cfg = load_config(QUICKSTART, [f"output.dir={tmp_path / 'runs'}", *OVERRIDES])
    reference, _ = run_experiment(cfg)
    config_file = tmp_path / "killed.yaml"
    config_file.write_text(cfg.model_copy(update={"name": "killed"}).to_yaml())
    fedsim = [sys.executable, "-m", "fedsim.cli"]
    proc = subprocess.Popen([*fedsim, "run", str(config_file), "--no-progress"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    killed_dir, deadline = None, time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        dirs = list((tmp_path / "runs").glob("killed-*"))
        if dirs and (dirs[0] / "checkpoints" / "round-00002.pt").exists():
            killed_dir = dirs[0]
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait(timeout=30)
    assert killed_dir is not None, "the run finished or stalled before it could be killed"
    assert len(RunDir.open(killed_dir).rows()) < ROUNDS
    killed = RunDir.open(killed_dir)
    checkpoint = killed.latest_checkpoint()
    assert checkpoint.strategy["feddyn_h"].abs().max() > 0
    assert any(GRADIENT_STATE_KEY in killed.client_state(checkpoint, pid) for pid in checkpoint.clients)

    done = subprocess.run([*fedsim, "run", "--resume", str(killed_dir), "--no-progress"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _rows(killed_dir) == _rows(reference)
    resumed, uninterrupted = RunDir.open(killed_dir).latest_checkpoint(), RunDir.open(reference).latest_checkpoint()
    assert resumed.round == uninterrupted.round == ROUNDS
    for name, value in uninterrupted.model.items():
        assert torch.equal(resumed.model[name], value), name
    assert torch.equal(resumed.strategy["feddyn_h"], uninterrupted.strategy["feddyn_h"])

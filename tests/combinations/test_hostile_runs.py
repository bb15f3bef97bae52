"""Hostile runs from the command line: what ``fedsim run`` must stop on in one line, with
exit code 2 and without touching a run directory (a cluster that does not answer, resume
forms it cannot honour, damaged run files)."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedsim.cli import app
from fedsim.config import load_config
from fedsim.runner import run_experiment

QUICKSTART = Path(__file__).parents[2] / "configs" / "quickstart.yaml"


def _invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def _unused_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_ray_address_where_no_cluster_runs_stops_within_wait_for_nodes_in_one_line(tmp_path):
    address = f"127.0.0.1:{_unused_loopback_port()}"
    runs = tmp_path / "runs"
    start = time.monotonic()
    result = _invoke("run", str(QUICKSTART), "--set", f"output.dir={runs}", "--set", f"sim.ray_address={address}",
                     "--set", "sim.wait_for_nodes_s=2", "--no-progress")
    assert time.monotonic() - start < 30
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: no Ray cluster answers at {address} after 2 s"), lines
    assert "sim.wait_for_nodes_s" in lines[0] and not runs.exists()


# ---------------------------------------------------------------------------- resume
SHORT = ["rounds=2", "sim.backend=inprocess", "client.local_steps=1", "output.plots=false",
         "output.checkpoint_every=1", "partition.num_clients=4"]


@pytest.fixture
def finished_run(tmp_path) -> Path:
    """A run directory of 2 completed rounds, a checkpoint after each."""
    path, summary = run_experiment(load_config(QUICKSTART, [*SHORT, f"output.dir={tmp_path / 'runs'}"]))
    assert summary["status"] == "completed"
    return path


def _garble_checkpoint(run: Path) -> None:
    (run / "checkpoints" / "round-00002.pt").write_bytes(b"not a checkpoint")


def _truncate_checkpoint(run: Path) -> None:
    path = run / "checkpoints" / "round-00002.pt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garble_first_row(run: Path) -> None:
    rows = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join([rows[0][:20], *rows[1:]]) + "\n")


REFUSED_RESUMES = [
    # (extra arguments, damage to the run directory, words of the one line)
    (["--set", "seed=7"], None, "seed 7 (the run has 0) would make another run, not this one continued"),
    (["--set", "client.lr=0.5", "--set", "strategy.name=fedprox"], None, "client.lr 0.5 (the run has 0.05)"),
    ([str(QUICKSTART)], None, "give CONFIG or --resume RUN_DIR, not both"),
    ([], _garble_checkpoint, "round-00002.pt: not a readable checkpoint"),
    ([], _truncate_checkpoint, "round-00002.pt: not a readable checkpoint"),
    ([], _garble_first_row, "metrics.jsonl: line 1 is not a metrics row"),
]


@pytest.mark.parametrize(("arguments", "damage", "words"), REFUSED_RESUMES,
                         ids=["seed", "lr-and-strategy", "config-and-resume", "garbage-checkpoint",
                              "truncated-checkpoint", "garbled-row"])
def test_a_resume_that_cannot_continue_the_run_is_refused_in_one_line(finished_run, arguments, damage, words):
    if damage is not None:
        damage(finished_run)
    before = (finished_run / "config.yaml").read_text()
    result = _invoke("run", "--resume", str(finished_run), "--no-progress", *arguments)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], lines
    assert (finished_run / "config.yaml").read_text() == before


def test_a_torn_last_row_resumes_from_the_last_complete_one_and_more_rounds_are_recorded(finished_run):
    metrics = finished_run / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"round": 3, "centralised_acc')  # a crash while writing row 3
    result = _invoke("run", "--resume", str(finished_run), "--no-progress", "--set", "rounds=3")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert load_config(finished_run / "config.yaml").rounds == 3  # the change is recorded

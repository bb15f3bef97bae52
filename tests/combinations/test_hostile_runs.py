"""Hostile runs from the command line: what ``fedsim run`` must stop on in one line, with
exit code 2 and without touching a run directory (a cluster that does not answer, resume
forms it cannot honour, damaged run files)."""

from __future__ import annotations

import socket
import time
from pathlib import Path

from typer.testing import CliRunner

from fedsim.cli import app

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

"""Ray worker faults: a ``ClientAppActor`` killed mid-run (``kill -9``, as the kernel's OOM
killer does) is replaced, its message runs again, and the event is one line."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

from fedsim.config import load_config
from fedsim.outputs.results import RunDir
from fedsim.runner import run_experiment

ROOT = Path(__file__).parents[2]
OVERRIDES = ["partition.num_clients=6", "rounds=5", "eval.federated=false", "output.plots=false",
             "sim.num_cpus_per_client=1", "client.local_epochs=1"]


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()  # state, ppid, ...
            if fields[0] != "Z" and int(fields[1]) == pid:
                found.append(int(entry))
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def _client_workers() -> list[int]:
    """This process's live ClientAppActor workers (children of the raylet it started)."""
    raylets = [p for p in _children(os.getpid()) if "raylet" in _cmdline(p).split("\0")[0]]
    return [p for r in raylets for p in _children(r) if _cmdline(p).startswith("ray::ClientAppActor")]


def _kill_a_worker_after_round(monkeypatch, server_round: int, killed: list[tuple[int, int]]) -> None:
    """kill -9 one client worker (into ``killed``) as the driver writes ``server_round``'s row:
    between rounds, in the driver's own thread, so the kill lands mid-run however slowly or
    quickly the host runs the rounds."""
    append = RunDir.append

    def append_then_kill(self: RunDir, row: dict) -> None:
        append(self, row)
        if row["round"] == server_round and not killed and (workers := _client_workers()):
            os.kill(workers[0], signal.SIGKILL)
            killed.append((row["round"], workers[0]))

    monkeypatch.setattr(RunDir, "append", append_then_kill)


def _rows(path: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "wall_time_s"} for r in RunDir.open(path).rows()]


def test_a_killed_ray_worker_is_replaced_and_the_run_equals_an_undisturbed_one(tmp_path, caplog, capfd,
                                                                               monkeypatch):
    config = ROOT / "configs" / "quickstart.yaml"
    killed: list[tuple[int, int]] = []
    _kill_a_worker_after_round(monkeypatch, 1, killed)
    with caplog.at_level(logging.WARNING):
        path, _ = run_experiment(load_config(config, [*OVERRIDES, f"output.dir={tmp_path / 'ray'}"]))
    monkeypatch.undo()
    printed = capfd.readouterr()
    assert killed, "no ClientAppActor worker was found to kill"
    [(after_round, pid)] = killed
    assert after_round < 5  # the kill landed mid-run
    rows = _rows(path)
    # the lost worker was replaced and its message ran again: no round after the kill lost a client
    assert [r["num_failed"] for r in rows] == [0] * 5
    undisturbed, _ = run_experiment(load_config(config, [*OVERRIDES, "sim.backend=inprocess",
                                                         f"output.dir={tmp_path / 'inprocess'}"]))
    assert rows == _rows(undisturbed)
    # one line about it: fedsim's; none of Flower's tracebacks nor the raylet's notice
    notices = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(notices) == 1 and notices[0].startswith(f"Ray worker pid {pid} died"), notices
    assert "\n" not in notices[0]
    output = printed.out + printed.err
    assert "Traceback" not in output and "A worker died or was killed" not in output, output[-3000:]
    # at most 3 lines printed (a console handler a CLI test installed may wrap one over several:
    # its continuation lines start with blanks)
    assert len([line for line in output.splitlines() if line.strip() and not line[0].isspace()]) <= 3, output[-3000:]

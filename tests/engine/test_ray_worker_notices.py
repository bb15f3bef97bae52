"""The pieces of Ray fault handling that need no Ray cluster: the raylet's notices summarised
into one fedsim line per event, and a grid whose engine lost every worker stopping the run."""

from __future__ import annotations

import logging

import pytest

from fedsim.sim.ray_nodes import EngineLost, GroupedGrid
from fedsim.sim.ray_workers import _RayletSummary

WORKER_DIED = ("A worker died or was killed while executing a task by an unexpected system error. To troubleshoot "
               "the problem, check the logs for the dead worker. Lease ID: 01 Worker PID: 6603")
RAYLET_DIED = ("Raylet is terminated. Termination is unexpected. Possible reasons include: (1) SIGKILL by the user "
               "or system OOM killer, (2) Invalid memory access. Last 20 lines of the Raylet logs:")
MARKED_DEAD = ("The node with node id: 22e6 and address: 192.0.2.2 and node name: 192.0.2.2 has been marked dead "
               "because the detector has missed too many heartbeats from it. This can happen when a")


def test_the_raylets_notices_of_one_event_become_one_fedsim_line_and_others_pass(caplog):
    printed = []
    summary = _RayletSummary(lambda data, *args, **kwargs: printed.append(data["lines"]))
    with caplog.at_level(logging.WARNING):
        summary({"pid": "raylet", "lines": [WORKER_DIED]}, None)
        summary({"pid": "raylet", "lines": [RAYLET_DIED, "    [state-dump] NodeManager:", "    [2026-12-05] x"]}, None)
        summary({"pid": "raylet", "lines": [RAYLET_DIED, "    [state-dump] NodeManager:"]}, None)
        summary({"pid": "raylet", "lines": [MARKED_DEAD, "\t(2) raylet has lagging heartbeats"]}, None)
        summary({"pid": "raylet", "lines": ["something else the raylet says"]}, None)
        summary({"pid": 4242, "lines": [WORKER_DIED]}, None)  # a worker's own output is left alone
    assert printed == [["something else the raylet says"], [WORKER_DIED]]
    assert [r.getMessage() for r in caplog.records] == [
        ("Ray's raylet (the node manager of this machine) died: Raylet is terminated. Termination is unexpected. "
         "Running workers may go on; one that dies cannot be replaced there")]


def test_a_node_marked_dead_alone_is_one_line(caplog):
    summary = _RayletSummary(lambda *args, **kwargs: None)
    with caplog.at_level(logging.WARNING):
        summary({"pid": "raylet", "lines": [MARKED_DEAD, "\t(1) raylet crashes", "\t(2) lagging"]}, None)
        summary({"pid": "raylet", "lines": [MARKED_DEAD]}, None)
    assert [r.getMessage() for r in caplog.records] == [
        "Ray marked the node at 192.0.2.2 dead (it missed its heartbeats): its workers are lost"]


class _CountingGrid:
    def __init__(self) -> None:
        self.pushes = 0

    def push_messages(self, messages):
        self.pushes += 1
        return []


def test_a_grid_whose_engine_lost_every_worker_stops_the_run_before_pushing():
    lost: list[str] = []
    engine = _CountingGrid()
    grid = GroupedGrid(engine, num_partitions=4, clients_per_node=2, engine_lost=lambda: lost[0] if lost else None)
    assert list(grid.push_messages([])) == [] and engine.pushes == 1
    lost.append("every Ray client worker is lost")
    with pytest.raises(EngineLost, match="every Ray client worker is lost"):
        grid.push_messages([])
    assert engine.pushes == 1

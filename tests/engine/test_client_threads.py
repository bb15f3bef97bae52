"""Torch's thread count belongs to the process that owns it: a worker process running the
ClientApp (a Ray actor, a ClientApp process) sets its own from ``sim.num_cpus_per_client``;
the in-process backends, which train in the driver, leave the driver's as they are (its
evaluation and stacked training use them)."""

import pytest
import torch
from flwr.app import Context, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from fedsim.runner import run_experiment
from fedsim.sim.client_app import build_client_app


@pytest.fixture
def driver_threads():
    """The calling process runs with 3 torch threads during the test, and as before after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    yield 3
    torch.set_num_threads(before)


@pytest.mark.parametrize("backend", ["inprocess", "batched"])
def test_in_process_clients_leave_the_drivers_threads_alone(small_config, driver_threads, backend):
    run_experiment(small_config(f"sim.backend={backend}", "sim.num_cpus_per_client=1", "rounds=1",
                                "output.plots=false"))
    assert torch.get_num_threads() == driver_threads


def test_the_client_app_sets_its_worker_processes_threads(small_config, driver_threads, monkeypatch):
    # a ClientApp's process has a task identity, which its messages take their sender from
    for name, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", SUPERLINK_NODE_ID)):
        monkeypatch.setattr(TaskIdentity, name, value)
    app = build_client_app(small_config("sim.num_cpus_per_client=2"))
    context = Context(run_id=1, node_id=5, node_config={"partition-id": 3}, state=RecordDict(), run_config={})
    reply = app(Message(RecordDict(), dst_node_id=5, message_type="query"), context)
    assert int(reply.content.metric_records["metrics"]["partition-id"]) == 3
    assert torch.get_num_threads() == 2

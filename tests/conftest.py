"""Test-suite layout under pytest-xdist (``make test`` runs ``pytest -n 2 --dist loadgroup``).

The loopback deployments (tests/deploy) and the two-node Ray cluster (tests/cluster) spend
most of their time waiting: a Flower SuperNode polls for messages every 3 s. They run one
after the other on one worker (so the module's shared deployment is started once and no two
deployments compete for the CPU), while the other tests share both workers.

pytest-randomly (in the ``test`` extra) runs the tests in a new order every time: no test may
depend on torch threads, seeds, environment or working directory left by another. The seed
is in the header; ``-p randomly --randomly-seed=N`` repeats an order, ``-p no:randomly``
keeps the file order.
"""

from __future__ import annotations

from pathlib import Path

import pytest

SERIAL = {"deploy", "cluster"}


@pytest.fixture(autouse=True)
def server_task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test starts as the server process of run 1, the identity fedsim's in-process grid
    gives the driver (Flower's ``Message`` takes its sender from it): a test that builds a
    Message without a grid does not depend on a grid another test built before it."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", SUPERLINK_NODE_ID)):
        monkeypatch.setattr(TaskIdentity, name, value)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    tests = Path(__file__).parent
    for item in items:
        path = Path(item.path)
        if path.is_relative_to(tests) and path.relative_to(tests).parts[0] in SERIAL:
            item.add_marker(pytest.mark.xdist_group("deployment"))

"""Which Ray node ran a client call: on a cluster, each training reply says so, and the
server logs it at DEBUG (``fedsim run --verbose``), to check that every machine works."""

from __future__ import annotations

import sys


def ray_node_metric() -> dict[str, int]:
    """``{"ray-node": the first 48 bits of this Ray node's id}`` in a process connected to
    Ray, else ``{}`` (Ray is never imported here: a deployed client does not have it loaded)."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return {}
    return {"ray-node": int(ray.get_runtime_context().get_node_id()[:12], 16)}

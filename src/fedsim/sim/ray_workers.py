"""Ray workers that come back: Flower's Ray backend with its lost workers replaced, and the
error records of one lost worker collapsed into one fedsim line.

Flower 1.41's simulation engine runs each message in a ``ClientAppActor`` taken from a
``BasicActorPool`` (``flwr/simulation/ray_transport/ray_actor.py``). ``RayBackend.process_message``
(``flwr/server/superlink/fleet/vce/backend/raybackend.py``) puts the actor back into the
pool whatever happened (``self.pool.add_actor_back_to_pool(future)`` in its ``except``), a
dead one included, and nothing replaces it: once a worker dies (killed, out of memory), every
message handed to it fails at once, for the rest of the run, and as it fails fast it is the
idle actor most often (4-5 of 6 clients failed in every later round). Each failure logs the
backend's line, the exception and its traceback (``vce_api.worker``), dozens of lines.

:class:`RepairingRayBackend` is Flower's backend with ``process_message`` done here: when the
actor of a message has died (``ray.exceptions.RayActorError``), the dead actor leaves the
pool, a new one is started (up to ``sim.wait_for_nodes_s`` for it to come up) and the message
runs again, once, on a live worker; the event is one WARNING line (the raylet's own notice of
the death, which Ray prints from the driver, is dropped: :class:`_RayletSummary`). A worker that cannot be
replaced (its node is gone) leaves the pool one short, and a message that finds no live
worker fails at once in one line (:class:`WorkerLost`), the client's failure of that round;
once no worker is left, the server stops the run before its next round (:class:`PoolHealth`,
``fedsim.sim.ray_nodes.EngineLost``).
:func:`repairing_ray_backend` puts it in Flower's place while ``run_simulation`` runs.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
from collections.abc import Iterator
from typing import Any

import ray
from flwr.app import Context, Message
from flwr.common.constant import PARTITION_ID_KEY
from flwr.server.superlink.fleet.vce.backend import raybackend
from ray.exceptions import GetTimeoutError, RayActorError, RayError

log = logging.getLogger(__name__)


class WorkerLost(RuntimeError):
    """A client's message could not run: its Ray worker died and no live worker took it."""


def _one_line(exc: BaseException) -> str:
    """``ClientAppActor pid 6603 died: Worker unexpectedly exits ...`` from Ray's many-line text."""
    text = str(exc)
    pid = re.search(r"\bpid: (\d+)", text)
    detail = re.search(r"Worker exit detail: ([^.]+)", text)
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    first = first if len(first) <= 160 else f"{first[:157]}..."
    return (f"Ray worker{f' pid {pid.group(1)}' if pid else ''} died"
            f"{f' ({detail.group(1).strip()})' if detail else ''}: {first}")


class PoolHealth:
    """What the server side learns of the backend's pool: ``lost`` says why no worker is left
    (None while one is); :class:`fedsim.sim.ray_nodes.GroupedGrid` then stops the run."""

    def __init__(self) -> None:
        self.lost: str | None = None


class RepairingRayBackend(raybackend.RayBackend):
    """Flower's ``RayBackend`` whose dead actors are replaced (module docstring)."""

    worker_start_s: float = 120.0
    health: PoolHealth = PoolHealth()

    def __init__(self, backend_config: Any) -> None:
        super().__init__(backend_config)  # starts (or attaches to) Ray
        self._pool_lock = threading.Lock()

    def process_message(self, message: Message, context: Context) -> tuple[Message, Context]:
        if self.pool is None or self.app_fn is None:
            return super().process_message(message, context)  # Flower's own error
        partition_id = context.node_config[PARTITION_ID_KEY]
        try:
            return self._run(message, context)
        except _ActorDied as died:
            replaced = self._replace(died.actor)
            log.warning("%s; %s", _one_line(died.error),
                        f"replaced it, client {partition_id}'s message runs again" if replaced
                        else f"no new worker started within {self.worker_start_s:g} s (sim.wait_for_nodes_s): "
                             f"{self.pool.num_actors} worker(s) left")
        try:
            return self._run(message, context)
        except _ActorDied as died:
            self._replace(died.actor)
            raise WorkerLost(f"client {partition_id}: {_one_line(died.error)} twice") from None

    def _run(self, message: Message, context: Context) -> tuple[Message, Context]:
        """Flower's ``process_message`` less its ``add_actor_back_to_pool`` of a dead actor."""
        assert self.pool is not None
        with self._pool_lock:
            if not self.pool.is_actor_available():
                raise WorkerLost(f"no live Ray worker: {self.pool.num_actors} left, all busy or lost")
            future = self.pool.submit(lambda actor, app_fn, msg, cid, ctx: actor.run.remote(app_fn, msg, cid, ctx),
                                      (self.app_fn, message, str(context.node_config[PARTITION_ID_KEY]), context))
        try:
            _, reply, updated = ray.get(future)
        except RayActorError as exc:
            with self._pool_lock:
                actor = self.pool._future_to_actor.pop(future)
            raise _ActorDied(actor, exc) from None
        except Exception:
            with self._pool_lock:
                self.pool.add_actor_back_to_pool(future)
            raise
        with self._pool_lock:
            self.pool.add_actor_back_to_pool(future)
        return reply, updated

    def _replace(self, dead: Any) -> bool:
        """Start a worker in place of ``dead``; False (the pool one short) if none came up."""
        assert self.pool is not None
        with contextlib.suppress(RayError, ValueError):
            ray.kill(dead)
        fresh = self.pool.create_actor_fn()
        try:
            ray.get(fresh.__ray_ready__.remote(), timeout=self.worker_start_s)
        except (GetTimeoutError, RayError):
            with contextlib.suppress(RayError, ValueError):
                ray.kill(fresh)
            with self._pool_lock:
                self.pool.num_actors -= 1
                if self.pool.num_actors <= 0:
                    self.health.lost = (f"every Ray client worker is lost and none could be started within "
                                        f"{self.worker_start_s:g} s (sim.wait_for_nodes_s)")
            return False
        with self._pool_lock:
            self.pool.pool.append(fresh)
        return True


class _ActorDied(Exception):
    def __init__(self, actor: Any, error: RayActorError) -> None:
        super().__init__(str(error))
        self.actor, self.error = actor, error


WORKER_DIED = re.compile(r"A worker died or was killed while executing a task")
NODE_MARKED_DEAD = re.compile(r"^The node with node id: \w+ and address: (\S+) .*has been marked dead")
RAYLET_DIED = re.compile(r"^\s*(Raylet is terminated\.[^.]*\.)")


class _RayletSummary:
    """Ray's driver prints what the raylet (Ray's per-machine node manager) reports: a
    worker's death as one long line (:class:`RepairingRayBackend` says it in its own line),
    its own death as its last 20 log lines, and the head's notice that the node missed its
    heartbeats as two more. This drops the first and turns the others, one event, into one
    fedsim ERROR line; every other line Ray prints is left alone.

    Ray has no public hook for this: both reach ``ray._private.worker.print_worker_logs``
    (the worker death through ``listen_error_messages``, the raylet's log through the
    ``ray_print_logs`` handler), which :func:`repairing_ray_backend` wraps in this."""

    def __init__(self, print_logs: Any) -> None:
        self.print_logs = print_logs
        self.dead_raylets: set[str] = set()

    def __call__(self, data: dict[str, Any], *args: Any, **kwargs: Any) -> None:
        if data.get("pid") == "raylet":
            lines = [line for line in data.get("lines", []) if not WORKER_DIED.search(line)]
            if lines and (died := RAYLET_DIED.match(lines[0])):
                node = data.get("ip") or "this machine"
                if node not in self.dead_raylets:  # Ray prints its last lines more than once
                    self.dead_raylets.add(node)
                    log.error("Ray's raylet (the node manager of %s) died: %s Running workers may go on; "
                              "one that dies cannot be replaced there", node, died.group(1))
                return
            if lines and (dead := NODE_MARKED_DEAD.match(lines[0])):
                # the same event as the raylet's death, seen by Ray's head, or a node that went silent
                if not self.dead_raylets & {dead.group(1), "this machine"}:
                    self.dead_raylets.add(dead.group(1))
                    log.error("Ray marked the node at %s dead (it missed its heartbeats): its workers are lost",
                              dead.group(1))
                return
            if not lines:
                return
            data = {**data, "lines": lines}
        self.print_logs(data, *args, **kwargs)


class _QuietLostWorkers(logging.Filter):
    """Drops the engine's records of a :class:`WorkerLost` (``vce_api.worker`` logs the
    exception, then its traceback): the backend's line and the client's failure say it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, WorkerLost):
            return False
        return not (isinstance(record.msg, str) and record.msg.startswith("Traceback")
                    and f"{WorkerLost.__module__}.{WorkerLost.__name__}" in record.msg)


@contextlib.contextmanager
def repairing_ray_backend(worker_start_s: float) -> Iterator[PoolHealth]:
    """Flower's simulation engine uses :class:`RepairingRayBackend` while the block runs
    (``vce_api.start_vce`` imports ``RayBackend`` from its module when it starts the engine),
    and the raylet's notices are summarised (:class:`_RayletSummary`); yields the pool's health."""
    from ray._private import worker as ray_worker

    health = PoolHealth()
    backend = type("RepairingRayBackend", (RepairingRayBackend,), {"worker_start_s": worker_start_s,
                                                                    "health": health})
    original, quiet, flwr_log = raybackend.RayBackend, _QuietLostWorkers(), logging.getLogger("flwr")
    print_logs = ray_worker.print_worker_logs
    raybackend.RayBackend = backend
    ray_worker.print_worker_logs = _RayletSummary(print_logs)
    flwr_log.addFilter(quiet)
    try:
        yield health
    finally:
        raybackend.RayBackend = original
        ray_worker.print_worker_logs = print_logs
        flwr_log.removeFilter(quiet)

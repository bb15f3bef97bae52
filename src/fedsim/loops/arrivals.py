"""Client jobs and their arrivals at the server, on a virtual or a wall clock.

The asynchronous loop (:mod:`fedsim.loops.asynchronous`) hands each training job to an
*arrival source* and asks it for the next arrival before a given time. Two sources share
that interface; the loop and the algorithms do not know which one runs:

- :class:`VirtualArrivals` (simulation). The server computes each job's finish time at
  dispatch from the client's simulated device (:class:`SimulatedDevices`: work / speed,
  plus network delay, dropout drawn from a generator keyed by (seed, client, dispatch
  count)) and queues it in an :class:`~fedsim.loops.clock.EventQueue`. Arrivals are
  processed strictly in virtual-time order (ties by the queue's seeded keys); the reply of
  the earliest event is pulled from the grid, waiting for it if it is not ready yet, so
  the host's load changes how long the server waits, never what it computes.
- :class:`WallArrivals` (deployment). Time is the wall clock; an arrival is whichever
  reply the grid hands back first.

Times of the virtual clock are in units of the slowest client's time for one local update
(``max_i work_i / speed_i``), as ``strategy.horizon``, ``eval_every`` and ``window`` are;
``sim.speeds.network_delay`` is in the same unit. On the wall clock the unit is a second.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import Message
from flwr.serverapp import Grid

from fedsim.clients.train import local_steps as client_steps
from fedsim.config import ExperimentConfig
from fedsim.loops.clock import EventQueue, VirtualClock, WallClock
from fedsim.quant.codecs import Codec
from fedsim.seeding import derive_seed
from fedsim.sim.components import Federation, device_speeds
from fedsim.sim.messaging import reply_allowance
from fedsim.sim.speeds import client_duration
from fedsim.strategies.replies import TIMEOUT, ClientUpdate, Failure, screen_train_reply

POLL_S = 0.01
LOST = "update lost (simulated dropout)"
UNSENT = "the grid did not accept the message"


def local_steps(cfg: ExperimentConfig, data: Federation) -> np.ndarray:
    """Each client's local steps per update, as ``train_local`` counts them."""
    return np.array([client_steps(int(size), cfg.client) for size in data.train_sizes()])


class SimulatedDevices:
    """Simulated client devices: the virtual time of each training job.

    A job of client i takes ``work_i / speed_i`` (what the client itself reports as its
    ``virtual_duration``), divided by the time unit ``max_j work_j / speed_j`` (the slowest
    client's time for one update), plus ``network_delay``. With probability ``dropout`` its
    update is lost; the draw comes from a generator seeded by (seed, client, dispatch
    count), so it does not depend on the order in which jobs are dispatched.

    Parameters
    ----------
    work : numpy.ndarray, shape (N,)
        Units of work per update (local steps).
    speeds : numpy.ndarray, shape (N,)
        Work per unit of raw virtual time (``fedsim.sim.speeds.client_speeds``).
    network_delay : float, default 0.0
        Added to every job, in time units.
    dropout : float, default 0.0
        Probability that a job's update is lost.
    seed : int, default 0
        Seed of the dropout draws.
    """

    def __init__(self, work: np.ndarray, speeds: np.ndarray, network_delay: float = 0.0,
                 dropout: float = 0.0, seed: int = 0) -> None:
        if work.shape != speeds.shape:
            raise ValueError(f"SimulatedDevices: {len(work)} work values for {len(speeds)} speeds")
        self.work = work.astype(float)
        self.speeds = speeds.astype(float)
        self.unit = float(np.max(self.work / self.speeds))
        self.network_delay = float(network_delay)
        self.dropout = float(dropout)
        self.seed = int(seed)

    @classmethod
    def from_config(cls, cfg: ExperimentConfig, data: Federation) -> SimulatedDevices:
        """The devices of ``cfg.sim.speeds`` running ``cfg.client``'s local steps."""
        speeds = cfg.sim.speeds
        return cls(local_steps(cfg, data), device_speeds(cfg), speeds.network_delay, speeds.dropout, cfg.seed)

    def compute_time(self, client: int) -> float:
        """``work / speed`` of one update, in raw units (what the client reports)."""
        return float(self.work[client] / self.speeds[client])

    def job(self, client: int, count: int) -> tuple[float, bool]:
        """Duration (time units) of the client's ``count``-th job, and whether it is lost."""
        delay = self.network_delay * self.unit
        rng = np.random.default_rng(derive_seed(self.seed, "dropout", client, count))
        duration = client_duration(self.work[client], self.speeds[client], network_delay=delay,
                                   rng=rng, dropout=self.dropout)
        if duration is None:
            return client_duration(self.work[client], self.speeds[client], network_delay=delay) / self.unit, True
        return duration / self.unit, False


@dataclass
class Job:
    """One training job: a client trains from the global model of ``base_version``.

    Attributes
    ----------
    partition_id : int
        The client.
    count : int
        How many jobs the client has been given, this one included; its training seed
        (the ``server-round`` of its message).
    base : torch.Tensor
        The flat global model it starts from.
    base_version : int
        The version (number of model updates) of ``base``.
    start : float
        Dispatch time.
    lost : bool
        Its update will be lost (simulated dropout): no message goes out.
    message_id : str or None
        The grid's id of its TRAIN message; None when none was sent or accepted.
    deadline : float
        Wall-clock (``time.monotonic``) time after which its reply counts as missing.
    result : ClientUpdate or Failure or None
        Its reply, screened, when a checkpoint found it in before its arrival time (a
        resume then needs no new message for it).
    """

    partition_id: int
    count: int
    base: torch.Tensor
    base_version: int
    start: float
    lost: bool = False
    message_id: str | None = None
    deadline: float = field(default=math.inf)
    result: ClientUpdate | Failure | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class Arrival:
    """A job's result reaching the server at ``time``: an accepted update or a failure."""

    job: Job
    time: float
    result: ClientUpdate | Failure

    @property
    def duration(self) -> float:
        """Time from dispatch to arrival (FedFix's tau_i)."""
        return self.time - self.job.start


def _push(grid: Grid, batch: list[tuple[Job, Message]], timeout_s: float) -> None:
    """Push the jobs' messages at once (a simulated node trains them together); a job whose
    message the grid did not accept keeps no message id (Flower's grids stamp each message
    they take with its id, and return the ids they took)."""
    if not batch:
        return
    accepted = set(grid.push_messages([message for _, message in batch]))
    deadline = time.monotonic() + reply_allowance(grid, timeout_s)
    for job, message in batch:
        job.message_id = message.metadata.message_id if message.metadata.message_id in accepted else None
        job.deadline = deadline


class VirtualArrivals:
    """Arrivals on a virtual clock, processed in order of simulated finish time.

    Parameters
    ----------
    grid : Grid
        Where TRAIN messages go.
    devices : SimulatedDevices
        Durations and dropouts of jobs.
    dim : int
        Length of a flat update.
    codec : Codec
        The uplink codec replies are decoded with.
    timeout_s : float
        Wall-clock seconds a reply may take before the job counts as failed.
    seed : int
        Seed of the event queue's tie-breaking.
    """

    resumable = True

    def __init__(self, grid: Grid, devices: SimulatedDevices, dim: int, codec: Codec, timeout_s: float,
                 seed: int) -> None:
        self.grid = grid
        self.devices = devices
        self.dim = dim
        self.codec = codec
        self.timeout_s = timeout_s
        self.clock = VirtualClock()
        self.queue = EventQueue(seed)

    def dispatch(self, batch: list[tuple[Job, Message]]) -> None:
        """Send the jobs' messages together (but those whose update will be lost) and queue
        their arrivals."""
        sent = []
        for job, message in batch:
            duration, job.lost = self.devices.job(job.partition_id, job.count)
            if not job.lost:
                sent.append((job, message))
            self.queue.push(job.start + duration, job.partition_id, job)
        _push(self.grid, sent, self.timeout_s)

    def resend(self, batch: list[tuple[Job, Message]]) -> None:
        """Send restored jobs' messages again (resume), those whose reply the checkpoint
        does not hold; their arrivals are already queued."""
        _push(self.grid, [(job, message) for job, message in batch if not job.lost and job.result is None],
              self.timeout_s)

    def next_until(self, t: float) -> Arrival | None:
        """The earliest arrival at or before ``t`` (the clock moves to it), else None."""
        next_time = self.queue.peek_time()
        if next_time is None or next_time > t:
            return None
        event = self.queue.pop()
        self.clock.advance_to(event.time)
        return Arrival(event.payload, event.time, self._result(event.payload))

    def _result(self, job: Job) -> ClientUpdate | Failure:
        if job.lost:
            return Failure(job.partition_id, LOST)
        if job.result is not None:
            return job.result
        if job.message_id is None:
            return Failure(job.partition_id, UNSENT)
        while not (replies := list(self.grid.pull_messages([job.message_id]))):
            if time.monotonic() > job.deadline:
                return Failure(job.partition_id, TIMEOUT)
            time.sleep(POLL_S)
        return self._screened(job, replies[0])

    def _screened(self, job: Job, reply: Message) -> ClientUpdate | Failure:
        result = screen_train_reply(reply, job.partition_id, self.dim, self.codec)
        if isinstance(result, Failure):
            return result
        reported, expected = result.metrics.get("virtual_duration"), self.devices.compute_time(job.partition_id)
        if reported is None or not math.isclose(reported, expected, rel_tol=1e-9):
            return Failure(job.partition_id, f"reported virtual duration {reported} is not the "
                                             f"scheduled {expected:.6g} (work / speed)")
        return result

    def state_dict(self) -> dict:
        """The clock and the queued arrivals (their payloads are the in-flight jobs).

        The replies already in are kept with their jobs: a resume sends only the others
        again. (A resent message is trained with the other resent ones, where the first
        was trained with other messages; a stack of other clients trains to numbers that
        differ in the last bits, about 1e-8, so the kept replies keep a resume exact.)"""
        waiting = [job for job in self.queue.payloads()
                   if not job.lost and job.result is None and job.message_id is not None]
        if waiting:
            for reply in self.grid.pull_messages([job.message_id for job in waiting]):
                job = next(j for j in waiting if j.message_id == reply.metadata.reply_to_message_id)
                job.result = self._screened(job, reply)
        return {"now": self.clock.now(), "queue": self.queue}

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict`'s clock and queue."""
        self.clock = VirtualClock(state["now"])
        self.queue = state["queue"]


class WallArrivals:
    """Arrivals on the wall clock (deployment): replies in the order the grid hands them back.

    Wall-clock runs are not reproducible, so they are not checkpointed (``resumable`` is
    False).

    Parameters
    ----------
    grid : Grid
        Where TRAIN messages go.
    dim : int
        Length of a flat update.
    codec : Codec
        The uplink codec replies are decoded with.
    timeout_s : float
        Seconds a reply may take before the job counts as failed.
    clock : WallClock or None
        The clock (injectable for tests); a new one by default.
    """

    resumable = False

    def __init__(self, grid: Grid, dim: int, codec: Codec, timeout_s: float, clock: WallClock | None = None) -> None:
        self.grid = grid
        self.dim = dim
        self.codec = codec
        self.timeout_s = timeout_s
        self.clock = clock or WallClock()
        self._jobs: dict[str, Job] = {}
        self._done: list[tuple[float, Job, ClientUpdate | Failure]] = []

    def dispatch(self, batch: list[tuple[Job, Message]]) -> None:
        """Send the jobs' messages."""
        _push(self.grid, batch, self.timeout_s)
        for job, _ in batch:
            if job.message_id is None:
                self._done.append((self.clock.now(), job, Failure(job.partition_id, UNSENT)))
            else:
                self._jobs[job.message_id] = job

    def next_until(self, t: float) -> Arrival | None:
        """The next reply (or timeout) received by wall time ``t``, else None once ``t`` passes."""
        while not self._done:
            if self.clock.now() >= t:
                return None
            self._poll()
            if not self._done:
                time.sleep(POLL_S)
        if self._done[0][0] > t:
            return None
        received, job, result = self._done.pop(0)
        return Arrival(job, received, result)

    def _poll(self) -> None:
        """Collect the replies that are in, and the jobs past their deadline, stamped now."""
        now = self.clock.now()
        for message in self.grid.pull_messages(list(self._jobs)):
            job = self._jobs.pop(message.metadata.reply_to_message_id)
            self._done.append((now, job, screen_train_reply(message, job.partition_id, self.dim, self.codec)))
        expired = [m for m, job in self._jobs.items() if time.monotonic() > job.deadline]
        for message_id in expired:
            job = self._jobs.pop(message_id)
            self._done.append((now, job, Failure(job.partition_id, TIMEOUT)))

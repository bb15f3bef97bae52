"""Clocks and the arrival queue that drive the asynchronous server loops.

The asynchronous algorithms (FedFix, FedAsync, FedBuff) never read a clock themselves: the
server loop asks a :class:`Clock` for the time and processes client arrivals from an
:class:`EventQueue` in order of their finish time. In simulation the loop uses a
:class:`VirtualClock` (time jumps to each processed event, so results do not depend on the
host's load); in deployment it uses a :class:`WallClock`. Both share the same two methods.

A simulated loop looks like::

    clock, queue = VirtualClock(), EventQueue(seed=0)
    queue.schedule(clock.now(), duration, client_id, payload)   # dispatch
    event = queue.pop()                                         # next arrival
    clock.advance_to(event.time)
"""

import hashlib
import heapq
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol


class Clock(Protocol):
    """What a server loop needs from a clock: read the time, and move to a later time."""

    def now(self) -> float:
        """Current time in seconds (virtual or wall), counted from the clock's start."""
        ...

    def advance_to(self, t: float) -> None:
        """Move to time ``t``: a virtual clock jumps there, a wall clock waits until it."""
        ...


class VirtualClock:
    """Simulated time that only moves when the loop moves it.

    Parameters
    ----------
    start : float, default 0.0
        The time the clock shows before any event is processed.
    """

    def __init__(self, start: float = 0.0) -> None:
        if not math.isfinite(start):
            raise ValueError(f"VirtualClock start must be finite, got {start}")
        self._now = float(start)

    def now(self) -> float:
        """The current virtual time."""
        return self._now

    def advance_to(self, t: float) -> None:
        """Jump to virtual time ``t``; time never runs backwards (``t < now()`` raises)."""
        if not math.isfinite(t):
            raise ValueError(f"VirtualClock cannot advance to non-finite time {t}")
        if t < self._now:
            raise ValueError(f"VirtualClock cannot go back from {self._now} to {t}")
        self._now = float(t)


class WallClock:
    """Real elapsed time, from ``time.monotonic``, counted from when the clock was made.

    Parameters
    ----------
    monotonic : callable, default ``time.monotonic``
        Source of monotonic seconds (injectable for tests).
    sleep : callable, default ``time.sleep``
        Used by :meth:`advance_to` to wait (injectable for tests).
    """

    def __init__(
        self,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._monotonic = monotonic
        self._sleep = sleep
        self._start = monotonic()

    def now(self) -> float:
        """Seconds elapsed since the clock was created."""
        return self._monotonic() - self._start

    def advance_to(self, t: float) -> None:
        """Wait until ``now() >= t``; returns at once if that time has already passed."""
        remaining = t - self.now()
        while remaining > 0:
            self._sleep(remaining)
            remaining = t - self.now()


@dataclass(frozen=True, order=True)
class Event:
    """One client arrival: ``client_id`` finishes at ``time`` and hands back ``payload``.

    Events order by ``(time, tie_key, seq)``; ``client_id`` and ``payload`` take no part
    in the ordering.

    Attributes
    ----------
    time : float
        Virtual (or wall) time at which the client's result reaches the server.
    client_id : int
        Which client finished.
    payload : Any
        Whatever the loop attached at dispatch (base model version, the client's result...).
    tie_key : float
        Seeded pseudo-random key in [0, 1) that orders events with equal ``time``.
    seq : int
        Push counter of the queue, a last tie-break so ordering is always total.
    """

    time: float
    client_id: int = field(compare=False)
    payload: Any = field(compare=False)
    tie_key: float
    seq: int


class EventQueue:
    """Min-heap of client arrivals ordered by finish time, with seeded tie-breaking.

    Arrivals at exactly the same time are ordered by a tie key that is a deterministic
    pseudo-random function of ``(seed, client_id, n)``, n being how many events that client
    has pushed before. The order of equal times therefore depends on the seed only: not on
    the order in which the loop pushed them, nor on host timing. A different seed gives a
    (generally) different order of ties.

    Parameters
    ----------
    seed : int, default 0
        Seed of the tie-breaking keys.
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = int(seed)
        self._heap: list[Event] = []
        self._seq = 0
        self._pushes_per_client: dict[int, int] = {}
        self._last_popped = -math.inf

    def __len__(self) -> int:
        return len(self._heap)

    def payloads(self) -> list[Any]:
        """The queued events' payloads, in no particular order."""
        return [event.payload for event in self._heap]

    def _tie_key(self, client_id: int) -> float:
        n = self._pushes_per_client.get(client_id, 0)
        self._pushes_per_client[client_id] = n + 1
        digest = hashlib.blake2b(
            f"{self.seed}:{client_id}:{n}".encode(), digest_size=8
        ).digest()
        return int.from_bytes(digest, "big") / 2.0**64

    def push(self, time: float, client_id: int, payload: Any = None) -> Event:
        """Add the arrival of ``client_id`` at ``time`` and return its :class:`Event`.

        ``time`` must be finite and not earlier than the last popped event (an arrival
        cannot land in the past).
        """
        if time is None or not math.isfinite(time):
            raise ValueError(
                f"EventQueue.push: time must be a finite number, got {time!r} for client "
                f"{client_id}; use schedule() for clients that may drop out"
            )
        if time < self._last_popped:
            raise ValueError(
                f"EventQueue.push: time {time} for client {client_id} is before the last "
                f"processed event at {self._last_popped}"
            )
        event = Event(float(time), client_id, payload, self._tie_key(client_id), self._seq)
        self._seq += 1
        heapq.heappush(self._heap, event)
        return event

    def schedule(
        self, now: float, duration: float | None, client_id: int, payload: Any = None
    ) -> Event | None:
        """Push an arrival at ``now + duration``; a dropped-out client (``duration`` None)
        is not queued and ``None`` is returned, so it can never block the loop."""
        if duration is None:
            return None
        if duration < 0:
            raise ValueError(
                f"EventQueue.schedule: duration must be >= 0, got {duration} for client "
                f"{client_id}"
            )
        return self.push(now + duration, client_id, payload)

    def peek_time(self) -> float | None:
        """Time of the next arrival, or ``None`` when the queue is empty."""
        return self._heap[0].time if self._heap else None

    def pop(self) -> Event:
        """Remove and return the earliest arrival (``IndexError`` when empty)."""
        if not self._heap:
            raise IndexError("EventQueue.pop: the queue is empty")
        event = heapq.heappop(self._heap)
        self._last_popped = event.time
        return event

    def pop_until(self, t: float) -> list[Event]:
        """Remove and return, in order, every arrival with ``time <= t``."""
        events = []
        while self._heap and self._heap[0].time <= t:
            events.append(self.pop())
        return events

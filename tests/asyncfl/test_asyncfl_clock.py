"""Clocks and the arrival queue: ordering by virtual time, seeded ties, dropouts."""

import numpy as np
import pytest

from fedsim.loops.clock import EventQueue, VirtualClock, WallClock
from fedsim.sim.speeds import client_duration


def test_virtual_clock_moves_forward_only():
    clock = VirtualClock()
    assert clock.now() == 0.0
    clock.advance_to(2.5)
    clock.advance_to(2.5)
    assert clock.now() == 2.5
    with pytest.raises(ValueError, match="cannot go back"):
        clock.advance_to(1.0)


def test_wall_clock_reads_elapsed_time_and_waits_until_target():
    fake_time = [100.0]
    sleeps = []

    def sleep(seconds):
        sleeps.append(seconds)
        fake_time[0] += seconds

    clock = WallClock(monotonic=lambda: fake_time[0], sleep=sleep)
    fake_time[0] += 1.5
    assert clock.now() == pytest.approx(1.5)
    clock.advance_to(4.0)
    assert clock.now() == pytest.approx(4.0)
    assert sleeps == [pytest.approx(2.5)]
    clock.advance_to(3.0)
    assert sleeps == [pytest.approx(2.5)]


def test_queue_pops_arrivals_in_virtual_time_order():
    queue = EventQueue(seed=0)
    for client_id, t in enumerate([3.0, 1.0, 2.0, 0.5]):
        queue.push(t, client_id, payload=f"update-{client_id}")
    assert len(queue) == 4
    assert queue.peek_time() == 0.5
    events = [queue.pop() for _ in range(4)]
    assert [e.time for e in events] == [0.5, 1.0, 2.0, 3.0]
    assert [e.client_id for e in events] == [3, 1, 2, 0]
    assert events[0].payload == "update-3"
    assert queue.peek_time() is None
    with pytest.raises(IndexError, match="empty"):
        queue.pop()


def _tie_order(seed, client_ids):
    queue = EventQueue(seed=seed)
    for client_id in client_ids:
        queue.push(1.0, client_id)
    return [queue.pop().client_id for _ in client_ids]


def test_ties_are_ordered_by_seed_not_by_push_order():
    clients = list(range(12))
    order = _tie_order(7, clients)
    assert _tie_order(7, clients) == order
    assert _tie_order(7, clients[::-1]) == order
    assert order != clients
    orders = {tuple(_tie_order(seed, clients)) for seed in range(5)}
    assert len(orders) > 1


def test_pop_until_returns_everything_due_in_order():
    queue = EventQueue(seed=1)
    for client_id, t in enumerate([0.9, 0.2, 1.0, 1.7, 0.2]):
        queue.push(t, client_id)
    due = queue.pop_until(1.0)
    assert [e.time for e in due] == [0.2, 0.2, 0.9, 1.0]
    assert sorted(e.client_id for e in due[:2]) == [1, 4]
    assert len(queue) == 1 and queue.peek_time() == 1.7
    assert queue.pop_until(1.5) == []


def test_push_rejects_missing_and_past_times():
    queue = EventQueue()
    with pytest.raises(ValueError, match="finite"):
        queue.push(None, 0)
    with pytest.raises(ValueError, match="finite"):
        queue.push(float("nan"), 0)
    queue.push(2.0, 0)
    queue.pop()
    with pytest.raises(ValueError, match="before the last processed event"):
        queue.push(1.0, 1)


def test_dropped_out_client_never_enters_or_blocks_the_queue():
    queue = EventQueue(seed=0)
    assert queue.schedule(0.0, None, client_id=5) is None
    assert len(queue) == 0

    rng = np.random.default_rng(0)
    kept = []
    for client_id in range(200):
        duration = client_duration(1.0, 1.0 + client_id / 100, rng=rng, dropout=0.3)
        if queue.schedule(0.0, duration, client_id) is not None:
            kept.append(client_id)
    assert 100 < len(kept) < 180
    assert len(queue) == len(kept)
    arrived = queue.pop_until(10.0)
    assert sorted(e.client_id for e in arrived) == kept
    assert len(queue) == 0


def test_bad_clock_and_schedule_inputs_fail_clearly():
    with pytest.raises(ValueError, match="non-finite"):
        VirtualClock().advance_to(float("inf"))
    with pytest.raises(ValueError, match="duration must be >= 0"):
        EventQueue().schedule(1.0, -0.5, client_id=3)

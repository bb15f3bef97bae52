"""FedFix: ceil(tau / window) * p_i weights remove the bias towards fast clients."""

import math

import pytest
import torch

from fedsim.algorithms.fedfix import (
    FedFix,
    FedFixArrival,
    fedfix_aggregate,
    fedfix_weights,
)
from fedsim.loops.clock import EventQueue, VirtualClock
from fedsim.sim.speeds import client_duration, client_speeds


def _run_windowed(taus, p, window, num_windows, local_delta, aggregate, model):
    """FedFix-style loop on a virtual clock: every client starts at t = 0; at each
    aggregation time the arrivals of that window are aggregated and those clients restart
    from the new model. Returns the models after every window."""
    clock, queue = VirtualClock(), EventQueue(seed=0)
    for client_id, tau in enumerate(taus):
        queue.schedule(clock.now(), tau, client_id, payload=model)
    trajectory = []
    for k in range(1, num_windows + 1):
        t = k * window
        arrived = queue.pop_until(t)
        clock.advance_to(t)
        arrivals = [FedFixArrival(local_delta(e.client_id, e.payload), taus[e.client_id],
                                  p[e.client_id]) for e in arrived]
        model = aggregate(model, arrivals)
        for e in arrived:
            queue.schedule(clock.now(), taus[e.client_id], e.client_id, payload=model)
        trajectory.append(model)
    return trajectory


def _unweighted_async(eta_g):
    """Baseline: plain average of whatever arrived in the window."""
    def aggregate(model, arrivals):
        if not arrivals:
            return model
        return model + eta_g * torch.stack([a.delta for a in arrivals]).mean(dim=0)
    return aggregate


def test_fedfix_weights_hand_values():
    weights = fedfix_weights([0.375, 0.875, 1.25, 2.0], 0.5, [0.1, 0.2, 0.3, 0.4])
    torch.testing.assert_close(weights, torch.tensor([0.1, 0.4, 0.9, 1.6], dtype=torch.float64))
    # float noise: 1.1 / 0.1 = 11.000000000000002 still counts as 11 windows
    assert fedfix_weights([1.1], 0.1, [1.0]).item() == pytest.approx(11.0)
    with pytest.raises(ValueError, match="tau must be > 0"):
        fedfix_weights([0.0], 0.5, [1.0])


def test_fedfix_aggregate_is_unnormalised_weighted_sum():
    model = torch.tensor([1.0, 1.0])
    updates = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    new = fedfix_aggregate(model, updates, torch.tensor([0.5, 1.5]), eta_g=0.5)
    torch.testing.assert_close(new, torch.tensor([1.25, 2.5]))
    with pytest.raises(ValueError, match="weights of shape"):
        fedfix_aggregate(model, updates, torch.tensor([1.0]))


def test_average_update_equals_fedavg_and_unweighted_async_favours_fast_clients():
    # The FedFix setting: 8 clients, speeds spread linearly (fastest 80% faster),
    # window 0.2 of the slowest client's time, so clients need 3, 4 or 5 windows.
    num_clients, window = 8, 0.2
    taus = [client_duration(1.0, s) for s in client_speeds("linear", num_clients, seed=0)]
    p = [1.0 / num_clients] * num_clients  # equal shares: any bias comes from speed
    deltas = torch.eye(num_clients, dtype=torch.float64)  # client i moves coordinate i
    model0 = torch.zeros(num_clients, dtype=torch.float64)
    num_windows = 600  # a multiple of lcm(3, 4, 5): whole cycles for every client
    assert {math.ceil(tau / window) for tau in taus} == {3, 4, 5}

    fedfix = FedFix(window=window, eta_g=1.0)
    fixed = _run_windowed(taus, p, window, num_windows, lambda i, _: deltas[i],
                          fedfix.aggregate, model0)
    fedavg_update = torch.tensor(p, dtype=torch.float64) @ deltas
    torch.testing.assert_close(fixed[-1] / num_windows, fedavg_update, rtol=1e-9, atol=1e-12)

    plain = _run_windowed(taus, p, window, num_windows, lambda i, _: deltas[i],
                          _unweighted_async(1.0), model0)
    ratio = (plain[-1] / plain[-1].sum()) * num_clients  # weight received / fair weight
    fast = [i for i in range(num_clients) if math.ceil(taus[i] / window) == 3]
    slow = [i for i in range(num_clients) if math.ceil(taus[i] / window) == 5]
    assert float(ratio[fast].min()) > 1.2
    assert float(ratio[slow].max()) < 0.85


def test_fedfix_converges_to_fedavg_optimum_where_unweighted_async_is_biased():
    # Quadratic clients f_i(x) = 0.5 ||x - c_i||^2, 5 local GD steps of lr 0.1 from the
    # model the client started from: Delta_i = (1 - 0.9^5) (c_i - x_start).
    centres = torch.tensor([[0.0, 0.0], [1.0, 0.5], [2.0, 1.0], [3.0, 1.5]],
                           dtype=torch.float64)
    p = [0.1, 0.2, 0.3, 0.4]
    window, taus = 0.5, [0.375, 0.875, 1.25, 2.0]  # 1, 2, 3 and 4 windows per update
    gain = 1.0 - 0.9**5

    def local_delta(client_id, start_model):
        return gain * (centres[client_id] - start_model)

    model0 = torch.zeros(2, dtype=torch.float64)
    optimum = torch.tensor(p, dtype=torch.float64) @ centres  # FedAvg's fixed point
    # the residual distance to the optimum is a staleness effect of order eta_g
    fedfix = FedFix(window=window, eta_g=0.05)
    fixed = _run_windowed(taus, p, window, 1200, local_delta, fedfix.aggregate, model0)
    cycle_mean = torch.stack(fixed[-12:]).mean(dim=0)  # lcm(1, 2, 3, 4) = 12 windows
    assert float((cycle_mean - optimum).norm()) < 0.01
    assert fedfix.version == 1200

    plain = _run_windowed(taus, p, window, 1200, local_delta, _unweighted_async(0.05), model0)
    plain_mean = torch.stack(plain[-12:]).mean(dim=0)
    # per cycle the fastest client is averaged in with total weight 7.25 / 12, the others
    # 2.25, 1.58 and 0.92: the fixed point is pulled to the fast client's centre (0, 0)
    frequency_weighted = torch.tensor([7.25, 2.25, 19 / 12, 11 / 12],
                                      dtype=torch.float64) / 12 @ centres
    assert float((plain_mean - optimum).norm()) > 1.0
    assert float((plain_mean - frequency_weighted).norm()) < 0.05


def test_empty_window_leaves_model_and_version_unchanged():
    fedfix = FedFix(window=1.0)
    model = torch.ones(3)
    assert fedfix.aggregate(model, []) is model
    assert fedfix.version == 0
    with pytest.raises(ValueError, match="window must be > 0"):
        FedFix(window=0.0)

"""Server overhead of the virtual-clock asynchronous loop: FedBuff with many clients.

N clients (default 1,000) with lognormal speeds train "locally" on a flat D-dimensional
model (default D = 1,000); the server pops arrivals from the seeded event queue in virtual
time, buffers them in FedBuff (K = 10), flushes, and re-dispatches each finished client
from the current model. A client's local training is one cheap synthetic gradient step
on a quadratic (Delta = lr * (c_i - x_start)), timed apart, so the events-per-second
figure measures the server: queue pop/push, clock, FedBuff add/flush and dispatch
bookkeeping, for A arrivals (default 5,000).

Memory is measured in a second, untimed pass (tracemalloc slows every Python allocation):
- tracemalloc peak: Python-heap allocations made during the loop (events, heap, payloads,
  bookkeeping). PyTorch allocates tensor storage with its own CPU allocator, which
  tracemalloc does not see, so
- model-state bytes are counted exactly instead: the peak over the loop of the distinct
  global-model versions still referenced by in-flight clients plus the FedBuff buffer,
  times D * 4 bytes (float32).
- ru_maxrss: the process's peak resident set (includes the interpreter and torch).

Usage: python benchmarks/async_scale.py [--clients 1000] [--arrivals 5000]
       [--dims 1000 100000] [--buffer 10] [--repeats 5] [--seed 0] [--out PATH]
"""

import argparse
import json
import os
import resource
import statistics
import sys
import time
import tracemalloc
from collections import Counter
from pathlib import Path

import torch

from fedsim.algorithms.fedbuff import FedBuff
from fedsim.bench import environment
from fedsim.loops.clock import EventQueue, VirtualClock
from fedsim.sim.speeds import client_duration, client_speeds

WORK = 10.0  # local steps per update, in speed units
LOCAL_LR = 0.1


def run_loop(clients: int, arrivals: int, dim: int, buffer: int, seed: int,
             track_memory: bool = False) -> dict:
    """One FedBuff run; returns timings (and model-state bytes when ``track_memory``)."""
    generator = torch.Generator().manual_seed(seed)
    template = torch.randn(dim, generator=generator)
    scales = torch.rand(clients, generator=generator).tolist()  # c_i = a_i * template
    speeds = client_speeds("lognormal", clients, seed=seed, sigma=0.5).tolist()

    clock, queue, server = VirtualClock(), EventQueue(seed=seed), FedBuff(buffer, eta_g=1.0)
    model = torch.zeros(dim)
    in_flight: Counter[int] = Counter()
    peak_versions = peak_state_bytes = 0
    for client_id in range(clients):
        queue.schedule(clock.now(), client_duration(WORK, speeds[client_id]), client_id,
                       (server.version, model))
    in_flight[0] = clients

    t_queue = t_aggregate = t_client = 0.0
    stalenesses = []
    for _ in range(arrivals):
        t0 = time.perf_counter()
        event = queue.pop()
        clock.advance_to(event.time)
        base_version, base_model = event.payload
        t1 = time.perf_counter()
        delta = LOCAL_LR * (scales[event.client_id] * template - base_model)  # client work
        t2 = time.perf_counter()
        stalenesses.append(server.add(delta, base_version))
        if server.is_full:
            model = server.flush(model)
        t3 = time.perf_counter()
        queue.schedule(clock.now(), client_duration(WORK, speeds[event.client_id]),
                       event.client_id, (server.version, model))
        t4 = time.perf_counter()
        t_queue += (t1 - t0) + (t4 - t3)
        t_client += t2 - t1
        t_aggregate += t3 - t2
        if track_memory:
            in_flight[base_version] -= 1
            if not in_flight[base_version]:
                del in_flight[base_version]
            in_flight[server.version] += 1
            peak_versions = max(peak_versions, len(in_flight))
            state = (len(in_flight) + len(server) + 1) * dim * 4  # +1: the current model
            peak_state_bytes = max(peak_state_bytes, state)

    server_s = t_queue + t_aggregate
    return {
        "server_s": server_s, "queue_s": t_queue, "aggregate_s": t_aggregate,
        "client_compute_s": t_client, "events_per_s": arrivals / server_s,
        "server_us_per_event": 1e6 * server_s / arrivals,
        "virtual_time": clock.now(), "flushes": server.version,
        "mean_staleness": statistics.fmean(stalenesses), "max_staleness": max(stalenesses),
        "peak_inflight_versions": peak_versions, "peak_model_state_bytes": peak_state_bytes,
    }


def measure(clients: int, arrivals: int, dim: int, buffer: int, seed: int,
            repeats: int) -> dict:
    """Median-of-``repeats`` timings, then one tracemalloc pass for memory."""
    runs = [run_loop(clients, arrivals, dim, buffer, seed) for _ in range(repeats)]
    timed = min(runs, key=lambda r: r["server_s"])
    result = {key: timed[key] for key in ("virtual_time", "flushes", "mean_staleness",
                                          "max_staleness")}
    for key in ("server_s", "queue_s", "aggregate_s", "client_compute_s"):
        result[key] = statistics.median(r[key] for r in runs)
    result["events_per_s"] = arrivals / result["server_s"]
    result["events_per_s_best"] = timed["events_per_s"]
    result["server_us_per_event"] = 1e6 * result["server_s"] / arrivals

    tracemalloc.start()
    memory = run_loop(clients, arrivals, dim, buffer, seed, track_memory=True)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    result["tracemalloc_peak_bytes"] = peak
    result["peak_inflight_versions"] = memory["peak_inflight_versions"]
    result["peak_model_state_bytes"] = memory["peak_model_state_bytes"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--arrivals", type=int, default=5000)
    parser.add_argument("--dims", type=int, nargs="+", default=[1000, 100000])
    parser.add_argument("--buffer", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/async_scale.json")
    args = parser.parse_args()
    torch.set_num_threads(1)

    results = {dim: measure(args.clients, args.arrivals, dim, args.buffer, args.seed,
                            args.repeats) for dim in args.dims}
    maxrss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    print(f"\nFedBuff (K={args.buffer}) on a virtual clock: {args.clients} clients, "
          f"{args.arrivals} arrivals, median of {args.repeats} runs")
    header = (f"{'D':>8}{'events/s':>11}{'us/event':>10}{'queue s':>9}{'aggr s':>8}"
              f"{'client s':>10}{'tracemalloc MiB':>17}{'model MiB':>11}{'staleness':>11}")
    print(header)
    for dim, r in results.items():
        print(f"{dim:>8}{r['events_per_s']:>11.0f}{r['server_us_per_event']:>10.1f}"
              f"{r['queue_s']:>9.3f}{r['aggregate_s']:>8.3f}{r['client_compute_s']:>10.3f}"
              f"{r['tracemalloc_peak_bytes'] / 2**20:>17.2f}"
              f"{r['peak_model_state_bytes'] / 2**20:>11.2f}{r['mean_staleness']:>11.1f}")
    print(f"process peak RSS: {maxrss_kib / 1024:.0f} MiB")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": "python " + " ".join(sys.argv),
        "environment": environment(),
        "torch_threads": torch.get_num_threads(),
        "config": {"clients": args.clients, "arrivals": args.arrivals, "dims": args.dims,
                   "buffer_size": args.buffer, "repeats": args.repeats, "seed": args.seed,
                   "speeds": "lognormal sigma=0.5", "work": WORK, "dtype": "float32"},
        "results": {str(dim): r for dim, r in results.items()},
        "process_peak_rss_bytes": maxrss_kib * 1024,
        "load_average_1m": os.getloadavg()[0],
        "notes": [
            "events_per_s = arrivals / server time; server time = queue pop/push + clock + "
            "FedBuff add/flush + dispatch, client compute (one synthetic gradient step) "
            "excluded and reported as client_compute_s",
            "tracemalloc_peak_bytes: Python-heap peak during one untimed pass; tensor "
            "storage is not visible to tracemalloc (PyTorch's own CPU allocator)",
            "peak_model_state_bytes: (distinct model versions held by in-flight clients + "
            "buffered deltas + current model) * D * 4, peak over the loop",
            "process_peak_rss_bytes: whole process (interpreter, torch, all runs)",
            "host shared with other jobs: timings are indicative",
        ],
    }, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""Time and peak memory of fedsim's aggregators, with FedAvg's weighted mean as the unit.

Usage::

    python benchmarks/aggregators.py            # N = 50 clients, D = 1e6 float32 (full size)
    python benchmarks/aggregators.py --quick    # N = 20, D = 1e5, for a smoke run
    python benchmarks/aggregators.py --device cuda
    python benchmarks/aggregators.py --threads 0  # torch's default thread count

Aggregators: ``mean`` (FedAvg, example-weighted), ``median`` (coordinate median),
``trimmed_mean`` (beta = 0.1), ``krum`` and ``multi_krum`` (f = 20% of N, m = N - f),
``flag`` (r = 8, lam = 0), ``fedld`` (keep = 0.8, the D coordinates split into 8 "layers" of
fixed shares, see ``LAYER_SHARES``) and ``fedau`` (weights from one observed round, then the
aggregate). Targets: median, trimmed mean, flag and fedld <= 20x the mean's time, fedau ~1x.

How the numbers are measured
----------------------------
Each aggregator runs in its own fresh subprocess, so allocator caches and earlier peaks of
other aggregators cannot leak into its numbers. In that process:

1. the input ``(N, D)`` float32 matrix is created (seeded) and the aggregator is run once on a
   tiny input, so lazily loaded libraries (LAPACK, ...) are resident before the baseline;
2. CPU: the baseline is ``ru_maxrss`` (the process's peak resident set so far); the
   aggregator runs once on the full input and the *extra peak* is the new ``ru_maxrss`` minus
   the baseline. This is an honest high-water mark of everything the call touched
   (temporaries included), at page granularity, not an allocator-level estimate.
   CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the
   memory allocated before the call;
3. the aggregator then runs ``--repeats`` more times; the table reports the median wall time
   (``perf_counter``, with ``torch.cuda.synchronize`` on CUDA) and its ratio to the mean's.

Threads: by default each worker runs with ``torch.set_num_threads(1)``. On a small machine
shared with other jobs (fedsim's development machines have 2 cores), a multi-threaded
BLAS/OpenMP region stalls whenever one of its threads is descheduled, and single runs then
vary by 100x; one thread gives reproducible ratios, all aggregators on the same footing.
``--threads 0`` keeps torch's default.

The extra peak includes the ``(D,)`` output (4 MB at D = 1e6), so the mean's own extra peak is
about one output vector. On a machine shared with other jobs, times are noisy; the JSON keeps
the minimum as well as the median.

The results go to ``benchmarks/results/aggregators.json`` (with the command, the torch
version and the machine) and a table is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from fedsim.algorithms.fedau import FedAUWeights, fedau_aggregate
from fedsim.algorithms.fedld import fedld_aggregate
from fedsim.algorithms.flag import flag_aggregate
from fedsim.algorithms.krum import krum, multi_krum
from fedsim.algorithms.median import coordinate_median
from fedsim.algorithms.trimmed_mean import trimmed_mean
from fedsim.strategies.aggregate import weighted_mean

AGGREGATORS = ["mean", "median", "trimmed_mean", "krum", "multi_krum", "flag", "fedld", "fedau"]
TARGETS = {"median": 20.0, "trimmed_mean": 20.0, "flag": 20.0, "fedld": 20.0, "fedau": 1.5}
"""Largest acceptable time ratio to the mean (fedau "~1x" is checked as <= 1.5x)."""

LAYER_SHARES = [0.0005, 0.0001, 0.02, 0.0002, 0.3, 0.001, 0.6, 0.0782]
"""Shares of D given to the 8 pseudo-layers of the FedLD run (conv/bias/linear-like sizes)."""

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "aggregators.json"


def _make_aggregator(name: str, updates: torch.Tensor) -> Callable[[], object]:
    """A zero-argument call running aggregator ``name`` on ``updates`` (setup excluded)."""
    n, d = updates.shape
    num_examples = torch.arange(1, n + 1, dtype=torch.float32) * 10
    num_byzantine = n // 5
    if name == "mean":
        return lambda: weighted_mean(updates, num_examples)
    if name == "median":
        return lambda: coordinate_median(updates)
    if name == "trimmed_mean":
        return lambda: trimmed_mean(updates, beta=0.1)
    if name == "krum":
        return lambda: krum(updates, num_byzantine)
    if name == "multi_krum":
        return lambda: multi_krum(updates, num_byzantine, m=n - num_byzantine)
    if name == "flag":
        return lambda: flag_aggregate(updates, r=8)
    if name == "fedld":
        bounds = [0]
        for share in LAYER_SHARES[:-1]:
            bounds.append(min(d, bounds[-1] + max(1, round(share * d))))
        bounds.append(d)
        layers = [updates[:, a:b] for a, b in zip(bounds, bounds[1:]) if b > a]
        return lambda: fedld_aggregate(layers, num_examples, keep=0.8)
    if name == "fedau":
        fedau = FedAUWeights(num_clients=2 * n, K=50)
        state = {"round": 0}

        def run() -> torch.Tensor:
            state["round"] += 1
            weights = fedau.observe(state["round"], range(n))
            return fedau_aggregate(updates, list(weights.values()), num_clients=2 * n)

        return run
    raise ValueError(f"unknown aggregator {name!r}; known: {', '.join(AGGREGATORS)}")


def _worker(name: str, n: int, d: int, repeats: int, device: str, threads: int) -> dict:
    """Measure one aggregator in this (fresh) process."""
    if threads > 0:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    gen = torch.Generator(device=dev).manual_seed(0)
    updates = torch.randn(n, d, generator=gen, device=dev)
    tiny = torch.randn(n, 64, generator=gen, device=dev)
    _make_aggregator(name, tiny)()
    run = _make_aggregator(name, updates)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        run()
        sync()
        peak_extra = torch.cuda.max_memory_allocated(dev) - before
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        run()
        peak_extra = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - start)
    return {"times_s": times, "peak_extra_bytes": int(peak_extra)}


def _machine(device: str, threads: int) -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": threads if threads > 0 else torch.get_num_threads(),
        "load_average_1_5_15": list(os.getloadavg()),
        "python": platform.python_version(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (N=20, D=1e5)")
    parser.add_argument("--num-clients", type=int, default=None, help="N (default 50, quick 20)")
    parser.add_argument("--dim", type=int, default=None, help="D (default 1e6, quick 1e5)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs after the warm-up run")
    parser.add_argument("--device", default="cpu", help="torch device of the updates")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per worker (0: torch's default)")
    parser.add_argument("--only", nargs="*", default=None, choices=AGGREGATORS, help="subset to run")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON result file")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    n = args.num_clients or (20 if args.quick else 50)
    d = args.dim or (100_000 if args.quick else 1_000_000)

    if args.worker is not None:
        print(json.dumps(_worker(args.worker, n, d, args.repeats, args.device, args.threads)))
        return

    names = args.only or AGGREGATORS
    if "mean" not in names:
        names = ["mean", *names]
    measured = {}
    for name in names:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--num-clients", str(n),
               "--dim", str(d), "--repeats", str(args.repeats), "--device", args.device,
               "--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        measured[name] = json.loads(proc.stdout.strip().splitlines()[-1])

    unit_time = statistics.median(measured["mean"]["times_s"])
    unit_mem = max(measured["mean"]["peak_extra_bytes"], 1)
    results = {}
    for name, m in measured.items():
        median_t = statistics.median(m["times_s"])
        results[name] = {
            "time_s_median": median_t,
            "time_s_min": min(m["times_s"]),
            "time_ratio_vs_mean": median_t / unit_time,
            "peak_extra_mib": m["peak_extra_bytes"] / 2**20,
            "peak_ratio_vs_mean": m["peak_extra_bytes"] / unit_mem,
            "times_s": m["times_s"],
        }
    targets = {name: {"max_time_ratio": limit, "time_ratio": results[name]["time_ratio_vs_mean"],
                      "met": results[name]["time_ratio_vs_mean"] <= limit}
               for name, limit in TARGETS.items() if name in results}

    header = f"{'aggregator':<13}{'median s':>10}{'x mean':>9}{'peak MiB':>11}{'x mean':>9}"
    lines = [f"N={n} D={d} float32 device={args.device} threads={args.threads or torch.get_num_threads()} "
             f"torch {torch.__version__}", header, "-" * len(header)]
    for name, r in results.items():
        lines.append(f"{name:<13}{r['time_s_median']:>10.4f}{r['time_ratio_vs_mean']:>9.2f}"
                     f"{r['peak_extra_mib']:>11.1f}{r['peak_ratio_vs_mean']:>9.1f}")
    for name, t in targets.items():
        lines.append(f"target {name}: {t['time_ratio']:.2f}x <= {t['max_time_ratio']:g}x: "
                     f"{'met' if t['met'] else 'MISSED'}")
    print("\n".join(lines))

    args.output.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "torch_version": torch.__version__,
        "machine": _machine(args.device, args.threads),
        "device": args.device,
        "num_clients": n,
        "dim": d,
        "dtype": "float32",
        "repeats": args.repeats,
        "unit": "mean (FedAvg weighted mean)",
        "results": results,
        "targets": targets,
    }
    args.output.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Federations of 10,000 to 1,000,000 clients: start-up, seconds per round, peak memory.

Work: Synthetic(1, 1) with one device per client (``partition.scheme: natural``), each device
generated when its client is sampled (``data.synthetic.on_demand``), the MLP, 100 clients
sampled per round, 1 local epoch, 3 rounds, centralised evaluation every round on a test
sample of 10,000 held-out rows (``eval.test_samples``), no federated evaluation. Engines: the
``batched`` backend, and Flower's simulation engine on Ray with grouped nodes
(``sim.clients_per_node``: the clients split over as many Flower nodes as the machine has CPUs).

Each run is a fresh subprocess (``--worker``); this process samples the memory of that
process and of all its descendants (Ray's GCS, raylet and workers are among them) every
0.2 s, from ``/proc``:

- ``peak_total_rss_gib``: the largest sum of the processes' resident set sizes. Pages that
  processes share (Ray's object store, memory-mapped data files, shared libraries) count
  once per process that maps them;
- ``peak_total_pss_gib``: the same with proportional set sizes, shared pages divided among
  the processes sharing them: the memory the run really holds.

``startup_s`` is the time from the start of the subprocess to the end of round 1 minus one
round's time (imports, the devices' sizes, the test sample, Ray and its workers starting);
``per_round_s`` is the mean time of rounds 2 and 3. Targets (issue 24): 1,000,000 clients
with start-up <= 60 s and peak total RSS <= 8 GiB, seconds per round within 1.5x of the
10,000-client run's (same engine).

Usage: python benchmarks/scale.py [--clients 10000 100000 1000000] [--backends batched ray]
[--out benchmarks/results/scale.json]; the rows ``--out`` holds from earlier invocations are kept
(rows can be measured one at a time; ``--note`` records how the machine was shared).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROUNDS = 3
SAMPLED = 100
TEST_SAMPLES = 10_000
TARGET_GIB, TARGET_STARTUP_S, TARGET_ROUND_RATIO = 8.0, 60.0, 1.5


def make_config(clients: int, backend: str, out_dir: str):
    from fedsim.config import validate_config

    sim = {"backend": backend}
    if backend == "ray":
        sim["clients_per_node"] = -(-clients // (os.cpu_count() or 1))
    return validate_config({
        "name": f"scale-{clients}-{backend}", "seed": 0, "rounds": ROUNDS,
        "data": {"name": "synthetic"}, "partition": {"scheme": "natural", "num_clients": clients},
        "client": {"local_epochs": 1, "lr": 0.05}, "strategy": {"name": "fedavg", "fraction_train": SAMPLED / clients},
        "eval": {"federated": False, "test_samples": TEST_SAMPLES}, "sim": sim,
        "output": {"dir": out_dir, "plots": False, "checkpoint_every": 1000},
    })


def worker(clients: int, backend: str, out_dir: str) -> dict:
    """Run one configuration; report its timings (memory is sampled by the parent)."""
    import torch

    from fedsim.outputs.results import RunDir
    from fedsim.runner import run_experiment

    torch.set_num_threads(1)
    path, summary = run_experiment(make_config(clients, backend, out_dir))
    t_end = time.time()
    rows = RunDir.open(path).rows()
    ends = [t_end - rows[-1]["wall_time_s"] + r["wall_time_s"] for r in rows]
    per_round = (ends[-1] - ends[0]) / (len(ends) - 1)
    return {"round_1_end": ends[0], "per_round_s": per_round, "status": summary["status"],
            "final_accuracy": summary["final_accuracy"], "sampled_per_round": rows[-1]["num_sampled"]}


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    return tree


def _kib(path: str, field: str) -> int:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def sample_memory(pid: int, stop: threading.Event, peaks: dict) -> None:
    while not stop.is_set():
        tree = _descendants(pid)
        rss = sum(_kib(f"/proc/{p}/status", "VmRSS:") for p in tree)
        pss = sum(_kib(f"/proc/{p}/smaps_rollup", "Pss:") for p in tree)
        peaks["rss_kib"], peaks["pss_kib"] = max(peaks["rss_kib"], rss), max(peaks["pss_kib"], pss)
        peaks["processes"] = max(peaks["processes"], len(tree))
        stop.wait(0.2)


def measure(clients: int, backend: str, out_dir: str) -> dict:
    command = [sys.executable, __file__, "--worker", str(clients), backend, "--out-dir", out_dir]
    started = time.time()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    peaks, stop = {"rss_kib": 0, "pss_kib": 0, "processes": 0}, threading.Event()
    sampler = threading.Thread(target=sample_memory, args=(child.pid, stop, peaks), daemon=True)
    sampler.start()
    output, _ = child.communicate()
    stop.set()
    sampler.join()
    if child.returncode != 0:
        return {"error": f"exit {child.returncode}"}
    result = json.loads(output.strip().splitlines()[-1])
    result["startup_s"] = result.pop("round_1_end") - result["per_round_s"] - started
    result.update(peak_total_rss_gib=peaks["rss_kib"] / 2**20, peak_total_pss_gib=peaks["pss_kib"] / 2**20,
                  peak_processes=peaks["processes"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--backends", nargs="+", default=["batched", "ray"])
    parser.add_argument("--out", default="benchmarks/results/scale.json")
    parser.add_argument("--out-dir", default="/tmp/fedsim-scale")
    parser.add_argument("--note", default="", help="how the machine was shared while measuring")
    parser.add_argument("--worker", nargs=2, metavar=("CLIENTS", "BACKEND"))
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(int(args.worker[0]), args.worker[1], args.out_dir)))
        return
    from fedsim.bench import environment

    out = Path(args.out)
    previous = json.loads(out.read_text()) if out.exists() else {}
    results = {name: row for name, row in previous.get("results", {}).items()
               if previous.get("sampled_per_round") == SAMPLED}
    for n in args.clients:
        for b in args.backends:
            results[f"{n} clients, {b}"] = measure(n, b, args.out_dir)
            print(json.dumps({f"{n} clients, {b}": results[f"{n} clients, {b}"]}), flush=True)
    print(f"\nSynthetic(1,1), one device per client, {SAMPLED} sampled per round, {ROUNDS} rounds")
    print(f"{'run':<26}{'start-up s':>12}{'per round s':>13}{'peak RSS GiB':>14}{'peak PSS GiB':>14}{'accuracy':>10}")
    for name, r in results.items():
        if "error" in r:
            print(f"{name:<26}{r['error']:>12}")
            continue
        print(f"{name:<26}{r['startup_s']:>12.1f}{r['per_round_s']:>13.3f}{r['peak_total_rss_gib']:>14.2f}"
              f"{r['peak_total_pss_gib']:>14.2f}{r['final_accuracy']:>10.3f}")
    checks = {}
    for name, r in results.items():
        clients, backend = name.split(" clients, ")
        base = results.get(f"10000 clients, {backend}", {})
        if clients == "1000000" and "error" not in r:
            checks[name] = {"rss_within_8_gib": r["peak_total_rss_gib"] <= TARGET_GIB,
                            "startup_within_60_s": r["startup_s"] <= TARGET_STARTUP_S}
            if "per_round_s" in base:
                ratio = r["per_round_s"] / base["per_round_s"]
                checks[name].update(per_round_vs_10000=round(ratio, 2),
                                    per_round_within_1_5x=ratio <= TARGET_ROUND_RATIO)
            print(f"target {name}: " + ", ".join(f"{k} {v}" for k, v in checks[name].items()))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": "python benchmarks/scale.py " + " ".join(sys.argv[1:]), "environment": environment(),
        "machine_note": args.note or previous.get("machine_note", ""),
        "rounds": ROUNDS, "sampled_per_round": SAMPLED, "test_samples": TEST_SAMPLES, "results": results,
        "targets": checks,
    }, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

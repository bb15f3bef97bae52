"""Secure aggregation's cost against the number of clients and the dropout rate.

One round of SecAgg+ (:func:`fedsim.secagg.protocol.run_round`: every party's step in one
process, one thread) on the quickstart MLP's update size (D = 9,610 coordinates, 20-bit
inputs), for each number of clients, dropout rate and graph: the complete graph (SecAgg,
Bonawitz et al. 2017) and SecAgg+'s Harary graph of degree ``2 ceil(log2 n)`` (Bell et al.
2020), threshold 0.5. The dropped clients (a seeded random ``dropout`` share) share their
keys and then send nothing; the server recovers them.

Reported per setting: the round's seconds (all clients and the server, sequentially: a
deployment runs the clients in parallel), the bytes a surviving client uploads over the
four message rounds and their ratio to the float32 update it replaces, the bytes the server
relays to it (keys, shares, dropout lists; the model it downloads as without SecAgg comes
on top), the message rounds,
and whether the masked sum equals the plain modular sum of the same inputs (always, or the
round was refused for too few surviving neighbours). Times are the median of ``--repeats``.

Writes ``benchmarks/results/secagg.json`` and ``secagg.md`` (with the command, versions and
machine).

Usage: python benchmarks/secagg.py [--clients 10 50 100 200] [--dropout 0 0.1 0.3] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from fedsim.bench import environment
from fedsim.secagg.protocol import run_round

RESULTS = Path(__file__).resolve().parent / "results"
DIM = 64 * 128 + 128 + 128 * 10 + 10  # the quickstart MLP (digits, hidden [128])
BITS = 20


def secagg_plus_degree(n: int) -> int:
    return min(2 * math.ceil(math.log2(n)), n - 1 - (n - 1) % 2)


def measure(n: int, dropout: float, degree: int | None, repeats: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    dropped = sorted(rng.choice(n, size=round(dropout * n), replace=False).tolist())
    inputs = {u: rng.integers(0, 2**BITS, size=DIM, dtype=np.uint32) for u in range(n) if u not in dropped}
    seconds, outcome = [], None
    for r in range(repeats):
        start = time.perf_counter()
        outcome = run_round(inputs, dropped, degree=degree, threshold=0.5, material=r.to_bytes(32, "little"))
        seconds.append(time.perf_counter() - start)
    survivors = sorted(inputs)
    per_client = float(np.mean([outcome.bytes_up[u] for u in survivors]))
    relayed = float(np.mean([outcome.bytes_down[u] for u in survivors]))
    exact = outcome.total is not None and np.array_equal(outcome.total, np.sum(list(inputs.values()), axis=0,
                                                                               dtype=np.uint32))
    return {"clients": n, "dropout": dropout, "dropped": len(dropped), "graph": "complete" if degree is None else
            f"harary k={degree}", "seconds": statistics.median(seconds), "seconds_all": seconds,
            "bytes_per_client": round(per_client), "bytes_down_per_client": round(relayed), "vs_float32": per_client / (4 * DIM),
            "message_rounds": outcome.message_rounds, "refused": outcome.refused, "sum_exact": exact}


def table(rows: list[dict]) -> str:
    lines = ["| clients | dropout | graph | seconds per round | bytes up per client | x float32 update "
             "| bytes relayed to a client | message rounds | outcome |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        outcome = "sum bit-exact" if r["sum_exact"] else f"refused: {r['refused']}"
        lines.append(f"| {r['clients']} | {r['dropout']:g} ({r['dropped']}) | {r['graph']} | {r['seconds']:.2f} | "
                     f"{r['bytes_per_client']:,} | {r['vs_float32']:.3f} | {r['bytes_down_per_client']:,} | "
                     f"{r['message_rounds']} | {outcome} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 50, 100, 200])
    parser.add_argument("--dropout", type=float, nargs="+", default=[0.0, 0.1, 0.3])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for n in args.clients:
        for dropout in args.dropout:
            for degree in (None, secagg_plus_degree(n)):
                if degree is not None and degree >= n - 1:
                    continue  # SecAgg+'s graph is the complete one
                rows.append(measure(n, dropout, degree, args.repeats))
                print(table(rows[-1:]).splitlines()[-1], flush=True)
    command = "python " + " ".join(["benchmarks/secagg.py", *sys.argv[1:]])
    result = {"command": command, "environment": environment(), "dim": DIM, "bits": BITS, "threshold": 0.5,
              "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "secagg.json").write_text(json.dumps(result, indent=1) + "\n")
    env = ", ".join(f"{k} {v}" for k, v in result["environment"].items())
    (args.out / "secagg.md").write_text(
        f"# SecAgg+ cost vs clients and dropout\n\n`{command}`\n\n{env}\n\nD = {DIM} coordinates (quickstart MLP), "
        f"{BITS}-bit inputs, threshold 0.5; seconds: every party of one round in one process, one thread "
        f"(median of {args.repeats}).\n\n{table(rows)}\n")
    print(table(rows))


if __name__ == "__main__":
    main()

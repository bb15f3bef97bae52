"""DP-SGD's cost in the batched engine: one round of K stacked clients with per-sample
clipping and noise (``privacy.mechanism: sample``) against the same round without.

Work: :func:`fedsim.clients.batched.train_stacked` itself, on K clients of 20 samples of 64
features (digits' shape) and 10 classes each, the MLP with 64 hidden units (D = 4,810), batch
10, 2 local steps (2 batches each), plain SGD. The private round computes each sample's
gradient norm and the clipped sum by ghost clipping (the MLP is Linear layers only,
:mod:`fedsim.privacy.ghost_clipping`) and draws the AES-256-CTR noise of every client's step;
the plain round runs one batched backward pass. Each timing is the median of ``--repeats``
rounds after one warm-up round of each, plain and private rounds alternating (a machine whose
load changes slows both alike), in one process with one torch thread; the load average
before and after is recorded. Target (issue 25): private / plain <= 3 at 1,000 clients.

Usage: python benchmarks/dp_sgd_cost.py [--clients 100 1000] [--repeats 5]
       [--out benchmarks/results/dp_sgd_cost.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from fedsim.clients.batched import MAX_STACKED_VALUES, train_stacked
from fedsim.clients.objective import ClientObjective
from fedsim.config import ClientConfig
from fedsim.data import ArrayDataset
from fedsim.losses.cross_entropy import CrossEntropyLoss
from fedsim.models.registry import build_model
from fedsim.privacy.dp_sgd import DPSGDStep

SAMPLES, FEATURES, CLASSES, HIDDEN, BATCH, STEPS = 20, 64, 10, 64, 10, 2
TARGET_RATIO = 3.0


def one_round(clients: int, private: bool, model, datasets) -> float:
    start = {n: torch.stack([p.detach()] * clients) for n, p in model.named_parameters()}
    hooks = (DPSGDStep(1.0, 1.0, BATCH, [(0, "bench", k) for k in range(clients)], MAX_STACKED_VALUES),) if private else ()
    objective = ClientObjective(CrossEntropyLoss(reduction="none"), hooks=hooks)
    generators = [torch.Generator().manual_seed(k) for k in range(clients)]
    cfg = ClientConfig(local_steps=STEPS, batch_size=BATCH, lr=0.1)
    started = time.perf_counter()
    train_stacked(model, start, datasets, generators, cfg, objective, torch.device("cpu"))
    return time.perf_counter() - started


def measure(clients: int, repeats: int) -> dict:
    torch.manual_seed(0)
    model = build_model("mlp", (FEATURES,), CLASSES, hidden=(HIDDEN,))
    rng = np.random.default_rng(0)
    datasets = [ArrayDataset(rng.normal(size=(SAMPLES, FEATURES)).astype(np.float32),
                             rng.integers(0, CLASSES, SAMPLES).astype(np.int64), CLASSES, "bench")
                for _ in range(clients)]
    result = {"clients": clients}
    times: dict[bool, list[float]] = {False: [], True: []}
    for private in (False, True):
        one_round(clients, private, model, datasets)  # warm-up
    for _ in range(repeats):
        for private in (False, True):
            times[private].append(one_round(clients, private, model, datasets))
    result["plain_s"], result["private_s"] = statistics.median(times[False]), statistics.median(times[True])
    result["ratio"] = result["private_s"] / result["plain_s"]
    result["meets_target"] = result["ratio"] <= TARGET_RATIO
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/dp_sgd_cost.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_before = list(os.getloadavg())
    rows = [measure(k, args.repeats) for k in args.clients]
    out = {"benchmark": "dp_sgd_cost", "command": " ".join([Path(sys.executable).name, *sys.argv]),
           "target_ratio": TARGET_RATIO,
           "work": {"samples_per_client": SAMPLES, "features": FEATURES, "classes": CLASSES, "hidden": HIDDEN,
                    "batch_size": BATCH, "local_steps": STEPS, "repeats": args.repeats},
           "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "threads": 1,
                    "load_average_1_5_15_before": load_before, "load_average_1_5_15_after": list(os.getloadavg())},
           "results": rows}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    for row in rows:
        print(f"{row['clients']:>6} clients: plain {row['plain_s']:.3f} s, DP-SGD {row['private_s']:.3f} s, "
              f"ratio {row['ratio']:.2f}")


if __name__ == "__main__":
    main()

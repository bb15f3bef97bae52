"""Deployed-round overhead: fedsim's quickstart on a SuperLink + 3 SuperNodes on loopback,
beside a minimal Flower app deployed the same way (the anchor).

Both apps run on the same loopback deployment (``fedsim.loopback``: ``flower-superlink``,
its state in memory, and three SuperNodes on 127.0.0.1) and do the same work per round:
every node trains the quickstart's MLP for 5 local epochs on its Dirichlet(0.5) partition
of digits, every node evaluates the new global model on its test split, and the server
evaluates it on the held-out test set. The anchor (``benchmarks/deploy_anchor``) is written
as Flower's examples are (``FedAvg.start``) and reads fedsim's partitions from .npz files,
so the difference is fedsim's own cost. Three deployments are measured (``DEPLOYMENTS``):

- ``fedsim supernode`` (Flower's SuperNode asking for a message every 0.5 s,
  :mod:`fedsim.supernode`) with ``--isolation process`` beside a long-lived
  ``fedsim clientapp`` process that runs all its messages (the anchor's too);
- ``flower-supernode`` (asking every 3 s) beside ``fedsim clientapp``;
- ``flower-supernode`` as Flower ships it: a new ``flwr-clientapp`` process per message
  (its SuperExec polling every 0.1 s instead of 1 s).

A round of either app is two messages per node (train, then evaluate). A SuperNode asks
for the next message right after pushing a reply, before the server can have sent it, and
then waits its poll interval. With a long-lived ClientApp process, fedsim also runs the
quickstart with ``eval.federated=false`` (one message per round).

Seconds per round are measured from the end of round 1 to the end of round R (round 1
also waits for the nodes and builds fedsim's partition cache). The apps alternate,
``--repeats`` times each; the median is reported. Beside the rounds, what a message costs
in a fresh process (as with a process per message) is measured: Flower's ClientApp process start,
importing each app, and fedsim's worker state (data + model) with and without the
partition cache. Writes JSON to benchmarks/results/deploy_overhead.json.

Usage: python benchmarks/deploy_overhead.py [--rounds 6] [--repeats 2] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tomli_w

from fedsim.bench import environment
from fedsim.config import load_config
from fedsim.deploy import flwr_connection
from fedsim.loopback import LoopbackDeployment
from fedsim.outputs.results import RunDir
from fedsim.sim.components import federated_data

ROOT = Path(__file__).resolve().parents[1]
ANCHOR = ROOT / "benchmarks" / "deploy_anchor"
NUM_NODES = 3
TARGET_RATIO, TARGET_SECONDS = 1.2, 10.0
TRAIN_ONLY = "fedsim, train only"  # the quickstart with eval.federated=false: one message per round
# how the SuperNodes run (LoopbackDeployment's arguments): fedsim's deployment first, then
# Flower's SuperNode beside fedsim's ClientApp process, then Flower's SuperNode as shipped
DEPLOYMENTS = {
    "fedsim supernode + fedsim clientapp": {"supernode": "fedsim", "isolation": "process"},
    "flower-supernode + fedsim clientapp": {"supernode": "flower", "isolation": "process"},
    "flower-supernode, a process per message": {"supernode": "flower", "isolation": "subprocess"},
}


def quickstart(rounds: int):
    return load_config(ROOT / "configs" / "quickstart.yaml", [f"partition.num_clients={NUM_NODES}",
                                                              f"rounds={rounds}", "output.plots=false"])


def write_anchor_data(cfg, folder: Path) -> None:
    """fedsim's partitions of the config as the anchor reads them (one .npz per node)."""
    data = federated_data(cfg)
    for pid in range(NUM_NODES):
        train, test = data.client(pid)
        np.savez(folder / f"client-{pid}.npz", train_x=train.x, train_y=train.y, test_x=test.x, test_y=test.y)
    np.savez(folder / "server.npz", test_x=data.test.x, test_y=data.test.y)


def per_round(round_ends: list[float]) -> float:
    return (round_ends[-1] - round_ends[0]) / (len(round_ends) - 1)


def run_anchor(dep: LoopbackDeployment, cfg, work: Path) -> dict:
    stamps = work / f"anchor-{time.monotonic_ns()}.txt"
    run_config = work / "anchor-run-config.toml"
    run_config.write_text(tomli_w.dumps({"data-dir": str(work), "stamps": str(stamps), "num-rounds": cfg.rounds,
                                         "num-nodes": NUM_NODES, "local-epochs": cfg.client.local_epochs,
                                         "batch-size": cfg.client.batch_size, "lr": cfg.client.lr,
                                         "momentum": cfg.client.momentum}))
    t0 = time.time()
    with flwr_connection(dep.address) as (flwr, env, connection):
        result = subprocess.run([flwr, "run", str(ANCHOR), connection, "--run-config", str(run_config), "--stream"],
                                env=env, capture_output=True, text=True, timeout=1200, check=False)
    lines = [line.split() for line in stamps.read_text().splitlines()] if stamps.exists() else []
    ends = [float(t) for r, t, _ in lines if int(r) >= 1]
    if result.returncode != 0 or len(ends) != cfg.rounds:
        raise RuntimeError(f"the anchor run failed: {result.stdout[-2000:]}{result.stderr[-2000:]}")
    return {"per_round_s": per_round(ends), "total_s": time.time() - t0, "final_accuracy": float(lines[-1][2])}


def run_fedsim(dep: LoopbackDeployment, cfg, work: Path, extra: tuple[str, ...] = ()) -> dict:
    out = work / f"fedsim-{time.monotonic_ns()}"
    t0 = time.time()
    result = dep.deploy(ROOT / "configs" / "quickstart.yaml",
                        [f"partition.num_clients={NUM_NODES}", f"rounds={cfg.rounds}", "output.plots=false", *extra],
                        out, timeout=1200)
    if result.returncode != 0:
        raise RuntimeError(f"the fedsim run failed: {result.stdout[-2000:]}{result.stderr[-2000:]}")
    [path] = list(out.iterdir())
    rows = RunDir.open(path).rows()
    return {"per_round_s": per_round([r["wall_time_s"] for r in rows]), "total_s": time.time() - t0,
            "final_accuracy": rows[-1]["centralised_accuracy"]}


def seconds_in_fresh_process(code: str, env: dict | None = None, repeats: int = 3) -> float:
    """Median wall time of ``python -c code`` (interpreter start included)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, env=env)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def message_costs(cfg, cache_dir: Path) -> dict:
    """What one message costs a deployed node, each part in a fresh process."""
    flower = "import flwr.supernode.cli.flwr_clientapp"
    worker = ("import json, sys; from fedsim.config import ExperimentConfig; from fedsim.data import cache; "
              "from fedsim.sim.client_app import worker; {enable}"
              "worker(ExperimentConfig.model_validate_json(sys.argv[1]).model_dump_json())")
    cfg_json = cfg.model_dump_json()

    def timed(code: str) -> float:
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", code, cfg_json], check=True)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    base = seconds_in_fresh_process("pass")
    costs = {
        "python_start_s": base,
        "flower_clientapp_process_s": seconds_in_fresh_process(flower) - base,
        "anchor_app_import_s": seconds_in_fresh_process(f"{flower}; import torch, numpy, anchor_app",
                                                        env={"PYTHONPATH": str(ANCHOR)}) -
        seconds_in_fresh_process(flower),
        "fedsim_app_import_s": seconds_in_fresh_process(
            f"{flower}; import fedsim.deploy; from fedsim.sim.client_app import build_client_app") -
        seconds_in_fresh_process(flower),
    }
    import_only = timed("import json, sys; from fedsim.config import ExperimentConfig; from fedsim.data import cache; "
                        "from fedsim.sim.client_app import worker")
    costs["fedsim_worker_without_cache_s"] = timed(worker.format(enable="")) - import_only
    timed(worker.format(enable=f"cache.enable({str(cache_dir)!r}); "))  # fills the cache
    costs["fedsim_worker_from_cache_s"] = timed(worker.format(enable=f"cache.enable({str(cache_dir)!r}); ")) - \
        import_only
    return costs


def import_profile() -> dict:
    """``python -X importtime`` totals and peak memory of what a ClientApp process imports:
    the app's module, then the client side it builds on the first message."""
    profile = {}
    for name, code in (("fedsim.deploy", "import fedsim.deploy"),
                       ("fedsim.deploy + client", "import fedsim.deploy; from fedsim.sim.client_app import worker")):
        result = subprocess.run([sys.executable, "-X", "importtime", "-c",
                                 f"{code}; import resource; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"],
                                capture_output=True, text=True, check=True)
        top = [t for t in (li.split("|") for li in result.stderr.splitlines() if li.startswith("import time:"))
               if t[1].strip().isdigit()]  # the first line is the header
        profile[name] = {"import_s": sum(int(t[1]) for t in top if not t[2].startswith("  ")) / 1e6,
                         "peak_rss_mb": int(result.stdout.split()[-1]) / 1024}
    return profile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/deploy_overhead.json")
    args = parser.parse_args()
    cfg = quickstart(args.rounds)
    apps = {"plain Flower app": run_anchor, "fedsim": run_fedsim,
            TRAIN_ONLY: lambda dep, cfg, work: run_fedsim(dep, cfg, work, ("eval.federated=false",))}
    measured = {name: [app for app in apps if kw["isolation"] == "process" or app != TRAIN_ONLY]
                for name, kw in DEPLOYMENTS.items()}
    runs: dict[tuple[str, str], list[dict]] = {(d, a): [] for d in DEPLOYMENTS for a in measured[d]}
    with tempfile.TemporaryDirectory(prefix="fedsim-deploy-bench-") as tmp:
        work = Path(tmp, "work")
        work.mkdir()
        write_anchor_data(cfg, work)
        imports, costs = import_profile(), message_costs(cfg, Path(tmp, "cache"))
        for i, (name, kw) in enumerate(DEPLOYMENTS.items()):
            home = Path(tmp, f"deployment-{i}")
            home.mkdir()
            with LoopbackDeployment(home, NUM_NODES, **kw) as dep:
                for repeat in range(args.repeats):
                    for app in measured[name]:
                        runs[name, app].append(apps[app](dep, cfg, work))
                        print(f"{name}: {app} run {repeat + 1}: {runs[name, app][-1]['per_round_s']:.2f} s per round",
                              flush=True)
    results = {name: {app: {"per_round_s": statistics.median(r["per_round_s"] for r in runs[name, app]),
                            "per_round_s_runs": [r["per_round_s"] for r in runs[name, app]],
                            "total_s_runs": [r["total_s"] for r in runs[name, app]],
                            "final_accuracy": runs[name, app][-1]["final_accuracy"]}
                      for app in measured[name]} for name in DEPLOYMENTS}
    ratios = {name: results[name]["fedsim"]["per_round_s"] / results[name]["plain Flower app"]["per_round_s"]
              for name in DEPLOYMENTS}
    print(f"\nquickstart on {NUM_NODES} SuperNodes (loopback), {args.rounds} rounds, {args.repeats} runs each")
    print(f"{'deployment':<44}{'app':<20}{'s per round':>13}{'runs':>16}{'final acc':>11}")
    for name in DEPLOYMENTS:
        for app, r in results[name].items():
            per_runs = ", ".join(f"{s:.2f}" for s in r["per_round_s_runs"])
            print(f"{name:<44}{app:<20}{r['per_round_s']:>13.2f}{per_runs:>16}{r['final_accuracy']:>11.4f}")
    for name in DEPLOYMENTS:
        print(f"{name}: fedsim / plain Flower app per-round time {ratios[name]:.2f} (target <= {TARGET_RATIO}); "
              f"fedsim {results[name]['fedsim']['per_round_s']:.2f} s per round (target <= {TARGET_SECONDS:.0f} s)")
    for name, profile in imports.items():
        print(f"import {name}: {profile['import_s']:.2f} s, peak {profile['peak_rss_mb']:.0f} MB")
    print("what one message costs a node in a fresh process (s):")
    for name, value in costs.items():
        print(f"  {name:<32}{value:>8.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": f"python benchmarks/deploy_overhead.py --rounds {args.rounds} --repeats {args.repeats}",
        "environment": environment(), "nodes": NUM_NODES, "rounds": args.rounds, "deployments": DEPLOYMENTS,
        "results": results,
        "fedsim_over_flower": ratios, "targets": {"ratio": TARGET_RATIO, "seconds_per_round": TARGET_SECONDS},
        "met": {name: {"ratio": ratios[name] <= TARGET_RATIO,
                       "seconds": results[name]["fedsim"]["per_round_s"] <= TARGET_SECONDS} for name in DEPLOYMENTS},
        "imports": imports, "message_costs": costs}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

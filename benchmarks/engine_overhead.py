"""Engine overhead: the same federated work done six ways, at 20, 100 and 1,000 clients.

1. the leanest honest plain PyTorch loop over clients (no framework, one torch thread): each
   client's tensors made once and indexed directly (no DataLoader), a seeded permutation
   per epoch cut into batches, cross-entropy, torch's optimizer, FedAvg as a running sum of
   parameters: the floor;
2. fedsim, ``sim.backend: inprocess`` (clients one after another in the driver);
3. fedsim, ``sim.backend: batched`` (each round's clients trained together, stacked);
4. fedsim on Flower's simulation engine (Ray), one client per Flower node;
5. fedsim on Ray with grouped nodes: ``sim.clients_per_node`` = clients / CPUs, so each
   of the machine's workers serves one node;
6. a minimal Flower app written the way Flower's quickstart examples do (ClientApp with
   @app.train, message-based FedAvg, ``strategy.start``), one client per node.

Work: every client trains 1 local epoch of the MLP each round, FedAvg, centralised
evaluation after each round, no federated evaluation. 20 and 100 clients: digits,
Dirichlet(0.5) over the clients, 10 rounds. 1,000 clients: digits has too few samples, so
Synthetic(1, 1) with one device per client, 3 rounds. The per-round time is measured inside
each run from the end of round 1 to the end of the last round (so the first round, which
under Flower also starts Ray's workers, is excluded from all alike); the rest of the wall
time ("fixed": start-up, round 1, teardown) is reported apart. Ratios are to the plain
loop's per-round time. The driver uses one torch thread, as each simulated client does.
With ``--repeat N`` every engine runs N times, the engines taking turns, and each keeps
its median run (the machine is shared with other jobs: a spell of load then falls on all
engines alike, not on one). Writes JSON to benchmarks/results/engine_overhead.json and a
bar chart beside it (.png).

Targets (the scale-engine issue), at 100 clients: batched <= 1.0x the plain loop per round
and >= 10x faster than the plain Flower app; Ray with grouped nodes <= 2x the plain loop.

Usage: python benchmarks/engine_overhead.py [--clients 20 100 1000] [--engines NAME ...] [--repeat N] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation

from fedsim.bench import environment
from fedsim.clients.train import build_optimizer, evaluate, train_local
from fedsim.config import validate_config
from fedsim.outputs.results import RunDir
from fedsim.runner import run_experiment
from fedsim.sim.components import build_objective, federated_data, make_model


def make_config(clients: int, out_dir: str):
    small = clients <= 100
    return validate_config({
        "name": "engine-overhead", "seed": 0, "rounds": 10 if small else 3,
        "data": {"name": "digits" if small else "synthetic"},
        "partition": {"num_clients": clients, "scheme": "dirichlet", "alpha": 0.5, "min_size": 2} if small
        else {"num_clients": clients, "scheme": "natural"},
        "client": {"local_epochs": 1, "lr": 0.1},
        "eval": {"federated": False},
        "strategy": {"name": "fedavg"},
        "output": {"dir": out_dir, "plots": False, "checkpoint_every": 1000},
    })


def plain_loop(cfg) -> dict:
    """FedAvg as the leanest honest for-loop over clients: no Flower, no Ray, no DataLoader."""
    t0 = time.perf_counter()
    data = federated_data(cfg)
    model = make_model(cfg.model, data, cfg.seed)
    clients = [(torch.from_numpy(train.x), torch.from_numpy(train.y))
               for train in (data.client(pid)[0] for pid in range(cfg.partition.num_clients))]
    test_x, test_y = torch.from_numpy(data.test.x), torch.from_numpy(data.test.y)
    params = list(model.parameters())
    stamps = []
    for rnd in range(1, cfg.rounds + 1):
        start = [p.detach().clone() for p in params]
        total, summed = 0, [torch.zeros_like(p) for p in params]
        for pid, (x, y) in enumerate(clients):
            with torch.no_grad():
                for p, s in zip(params, start, strict=True):
                    p.copy_(s)
            optimizer = build_optimizer(params, cfg.client)
            gen = torch.Generator().manual_seed(rnd * 1000 + pid)
            for _ in range(cfg.client.local_epochs):
                order = torch.randperm(len(y), generator=gen)
                for first in range(0, len(y), cfg.client.batch_size):
                    rows = order[first : first + cfg.client.batch_size]
                    loss = torch.nn.functional.cross_entropy(model(x[rows]), y[rows])
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
            with torch.no_grad():
                for acc, p in zip(summed, params, strict=True):
                    acc.add_(p, alpha=len(y))
            total += len(y)
        with torch.no_grad():
            for p, acc in zip(params, summed, strict=True):
                p.copy_(acc / total)
            accuracy = (model(test_x).argmax(1) == test_y).double().mean().item()
        stamps.append(time.perf_counter())
    return _timing(t0, stamps, accuracy)


def minimal_flower(cfg) -> dict:
    """A Flower app as in Flower's quickstart examples: FedAvg.start over a ClientApp."""
    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        data = federated_data(cfg)
        train_set, _ = data.client(pid)
        model = make_model(cfg.model, data, cfg.seed)
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        gen = torch.Generator().manual_seed(int(msg.content["config"]["server-round"]) * 1000 + pid)
        res = train_local(model, train_set, cfg.client, build_objective(cfg, len(train_set.y)), gen,
                          torch.device("cpu"))
        content = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                              "metrics": MetricRecord({"train_loss": res.loss, "num-examples": res.num_examples})})
        return Message(content=content, reply_to=msg)

    stamps: list[float] = []
    accuracy: list[float] = []
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        data = federated_data(cfg)
        model = make_model(cfg.model, data, cfg.seed)

        def central(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            model.load_state_dict(arrays.to_torch_state_dict())
            res = evaluate(model, data.test, torch.device("cpu"))
            stamps.append(time.perf_counter())
            accuracy.append(res.accuracy)
            return MetricRecord({"accuracy": res.accuracy})

        strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0,
                          min_available_nodes=cfg.partition.num_clients)
        strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=cfg.rounds,
                       evaluate_fn=central)

    t0 = time.perf_counter()
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=cfg.partition.num_clients,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"logging_level": logging.ERROR}})
    # stamps[0] is the evaluation of the initial model, before round 1
    return _timing(t0, stamps[1:], accuracy[-1])


def fedsim_run(cfg, **sim) -> dict:
    cfg = cfg.model_copy(update={"sim": cfg.sim.model_copy(update=sim)})
    t0 = time.perf_counter()
    path, summary = run_experiment(cfg)
    t_end = time.perf_counter()
    rows = RunDir.open(path).rows()
    # wall_time_s of a row is the time since the round loop started: end-of-round stamps
    stamps = [t_end - rows[-1]["wall_time_s"] + r["wall_time_s"] for r in rows]
    return _timing(t0, stamps, summary["final_accuracy"])


def _timing(t0: float, round_ends: list[float], accuracy: float) -> dict:
    """Per-round time over rounds 2..R from end-of-round stamps; start-up is the rest."""
    per_round = (round_ends[-1] - round_ends[0]) / (len(round_ends) - 1)
    total = round_ends[-1] - t0
    return {"startup_s": total - per_round * len(round_ends), "per_round_s": per_round,
            "final_accuracy": accuracy}


def _median_run(done: list[dict]) -> dict:
    """The run of median per-round time among ``done`` (the lower middle one of an even
    count), with every run's per-round time beside it."""
    ordered = sorted(done, key=lambda r: r["per_round_s"])
    return {**ordered[(len(ordered) - 1) // 2], "per_round_s_runs": [r["per_round_s"] for r in done]}


def measure(clients: int, out_dir: str, engines: list[str] | None = None, repeat: int = 1) -> dict:
    cfg = make_config(clients, out_dir)
    grouped = -(-clients // (os.cpu_count() or 1))
    runs = {
        "plain loop": lambda: plain_loop(cfg),
        "fedsim inprocess": lambda: fedsim_run(cfg, backend="inprocess"),
        "fedsim batched": lambda: fedsim_run(cfg, backend="batched"),
        "fedsim ray": lambda: fedsim_run(cfg, backend="ray"),
        "fedsim ray, grouped nodes": lambda: fedsim_run(cfg, backend="ray", clients_per_node=grouped),
        "plain Flower app": lambda: minimal_flower(cfg),
    }
    chosen = [name for name in runs if engines is None or name in engines or name == "plain loop"]
    measured: dict[str, list[dict]] = {name: [] for name in chosen}
    for _ in range(repeat):  # interleaved, so a spell of load on the shared machine hits every engine alike
        for name in chosen:
            measured[name].append(runs[name]())
    results = {name: _median_run(done) for name, done in measured.items()}
    base = results["plain loop"]["per_round_s"]
    for r in results.values():
        r["ratio_to_plain_loop"] = r["per_round_s"] / base
    if "fedsim ray, grouped nodes" in results:
        results["fedsim ray, grouped nodes"]["clients_per_node"] = grouped
    return {"data": cfg.data.name, "rounds": cfg.rounds, "repeat": repeat, "engines": results}


def plot(sizes: dict[int, dict], path: Path) -> None:
    """Seconds per round of every engine (log scale), one group of bars per client count."""
    from matplotlib.figure import Figure

    names = list(next(iter(sizes.values()))["engines"])
    fig = Figure(figsize=(8, 3.8), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(sizes))]
        ax.bar(xs, [size["engines"][name]["per_round_s"] for size in sizes.values()], width, label=name)
    ax.set_xticks(range(len(sizes)), [f"{n} clients" for n in sizes])
    ax.set_yscale("log")
    ax.set_ylabel("seconds per round")
    ax.set_title("Engine overhead: the same FedAvg round six ways")
    ax.legend(fontsize=8, ncols=2)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[20, 100, 1000])
    parser.add_argument("--out", default="benchmarks/results/engine_overhead.json")
    parser.add_argument("--out-dir", default="/tmp/fedsim-engine-overhead")
    parser.add_argument("--engines", nargs="+", help="only these engines (and the plain loop, the baseline)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="measure every engine this many times, interleaved, and keep each one's median run")
    args = parser.parse_args()
    logging.getLogger("flwr").setLevel(logging.WARNING)
    torch.set_num_threads(1)
    sizes = {n: measure(n, args.out_dir, args.engines, args.repeat) for n in args.clients}
    print(f"\n{'clients':>8}  {'engine':<27}{'fixed s':>9}{'per round s':>13}{'x plain loop':>14}{'final acc':>11}")
    for n, size in sizes.items():
        for name, r in size["engines"].items():
            print(f"{n:>8}  {name:<27}{r['startup_s']:>9.2f}{r['per_round_s']:>13.3f}{r['ratio_to_plain_loop']:>14.2f}"
                  f"{r['final_accuracy']:>11.4f}")
    targets = {}
    if 100 in sizes and args.engines is None:
        engines = sizes[100]["engines"]
        targets = {
            "batched <= 1.0x plain loop": engines["fedsim batched"]["ratio_to_plain_loop"] <= 1.0,
            "batched >= 10x faster than plain Flower app":
                engines["plain Flower app"]["per_round_s"] >= 10 * engines["fedsim batched"]["per_round_s"],
            "ray grouped nodes <= 2x plain loop": engines["fedsim ray, grouped nodes"]["ratio_to_plain_loop"] <= 2.0,
        }
        for claim, held in targets.items():
            print(f"target at 100 clients: {claim}: {'HOLDS' if held else 'DOES NOT HOLD'}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(sizes, out.with_suffix(".png"))
    out.write_text(json.dumps({
        "command": "python benchmarks/engine_overhead.py " + " ".join(sys.argv[1:]),
        "environment": environment(), "sizes": {str(n): s for n, s in sizes.items()}, "targets_at_100": targets,
    }, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""Deployed secure aggregation's cost: the quickstart on a SuperLink + SuperNodes on
loopback, with and without ``secagg.enabled`` (the baseline, in the same deployment).

One deployment (``fedsim.loopback``: ``flower-superlink``, ``fedsim supernode`` +
``fedsim clientapp`` per node on 127.0.0.1) runs the quickstart with federated evaluation off
(one training message per node and round without secure aggregation; the training message
and three protocol messages with it), the two configs alternating, ``--repeats`` times
each. Seconds per round are measured from the end of round 1 to the end of round R (round 1
also waits for the nodes and builds the partition cache); the median is reported, with the
bytes a client uploads per round and the final accuracy. Writes JSON to
benchmarks/results/deploy_secagg.json.

Usage: python benchmarks/deploy_secagg.py [--nodes 4] [--rounds 4] [--repeats 2] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from fedsim.bench import environment
from fedsim.loopback import LoopbackDeployment
from fedsim.outputs.results import RunDir

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"plain": [], "secagg": ["secagg.enabled=true"]}


def run(dep: LoopbackDeployment, overrides: list[str], out: Path) -> dict:
    result = dep.deploy(ROOT / "configs" / "quickstart.yaml", overrides, out, timeout=1200)
    if result.returncode != 0:
        raise RuntimeError(f"the fedsim run failed: {result.stdout[-2000:]}{result.stderr[-2000:]}")
    [path] = list(out.iterdir())
    rows = RunDir.open(path).rows()
    ends = [r["wall_time_s"] for r in rows]
    return {"per_round_s": (ends[-1] - ends[0]) / (len(ends) - 1),
            "bytes_up_per_client": statistics.mean(r["bytes_up"] / r["num_success"] for r in rows),
            "final_accuracy": rows[-1]["centralised_accuracy"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/deploy_secagg.json")
    args = parser.parse_args()
    common = [f"partition.num_clients={args.nodes}", f"rounds={args.rounds}", "eval.federated=false",
              "output.plots=false"]
    runs: dict[str, list[dict]] = {name: [] for name in CONFIGS}
    with tempfile.TemporaryDirectory(prefix="fedsim-deploy-secagg-") as tmp, \
            LoopbackDeployment(Path(tmp, "home"), args.nodes) as dep:
        dep.cache_partitions(ROOT / "configs" / "quickstart.yaml", common)
        for repeat in range(args.repeats):
            for name, extra in CONFIGS.items():
                runs[name].append(run(dep, [*common, *extra], Path(tmp, f"{name}-{repeat}")))
                print(f"{name} run {repeat + 1}: {runs[name][-1]['per_round_s']:.2f} s per round", flush=True)
    results = {name: {"per_round_s": statistics.median(r["per_round_s"] for r in rs),
                      "per_round_s_runs": [r["per_round_s"] for r in rs],
                      "bytes_up_per_client": rs[-1]["bytes_up_per_client"],
                      "final_accuracy": rs[-1]["final_accuracy"]} for name, rs in runs.items()}
    ratio = {key: results["secagg"][key] / results["plain"][key] for key in ("per_round_s", "bytes_up_per_client")}
    print(f"\nquickstart on {args.nodes} SuperNodes (loopback), {args.rounds} rounds, {args.repeats} runs each")
    print(f"{'config':<10}{'s per round':>13}{'runs':>18}{'bytes up per client':>22}{'final acc':>11}")
    for name, r in results.items():
        per_runs = ", ".join(f"{s:.2f}" for s in r["per_round_s_runs"])
        print(f"{name:<10}{r['per_round_s']:>13.2f}{per_runs:>18}{r['bytes_up_per_client']:>22.0f}"
              f"{r['final_accuracy']:>11.4f}")
    print(f"secagg / plain: {ratio['per_round_s']:.2f}x the seconds per round, "
          f"{ratio['bytes_up_per_client']:.3f}x the bytes a client uploads")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": f"python benchmarks/deploy_secagg.py --nodes {args.nodes} --rounds {args.rounds} "
                   f"--repeats {args.repeats}",
        "environment": environment(), "nodes": args.nodes, "rounds": args.rounds, "results": results,
        "secagg_over_plain": ratio}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""``fedsim bench SPEC.yaml``: a grid of runs (configs x variants x axes x seeds), one table.

A spec names the experiment, the base config(s), the variants to compare (each a list of
``--set`` overrides with a label), optional axes crossed with every variant, and the
seeds. Each cell is run once per seed; the table shows mean ± std of the final
centralised accuracy, rounds to the target accuracy and wall time. Results go to
``<out>/<name>.md`` (with the command, versions and machine that produced them),
``<out>/<name>.json`` and ``<out>/<name>.png``.
"""

from __future__ import annotations

import itertools
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from fedsim.config import ConfigError, load_config
from fedsim.sim.plots import plot_comparison
from fedsim.sim.results import RunDir


class Variant(BaseModel):
    """One compared setting: a label and its overrides."""

    model_config = ConfigDict(extra="forbid")
    label: str
    set: list[str] = Field(default_factory=list)


class BenchSpec(BaseModel):
    """A benchmark grid."""

    model_config = ConfigDict(extra="forbid")
    name: str
    configs: list[str]
    variants: list[Variant] = Field(default_factory=lambda: [Variant(label="base")])
    axes: dict[str, list[Any]] = Field(default_factory=dict)
    seeds: list[int] = Field(default_factory=lambda: [0])
    common: list[str] = Field(default_factory=list, description="overrides applied to every run")
    target_accuracy: float = 0.9
    out: str = "benchmarks/results"
    claim: str | None = Field(None, description="the paper's claim this grid checks")

    @classmethod
    def load(cls, path: str | Path) -> BenchSpec:
        try:
            return cls.model_validate(yaml.safe_load(Path(path).read_text()))
        except (OSError, yaml.YAMLError, ValueError) as exc:
            raise ConfigError(f"{path}: {exc}") from None


def cells(spec: BenchSpec, base_dir: Path) -> list[tuple[str, Path, list[str]]]:
    """Every (label, config path, overrides) of the grid, without seeds."""
    names = list(spec.axes)
    out = []
    for config in spec.configs:
        path = Path(config) if Path(config).is_file() else base_dir / config
        for variant in spec.variants:
            for values in itertools.product(*(spec.axes[n] for n in names)):
                axis_sets = [f"{n}={v}" for n, v in zip(names, values, strict=True)]
                label = " ".join([variant.label, *(f"{n.split('.')[-1]}={v}" for n, v in zip(names, values, strict=True))])
                if len(spec.configs) > 1:
                    label = f"{path.stem}: {label}"
                out.append((label, path, [*spec.common, *variant.set, *axis_sets]))
    return out


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def environment() -> dict[str, str]:
    """Versions and machine, recorded beside every benchmark result."""
    import flwr
    import torch

    from fedsim import __version__

    return {"fedsim": __version__, "torch": torch.__version__, "flwr": flwr.__version__,
            "python": platform.python_version(), "machine": f"{platform.machine()} {platform.system()}",
            "cpus": str(__import__("os").cpu_count()), "date": time.strftime("%Y-%m-%d")}


def run_bench(spec_path: str | Path, runs_dir: str | None = None, run_fn=None) -> Path:
    """Run the grid of ``spec_path``; return the markdown table's path."""
    from fedsim.sim.runner import run_experiment

    run_fn = run_fn or run_experiment
    spec = BenchSpec.load(spec_path)
    base_dir = Path(spec_path).parent
    configs = []
    for label, path, sets in cells(spec, base_dir):
        for seed in spec.seeds:
            overrides = [*sets, f"seed={seed}", f"output.target_accuracy={spec.target_accuracy}", "output.plots=false"]
            if runs_dir:
                overrides.append(f"output.dir={runs_dir}")
            configs.append((label, seed, load_config(path, overrides)))  # all validated before any run
    results: dict[str, list[dict[str, Any]]] = {}
    curves: dict[str, list[dict[str, Any]]] = {}
    for label, seed, cfg in configs:
        run_path, summary = run_fn(cfg)
        results.setdefault(label, []).append({"seed": seed, "run": str(run_path), **summary})
        curves.setdefault(label, RunDir.open(run_path).rows())
    return write_bench(spec, results, curves)


def write_bench(spec: BenchSpec, results: dict[str, list[dict[str, Any]]],
                curves: dict[str, list[dict[str, Any]]]) -> Path:
    """Write the markdown table, JSON and plot of a finished grid."""
    out = Path(spec.out)
    out.mkdir(parents=True, exist_ok=True)
    env = environment()
    lines = [f"# {spec.name}", "",
             f"Command: `fedsim bench {' '.join(sys.argv[2:]) or spec.name}`  ",
             "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), ""]
    if spec.claim:
        lines += [f"Claim checked: {spec.claim}", ""]
    lines += [f"| setting | final accuracy | rounds to {spec.target_accuracy:.2f} | wall time (s) | seeds |",
              "|---|---|---|---|---|"]
    table = []
    for label, runs in results.items():
        finals = [r["final_accuracy"] for r in runs if r.get("final_accuracy") is not None]
        reached = [r["rounds_to_target"] for r in runs if r.get("rounds_to_target") is not None]
        rtt = f"{statistics.mean(reached):.1f} ({len(reached)}/{len(runs)} reached)" if reached else f"never (0/{len(runs)})"
        walls = [r["wall_time_s"] for r in runs]
        lines.append(f"| {label} | {_mean_std(finals)} | {rtt} | {statistics.mean(walls):.1f} | {len(runs)} |")
        table.append({"setting": label, "final_accuracy_mean": statistics.mean(finals) if finals else None,
                      "final_accuracy_std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
                      "rounds_to_target_mean": statistics.mean(reached) if reached else None,
                      "reached": len(reached), "runs": runs})
    md = out / f"{spec.name}.md"
    md.write_text("\n".join(lines) + "\n")
    (out / f"{spec.name}.json").write_text(json.dumps(
        {"spec": spec.model_dump(), "environment": env, "table": table}, indent=2))
    plot_comparison(curves, out / f"{spec.name}.png")
    return md

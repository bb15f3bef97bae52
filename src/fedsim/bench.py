"""``fedsim bench SPEC.yaml``: a grid of runs (configs x variants x axes x seeds), one table.

A spec names the experiment, the base config(s), the variants to compare (each a list of
``--set`` overrides with a label), optional axes crossed with every variant, and the
seeds. Each cell is run once per seed; the table shows mean ± std of the final
centralised accuracy, rounds to the target accuracy and wall time. Results go to
``<out>/<name>.md`` (with the command, versions and machine that produced them),
``<out>/<name>.json`` and ``<out>/<name>.png`` (the curve of each setting's first seed),
plus the ``figures:`` the spec asks for (seed means, per axis cell or per layer).
``checks:`` state the claims of the papers as comparisons of two settings; each table ends
with whether each claim held, computed from the numbers, never written by hand.
"""

from __future__ import annotations

import itertools
import math
import json
import multiprocessing
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from fedsim.config import ConfigError, load_config
from fedsim.sim.plots import plot_comparison
from fedsim.sim.results import RunDir


class Variant(BaseModel):
    """One compared setting: a label and its overrides."""

    model_config = ConfigDict(extra="forbid")
    label: str = Field(pattern=r"^[^|]+$", description="no '|': labels are markdown table cells")
    set: list[str] = Field(default_factory=list)


class Check(BaseModel):
    """A claim checked on the results: ``setting`` beats ``baseline`` on ``metric`` by ``by``.

    For a metric where lower is better (rounds or time to target, bytes) set
    ``lower_is_better``. ``by`` is a difference (negative allows a loss: ``by: -0.005`` is
    "setting >= baseline - 0.005"); ``ratio`` instead asks for a factor: "setting >= ratio x
    baseline", or with ``lower_is_better`` "setting <= baseline / ratio" (``ratio: 4`` on
    bytes is "4x fewer bytes"). Without a ``baseline``, ``value`` is the bar: "setting >= value
    + by" (or <= with ``lower_is_better``). The verdict is computed from the means over all
    seeds, so the table says whether the claim held; a seed that never reached a target
    counts as never (a ``*_to_target`` mean is infinite then), not as a missing value.
    """

    model_config = ConfigDict(extra="forbid")
    claim: str
    setting: str
    baseline: str | None = None
    value: float | None = Field(None, description="an absolute bar instead of a baseline setting")
    metric: str = "final_accuracy"
    by: float = 0.0
    ratio: float | None = Field(None, gt=0, description="a factor instead of a difference")
    lower_is_better: bool = False

    @model_validator(mode="after")
    def _one_margin(self) -> Check:
        if self.ratio is not None and self.by != 0:
            raise ValueError(f"check {self.claim!r}: give by (a difference) or ratio (a factor), not both")
        if (self.baseline is None) == (self.value is None):
            raise ValueError(f"check {self.claim!r}: give a baseline setting or an absolute value, one of them")
        return self

    def held(self, setting: float, baseline: float) -> bool:
        """Whether the claim holds for these means of the setting and the baseline."""
        if self.ratio is not None:
            return setting * self.ratio <= baseline if self.lower_is_better else setting >= baseline * self.ratio
        return setting <= baseline - self.by if self.lower_is_better else setting >= baseline + self.by


class Figure(BaseModel):
    """A further plot of a grid: ``key`` against ``x_key``, the mean over seeds per setting.

    ``settings`` keeps the settings whose label contains it (one axis cell, e.g.
    ``"name=digits num_clients=20"``) and drops it from the legend. Where ``key`` holds a
    dict per metrics row (``layer_variance``), ``layers`` picks the entries to draw, one
    curve per setting and entry, each divided by the run summary's ``relative_to`` dict
    (``initial_layer_variance``) when given.
    """

    model_config = ConfigDict(extra="forbid")
    file: str = Field(pattern=r"^[\w.-]+\.png$")
    key: str = "centralised_accuracy"
    x_key: str = "round"
    ylabel: str | None = None
    settings: str | None = None
    layers: list[str] | None = None
    relative_to: str | None = None

    @model_validator(mode="after")
    def _layers_for_relative(self) -> Figure:
        if self.relative_to is not None and self.layers is None:
            raise ValueError(f"figure {self.file}: relative_to needs layers")
        return self


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
    extra: list[str] = Field(default_factory=list, description="summary keys shown as extra columns")
    x_key: str = Field("round", description="x axis of the plot: round, virtual_time, wall_time_s")
    notes: str | None = Field(None, description="interpretation printed under the verdicts")
    checks: list[Check] = Field(default_factory=list)
    figures: list[Figure] = Field(default_factory=list)

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


def _extra_cell(key: str, value: float | None, baseline: float | None) -> str:
    """An extra column's cell; byte counts also show their ratio to the first setting."""
    if value is None:
        return "-"
    if "bytes" in key and baseline:
        return f"{value:.3g} ({baseline / value:.1f}x fewer)" if value < baseline else f"{value:.3g}"
    return f"{value:.4g}"


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


def _run_one(cfg) -> tuple[str, dict[str, Any]]:
    from fedsim.sim.runner import run_experiment

    path, summary = run_experiment(cfg)
    return str(path), summary


def check_partitions(configs: list[tuple[str, int, Any]]) -> None:
    """Draw every distinct partition of the grid, so one the data cannot satisfy stops the
    grid before any run, naming the setting."""
    from fedsim.data.partition import PartitionError
    from fedsim.sim.components import federated_data

    seen = set()
    for label, seed, cfg in configs:
        key = (cfg.data.model_dump_json(), cfg.partition.model_dump_json(), cfg.seed)
        if key in seen:
            continue
        seen.add(key)
        try:
            federated_data(cfg)
        except PartitionError as exc:
            raise ConfigError(f"{label} (seed {seed}): {exc}") from None


def run_bench(spec_path: str | Path, runs_dir: str | None = None, jobs: int = 1) -> Path:
    """Run the grid of ``spec_path`` (``jobs`` runs at a time); return the markdown table's path.

    Parallel jobs need ``sim.backend: inprocess`` (each Ray run would start its own cluster).
    """
    spec = BenchSpec.load(spec_path)
    base_dir = Path(spec_path).parent
    configs = []
    for label, path, sets in cells(spec, base_dir):
        for seed in spec.seeds:
            overrides = [*sets, f"seed={seed}", f"output.target_accuracy={spec.target_accuracy}", "output.plots=false"]
            if runs_dir:
                overrides.append(f"output.dir={runs_dir}")
            configs.append((label, seed, load_config(path, overrides)))  # all validated before any run
    check_partitions(configs)
    if jobs > 1 and any(cfg.sim.backend != "inprocess" for _, _, cfg in configs):
        raise ConfigError("--jobs > 1 needs sim.backend=inprocess in every run of the grid")
    if jobs > 1:
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            outcomes = list(pool.map(_run_one, [cfg for _, _, cfg in configs]))
    else:
        outcomes = [_run_one(cfg) for _, _, cfg in configs]
    results: dict[str, list[dict[str, Any]]] = {}
    curves: dict[str, list[dict[str, Any]]] = {}
    for (label, seed, _), (run_path, summary) in zip(configs, outcomes, strict=True):
        results.setdefault(label, []).append({"seed": seed, "run": run_path, **summary})
        curves.setdefault(label, RunDir.open(run_path).rows())
    return write_bench(spec, results, curves, command=f"fedsim bench {' '.join(sys.argv[2:]) or spec_path}")


def rerender_bench(spec_path: str | Path) -> Path:
    """Rewrite a grid's table, verdicts and plot from its stored JSON, without running it.

    For new or changed ``checks:`` on results already measured; the curves come from the run
    directories named in the JSON, where they still exist.
    """
    spec = BenchSpec.load(spec_path)
    stored_path = Path(spec.out) / f"{spec.name}.json"
    if not stored_path.is_file():
        raise ConfigError(f"{stored_path}: no stored results to re-render; run the grid first")
    stored = json.loads(stored_path.read_text())
    results = {row["setting"]: row["runs"] for row in stored["table"]}
    curves = {label: RunDir.open(runs[0]["run"]).rows() for label, runs in results.items()
              if (Path(runs[0]["run"]) / "config.yaml").is_file()}
    return write_bench(spec, results, curves, command=stored.get("command", f"fedsim bench {spec_path}"))


def _mean_of(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.mean(values) if values else None


def _check_mean(runs: list[dict[str, Any]], metric: str) -> float | None:
    """Mean of ``metric`` over all seeds; a ``*_to_target`` never reached makes it infinite."""
    values = [r.get(metric) for r in runs]
    if metric.endswith("_to_target") and any(v is None for v in values):
        return math.inf
    return _mean_of(runs, metric)


def verdicts(spec: BenchSpec, results: dict[str, list[dict[str, Any]]]) -> list[str]:
    """One line per check: whether the claim held on the means, with the numbers."""
    lines = []
    for check in spec.checks:
        for name in (check.setting, check.baseline):
            if name is not None and name not in results:
                raise ConfigError(f"check {check.claim!r}: no setting named {name!r}")
        a = _check_mean(results[check.setting], check.metric)
        b = check.value if check.baseline is None else _check_mean(results[check.baseline], check.metric)
        held = a is not None and b is not None and check.held(a, b)
        fa = "-" if a is None else f"{a:.4g}"
        fb = "-" if b is None else f"{b:.4g}"
        factor = ""
        if check.ratio is not None and a and b and math.isfinite(a) and math.isfinite(b):
            measured = b / a if check.lower_is_better else a / b
            factor = f", {measured:.3g}x{' fewer' if check.lower_is_better else ''}, needs {check.ratio:g}x"
        lines.append(f"- {'HOLDS' if held else 'DOES NOT HOLD'}: {check.claim} "
                     f"({check.metric}: {check.setting} {fa} vs {check.baseline or 'bar'} {fb}{factor})")
    return lines


def figure_series(figure: Figure, results: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    """The curves of ``figure``: per kept setting (and layer), the mean over seeds at every
    x that all its seeds' metrics rows share, read from the run directories."""
    series: dict[str, list[dict[str, Any]]] = {}
    for label, runs in results.items():
        if figure.settings is not None and figure.settings not in label:
            continue
        name = label.replace(figure.settings, "").strip() if figure.settings else label
        rows = [RunDir.open(run["run"]).rows() for run in runs]
        for layer in figure.layers or [None]:
            per_seed = []
            for run, run_rows in zip(runs, rows, strict=True):
                scale = run[figure.relative_to][layer] if figure.relative_to else 1.0
                per_seed.append({r[figure.x_key]: (r[figure.key] if layer is None else r[figure.key][layer]) / scale
                                 for r in run_rows if r.get(figure.key) is not None})
            xs = sorted(set.intersection(*(set(points) for points in per_seed)))
            series[name if layer is None else f"{name}: {layer}"] = [
                {figure.x_key: x, figure.key: statistics.mean(points[x] for points in per_seed)} for x in xs]
    return series


def write_bench(spec: BenchSpec, results: dict[str, list[dict[str, Any]]],
                curves: dict[str, list[dict[str, Any]]], command: str) -> Path:
    """Write the markdown table, JSON and plot of a finished grid."""
    out = Path(spec.out)
    out.mkdir(parents=True, exist_ok=True)
    env = environment()
    lines = [f"# {spec.name}", "",
             f"Command: `{command}`  ",
             "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), ""]
    if spec.claim:
        lines += [f"Claim checked: {spec.claim}", ""]
    extra_heads = "".join(f" {k.replace('_', ' ')} |" for k in spec.extra)
    lines += [f"| setting | final accuracy | rounds to {spec.target_accuracy:.2f} | wall time (s) |{extra_heads} seeds |",
              "|---|---|---|---|" + "---|" * len(spec.extra) + "---|"]
    first = next(iter(results.values()), [])
    table = []
    for label, runs in results.items():
        finals = [r["final_accuracy"] for r in runs if r.get("final_accuracy") is not None]
        reached = [r["rounds_to_target"] for r in runs if r.get("rounds_to_target") is not None]
        rtt = f"{statistics.mean(reached):.1f} ({len(reached)}/{len(runs)} reached)" if reached else f"never (0/{len(runs)})"
        walls = [r["wall_time_s"] for r in runs]
        extras = {k: _mean_of(runs, k) for k in spec.extra}
        cells = "".join(f" {_extra_cell(k, v, _mean_of(first, k))} |" for k, v in extras.items())
        lines.append(f"| {label} | {_mean_std(finals)} | {rtt} | {statistics.mean(walls):.1f} |{cells} {len(runs)} |")
        table.append({"setting": label, "final_accuracy_mean": statistics.mean(finals) if finals else None,
                      "final_accuracy_std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
                      "rounds_to_target_mean": statistics.mean(reached) if reached else None,
                      "reached": len(reached), **{f"{k}_mean": v for k, v in extras.items()}, "runs": runs})
    checks = verdicts(spec, results)
    if checks:
        lines += ["", "Claim checks (computed from the means above):", *checks]
    if spec.notes:
        lines += ["", "## Notes (from the spec)", "", spec.notes.strip()]
    md = out / f"{spec.name}.md"
    md.write_text("\n".join(lines) + "\n")
    (out / f"{spec.name}.json").write_text(json.dumps(
        {"command": command, "spec": spec.model_dump(), "environment": env, "table": table, "checks": checks},
        indent=2))
    if curves:
        plot_comparison(curves, out / f"{spec.name}.png", x_key=spec.x_key)
    for figure in spec.figures:
        plot_comparison(figure_series(figure, results), out / figure.file, key=figure.key, x_key=figure.x_key,
                        ylabel=figure.ylabel)
    return md

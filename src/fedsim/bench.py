"""``fedsim bench SPEC.yaml``: a grid of runs (configs x variants x axes x seeds), one table.

A spec names the experiment, the base config(s), the variants to compare (each a list of
``--set`` overrides with a label), optional axes crossed with every variant, and the
seeds. Each cell is run once per seed; the table shows mean ± std of the final
centralised accuracy, rounds to the target accuracy and wall time. Results go to
``<out>/<name>.md`` (with the command, versions and machine that produced them),
``<out>/<name>.json`` and ``<out>/<name>.png`` (the seed-mean accuracy curves as small
multiples: one panel per cell of the grid, one colour per compared method), plus the
``figures:`` the spec asks for (curves per axis cell or per layer, or annotated heatmaps of
a summary value, methods x an axis).
``checks:`` state the claims of the papers as comparisons of two settings; each table ends
with whether each claim held, computed from the seeds paired (:mod:`fedsim.outputs.paired`:
HOLDS, DOES NOT HOLD or INCONCLUSIVE), never written by hand, and lists every diverged run.
A ``tuning:`` section tunes each method before the final runs (:mod:`fedsim.bench_tuning`); a
``reference:`` section sets a published leaderboard beside the grid (:mod:`fedsim.bench_reference`).
Every result records its spec hash (:mod:`fedsim.outputs.spec_hash`). With ``--resume`` a
grid takes each run whose config a finished run in ``--runs-dir`` already has from there:
a killed grid goes on where it stopped (runs are reproducible, so the numbers are the same).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import multiprocessing
import platform
import statistics
import sys
import time
from collections.abc import Collection
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from fedsim.bench_reference import Reference, compare_orders, reference_lines
from fedsim.bench_tuning import (
    Tuning,
    any_diverged,
    at_edge,
    choose,
    divergence,
    grid_points,
    method_scores,
    tuning_lines,
    tuning_results,
)
from fedsim.config import ConfigError, apply_override, load_config
from fedsim.outputs.grid_figures import plot_heatmaps, plot_panels
from fedsim.outputs.paired import PairedVerdict, claim_margin, paired_verdict
from fedsim.outputs.results import RESUME_MAY_CHANGE, RunDir, config_identity
from fedsim.outputs.spec_hash import spec_hash

log = logging.getLogger(__name__)


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
    + by" (or <= with ``lower_is_better``). A list of baselines asks the same against every
    one of them ("#C=1 is the hardest partition": lower than each other partition, i.e. than
    the lowest of them). The verdict compares the seeds pairwise
    (:mod:`fedsim.outputs.paired`): the claim holds only where the per-seed margins support
    it (a one-sided paired t-test at the spec's ``alpha``), does not hold where they support
    the opposite, and is inconclusive otherwise; against several baselines it must hold
    against each. A seed that never reached a target counts as never (infinite), not as a
    missing value.
    """

    model_config = ConfigDict(extra="forbid")
    claim: str
    setting: str
    baseline: str | list[str] | None = None
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

    @property
    def baselines(self) -> list[str]:
        """The baseline settings, as a list."""
        if self.baseline is None:
            return []
        return [self.baseline] if isinstance(self.baseline, str) else list(self.baseline)

    def margin(self, setting: float, baseline: float) -> float:
        """How far ``setting`` is past the claim's threshold against ``baseline`` (>= 0: the
        claim holds for these two numbers; :func:`fedsim.outputs.paired.claim_margin`). A
        setting that never reached a target (an infinite ``*_to_target``) beats nothing, not
        even a baseline that never reached it either."""
        return claim_margin(setting, baseline, self.by, self.ratio, self.lower_is_better)


class WinnerCheck(BaseModel):
    """A claim about the best method in every value of the axis ``across``: ``best`` is best
    (or tied best) in each, or, without ``best``, no single method is best in all of them
    ("no algorithm wins every setting"). Methods and values come from the grid's cells (see
    :func:`cells`); ``settings`` keeps the settings whose label contains it, and the claim is
    judged separately in every remaining cell of the grid (each must hold).

    Seed spread decides ties: in each value the tied best are the methods that the method of
    the best mean does not beat in a paired test (:mod:`fedsim.outputs.paired`). ``best``
    holds where it is the only tied best of every value, and does not hold where another
    method beats it in some value; "no single best" holds where no method is tied best in
    every value, and does not hold where one method is the only tied best of every value;
    otherwise the claim is inconclusive.
    """

    model_config = ConfigDict(extra="forbid")
    claim: str
    across: str
    settings: str | None = None
    best: str | None = None
    metric: str = "final_accuracy"
    lower_is_better: bool = False


class Figure(BaseModel):
    """A further plot of a grid.

    ``kind: curves`` (default) draws ``key`` against ``x_key``, the mean over seeds per
    setting, as small multiples: one panel per cell of the grid (see :func:`cells`), one
    curve per compared method. ``settings`` keeps the settings whose label contains it (one
    axis cell, e.g. ``"name=digits num_clients=20"``). Where ``key`` holds a dict per metrics
    row (``layer_variance``), ``layers`` picks the entries to draw, one panel per entry, each
    divided by the run summary's ``relative_to`` dict (``initial_layer_variance``) when given.

    ``kind: heatmap`` draws the seed mean of the summary's ``metric`` as methods (rows) x
    the values of the axis ``columns`` (its name as in ``axes``, or ``panel`` for the part
    of the labels after ``panel_by``), one annotated heatmap per remaining cell of the grid.

    ``kind: distribution`` draws the per-client distribution that the summary's ``metric``
    holds as quantiles (``final_personal_accuracy_quantiles``: the clients' accuracies at 0,
    5, ..., 100 percent) as sorted-accuracy curves: one panel per cell of the grid, one curve
    per method (the seed mean of each quantile, shaded between the seeds' lowest and highest),
    the fraction of clients on the x axis. A method whose runs lack ``metric`` is drawn from
    ``fallback`` where given (FedAvg's ``final_client_accuracy_quantiles``: its clients have
    the global model only), its legend name marked ``(fallback key)``. It needs only the JSON.
    """

    model_config = ConfigDict(extra="forbid")
    file: str = Field(pattern=r"^[\w.-]+\.png$")
    kind: Literal["curves", "heatmap", "distribution"] = "curves"
    key: str = "centralised_accuracy"
    x_key: str = "round"
    ylabel: str | None = None
    settings: str | None = None
    layers: list[str] | None = None
    relative_to: str | None = None
    columns: str | None = Field(None, description="heatmap: the axis across the columns")
    metric: str = Field("final_accuracy", description="heatmap: the summary value shown; distribution: the "
                                                      "summary's list of quantiles drawn")
    fallback: str | None = Field(None, description="distribution: the quantiles of a method whose runs lack metric")

    @model_validator(mode="after")
    def _consistent(self) -> Figure:
        if self.relative_to is not None and self.layers is None:
            raise ValueError(f"figure {self.file}: relative_to needs layers")
        if (self.kind == "heatmap") != (self.columns is not None):
            raise ValueError(f"figure {self.file}: columns is for kind heatmap, and a heatmap needs it")
        if self.fallback is not None and self.kind != "distribution":
            raise ValueError(f"figure {self.file}: fallback is for kind distribution")
        return self


class BenchSpec(BaseModel):
    """A benchmark grid."""

    model_config = ConfigDict(extra="forbid")
    name: str
    configs: list[str]
    variants: list[Variant] = Field(default_factory=lambda: [Variant(label="base")])
    axes: dict[str, list[Any] | dict[str, list[str]]] = Field(
        default_factory=dict, description="config key -> values, or axis name -> {value label: overrides}")
    panel_by: str | None = Field(
        None, description="separator in variant labels 'method<sep>panel': the figures' panel is the part after it")
    seeds: list[int] = Field(default_factory=lambda: [0])
    common: list[str] = Field(default_factory=list, description="overrides applied to every run")
    target_accuracy: float = 0.9
    out: str = "benchmarks/results"
    claim: str | None = Field(None, description="the paper's claim this grid checks")
    extra: list[str] = Field(default_factory=list, description="summary keys shown as extra columns")
    x_key: str = Field("round", description="x axis of the plot: round, virtual_time, wall_time_s")
    notes: str | None = Field(None, description="interpretation printed under the verdicts")
    alpha: float = Field(0.05, gt=0, lt=1, description="level of the paired per-seed tests of the checks")
    diverged_loss: float = Field(5.0, gt=0, description="a final test loss above it (or not finite) marks a run "
                                                        "diverged, listed in the write-up; 5 is about twice the "
                                                        "chance-level cross-entropy of 10 classes (ln 10 = 2.3)")
    checks: list[Check] = Field(default_factory=list)
    winners: list[WinnerCheck] = Field(default_factory=list, description="claims about the best method per cell")
    figures: list[Figure] = Field(default_factory=list)
    curves_file: str | None = Field(None, pattern=r"^[\w.-]+\.png$",
                                    description="file of the small multiples of curves; default <name>.png")
    tuning: Tuning | None = Field(None, description="per-method grids tuned on tuning seeds before the final runs")
    reference: Reference | None = Field(None, description="a published table whose orderings the write-up compares")

    def method_of(self, label: str) -> str:
        """The method of a variant label: its part before ``panel_by``, else all of it."""
        return label.split(self.panel_by, 1)[0].strip() if self.panel_by and self.panel_by in label else label

    @model_validator(mode="after")
    def _tuning_fits(self) -> BenchSpec:
        if self.tuning is None:
            return self
        shared = sorted(set(self.tuning.seeds) & set(self.seeds))
        if shared:
            raise ValueError(f"tuning.seeds and seeds share {', '.join(map(str, shared))}: the final runs need seeds "
                             "the tuning never saw")
        methods = list(dict.fromkeys(self.method_of(v.label) for v in self.variants))
        unknown = [m for m in self.tuning.grids if m not in methods]
        if unknown:
            raise ValueError(f"tuning.grids: {', '.join(unknown)} is not a method of the variants; "
                             f"known: {', '.join(methods)}")
        untuned = [m for m in methods if m not in self.tuning.grids]
        if untuned:
            raise ValueError(f"tuning.grids: no grid for {', '.join(untuned)}; every method is tuned with the same "
                             "budget")
        return self

    @model_validator(mode="after")
    def _figures_fit(self) -> BenchSpec:
        known = [*self.axes, *(["panel"] if self.panel_by else [])]
        for figure in self.figures:
            if figure.columns is not None and figure.columns not in known:
                raise ValueError(f"figure {figure.file}: columns {figure.columns!r} is not an axis; "
                                 f"known: {', '.join(known) or '(none)'}")
        for winner in self.winners:
            if winner.across not in known:
                raise ValueError(f"winner check {winner.claim!r}: across {winner.across!r} is not an axis; "
                                 f"known: {', '.join(known) or '(none)'}")
        return self

    @model_validator(mode="after")
    def _reference_fits(self) -> BenchSpec:
        if self.reference is None:
            return self
        if self.panel_by or len(self.configs) > 1:
            raise ValueError("reference: needs one config and no panel_by (a published cell is one method per "
                             "place of the axes)")
        self.reference.check_fits(list(self.axes))
        return self

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> BenchSpec:
        """Read a spec; ``overrides`` (``key=value``, the value parsed as YAML) replace its
        fields, e.g. ``name=niid_cifar10`` or ``axes.data={cifar10: [data.name=hf, ...]}``."""
        try:
            raw = yaml.safe_load(Path(path).read_text())
            for assignment in overrides:
                apply_override(raw, assignment)
            return cls.model_validate(raw)
        except (OSError, yaml.YAMLError, ValueError) as exc:
            raise ConfigError(f"{path}: {exc}") from None

    def config_path(self, config: str, base_dir: Path) -> Path:
        """The file of one of ``configs``: as written, else relative to the spec's folder."""
        return Path(config) if Path(config).is_file() else base_dir / config

    def hash(self, base_dir: Path) -> str:
        """The spec hash of this grid (:func:`fedsim.outputs.spec_hash.spec_hash`). A tuning
        stage without ``base`` hashes without the key, as before it existed: the same runs keep
        the same hash."""
        fields = self.model_dump(mode="json", exclude={"tuning": {"base"}} if self.tuning and not self.tuning.base
                                 else None)
        return spec_hash(fields, {c: self.config_path(c, base_dir) for c in self.configs})


@dataclass(frozen=True)
class Cell:
    """One setting of the grid (without seeds): its label, config and overrides, and where
    the figures put it: ``method`` names its curve or heatmap row, ``place`` maps each
    grouping (``config``, ``panel``, every axis name) to this setting's value of it."""

    label: str
    path: Path
    sets: list[str]
    method: str
    place: dict[str, str]


def cells(spec: BenchSpec, base_dir: Path) -> list[Cell]:
    """Every setting of the grid, without seeds.

    An axis is a config key with its values (``partition.alpha: [0.1, 1.0]``) or a name with
    labelled groups of overrides (``partition: {dirichlet 0.1: [partition.scheme=dirichlet,
    partition.alpha=0.1], ...}``); labels read ``<variant> <last part of the key>=<value>``.
    """
    names = list(spec.axes)
    out = []
    for config in spec.configs:
        path = spec.config_path(config, base_dir)
        for variant in spec.variants:
            for values in itertools.product(*(spec.axes[n] for n in names)):
                axis_sets = [s for n, v in zip(names, values, strict=True) for s in _axis_sets(spec.axes[n], n, v)]
                label = " ".join([variant.label, *(f"{n.split('.')[-1]}={v}" for n, v in zip(names, values, strict=True))])
                place = {"config": path.stem} if len(spec.configs) > 1 else {}
                method = spec.method_of(variant.label)
                if method != variant.label:
                    place["panel"] = variant.label.split(spec.panel_by, 1)[1].strip()
                place.update({n: str(v) for n, v in zip(names, values, strict=True)})
                if len(spec.configs) > 1:
                    label = f"{path.stem}: {label}"
                out.append(Cell(label, path, [*spec.common, *variant.set, *axis_sets], method, place))
    return out


def _axis_sets(axis: list[Any] | dict[str, list[str]], name: str, value: Any) -> list[str]:
    """The overrides of one axis value: ``name=value``, or the group labelled ``value``."""
    return list(axis[value]) if isinstance(axis, dict) else [f"{name}={value}"]


def _panel_title(place: dict[str, str], leave_out: str | None = None) -> str:
    """A panel's title: the setting's place in the grid, but for ``leave_out``."""
    return " ".join(f"{k.split('.')[-1]}={v}" if k not in ("config", "panel") else v
                    for k, v in place.items() if k != leave_out) or "all settings"


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
    """Run one config of the grid: its run directory and summary. A run that diverges is one
    of the grid's results (status ``diverged``, listed in the write-up, a tuning point it
    belongs to loses), not the end of the grid."""
    from fedsim.loops.skeleton import DivergedError
    from fedsim.runner import run_experiment

    try:
        path, summary = run_experiment(cfg)
    except DivergedError as exc:
        if exc.run_path is None:
            raise
        log.warning("%s: %s", exc.run_path, exc)
        return str(exc.run_path), RunDir(exc.run_path).summary()
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


def _grid_configs(spec: BenchSpec, grid: list[tuple[str, Path, list[str]]], seeds: list[int], runs_dir: str | None
                  ) -> list[tuple[str, int, Any]]:
    """(label, seed, validated config) of every run of ``grid`` (label, config file, overrides)."""
    configs = []
    for label, path, sets in grid:
        for seed in seeds:
            overrides = [*sets, f"seed={seed}", f"output.target_accuracy={spec.target_accuracy}", "output.plots=false"]
            if runs_dir:
                overrides.append(f"output.dir={runs_dir}")
            configs.append((label, seed, load_config(path, overrides)))
    return configs


REUSE_MAY_DIFFER = ("output.dir", *(key for key in RESUME_MAY_CHANGE
                                    if key not in ("rounds", "strategy.horizon", "output.target_accuracy")))
"""Keys a finished run may differ in and still stand for a run of the grid (``--resume``):
where it ran and what it wrote besides its rows (those of ``fedsim run --resume`` but the
length of the run and its target, which change its rows or summary); every other key changes
its numbers."""


def finished_runs(runs_dir: str | Path) -> dict[str, Path]:
    """Every run in ``runs_dir`` that finished (its summary says ``completed``, ``stopped`` by a
    rule of the run such as ``privacy.max_epsilon``, or ``diverged``: runs are reproducible, so
    it would diverge again), by its config's identity without
    :data:`REUSE_MAY_DIFFER`; the newest where several share one."""
    found: dict[str, Path] = {}
    for path in sorted(Path(runs_dir).glob("*/summary.json"), reverse=True):
        run = RunDir(path.parent)
        if run.summary().get("status") in ("completed", "stopped", "diverged") and run.config_path.is_file():
            found.setdefault(config_identity(run.config(), REUSE_MAY_DIFFER), run.path)
    return found


def _run_all(configs: list[tuple[str, int, Any]], jobs: int, finished: dict[str, Path] | None = None
             ) -> dict[str, list[dict[str, Any]]]:
    """Run every config (``jobs`` at a time), or take it from the ``finished`` run
    (:func:`finished_runs`) that has its config; label -> that label's runs (seed, run dir,
    summary)."""
    if jobs > 1 and any(cfg.sim.backend != "inprocess" for _, _, cfg in configs):
        raise ConfigError("--jobs > 1 needs sim.backend=inprocess in every run of the grid")
    finished = finished or {}
    done = {i: path for i, (_, _, cfg) in enumerate(configs)
            if (path := finished.get(config_identity(cfg, REUSE_MAY_DIFFER)))}
    if done:
        log.info("%d of %d runs taken from finished runs (--resume)", len(done), len(configs))
    todo = [cfg for i, (_, _, cfg) in enumerate(configs) if i not in done]
    if jobs > 1:
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            ran = iter(list(pool.map(_run_one, todo)))
    else:
        ran = (_run_one(cfg) for cfg in todo)
    results: dict[str, list[dict[str, Any]]] = {}
    for i, (label, seed, _) in enumerate(configs):
        run_path, summary = (str(done[i]), RunDir(done[i]).summary()) if i in done else next(ran)
        results.setdefault(label, []).append({"seed": seed, "run": run_path, **summary})
    return results


def tune(spec: BenchSpec, grid: list[Cell], runs_dir: str | None, jobs: int,
         finished: dict[str, Path] | None = None) -> dict[str, dict[str, Any]]:
    """The tuning stage (:mod:`fedsim.bench_tuning`): every setting's method grid on the
    tuning seeds with a validation split, the methods with a ``tuning.base`` after their base,
    at its chosen values; setting label -> ``chosen`` values, their ``overrides`` (a base's
    first), ``index``, ``at_edge`` keys, the ``base`` values taken and every grid point's
    ``values``, ``score`` and ``runs``."""
    tuning = spec.tuning
    holdout = f"data.validation_fraction={tuning.validation_fraction}"
    tuned: dict[str, dict[str, Any]] = {}
    first = [cell for cell in grid if cell.method not in tuning.base]
    for stage in (first, [cell for cell in grid if cell.method in tuning.base]):
        inherited = {cell.label: _base_record(cell, grid, tuning.base, tuned) for cell in stage}
        trials = [(f"{cell.label} #{k}", cell.path, [*cell.sets, *inherited[cell.label]["overrides"], *point, holdout])
                  for cell in stage for k, point in enumerate(tuning.overrides(cell.method))]
        configs = _grid_configs(spec, trials, tuning.seeds, runs_dir)
        check_partitions(configs)
        runs = _run_all(configs, jobs, finished)
        for cell in stage:
            points = grid_points(tuning.grids[cell.method])
            trial_runs = [runs[f"{cell.label} #{k}"] for k in range(len(points))]
            scores, metric = method_scores(trial_runs, tuning, spec.diverged_loss)
            if all(sc is None for sc in scores) and all(any_diverged(r, spec.diverged_loss) for r in trial_runs):
                raise ConfigError(f"tuning: every grid point of {cell.label} diverged on a tuning seed; lower its "
                                  "values (the finished runs stay: --resume)")
            if all(sc is None for sc in scores):
                raise ConfigError(f"tuning.metric {metric!r}: no tuning run of {cell.label} has a finite value of "
                                  "it, so no grid point can be chosen")
            index = choose(scores, tuning.lower_is_better)
            base = inherited[cell.label]
            tuned[cell.label] = {
                "chosen": points[index], "base": base["chosen"],
                "overrides": [*base["overrides"], *tuning.overrides(cell.method)[index]], "metric": metric,
                "index": index, "at_edge": at_edge(tuning.grids[cell.method], points[index]),
                "points": [{"values": p, "score": sc, "runs": r} for p, sc, r in zip(points, scores, trial_runs,
                                                                                       strict=True)]}
    return {cell.label: tuned[cell.label] for cell in grid}


def _base_record(cell: Cell, grid: list[Cell], bases: dict[str, str], tuned: dict[str, dict[str, Any]]
                 ) -> dict[str, Any]:
    """The chosen values and overrides ``cell`` starts its grid from: those of its
    ``tuning.base`` method's cell at the same place in the grid (none without a base)."""
    if cell.method not in bases:
        return {"chosen": {}, "overrides": []}
    [base] = [c for c in grid if c.method == bases[cell.method] and c.place == cell.place and c.path == cell.path]
    return {"chosen": tuned[base.label]["chosen"], "overrides": tuned[base.label]["overrides"]}


def run_bench(spec_path: str | Path, runs_dir: str | None = None, jobs: int = 1,
              overrides: list[str] | tuple[str, ...] = (), resume: bool = False) -> Path:
    """Run the grid of ``spec_path`` (``jobs`` runs at a time; ``overrides`` replace fields of
    the spec, see :meth:`BenchSpec.load`); return the markdown table's path. With a
    ``tuning:`` section the tuning stage runs first and the grid runs the chosen values.

    Parameters
    ----------
    spec_path : str or Path
        The spec.
    runs_dir : str or None
        Where the run directories go (else each config's ``output.dir``).
    jobs : int, default 1
        Runs at a time; more than 1 needs ``sim.backend: inprocess`` (each Ray run would start
        its own cluster).
    overrides : list of str
        ``key=value`` replacements of the spec's fields.
    resume : bool, default False
        Take every run (tuning runs too) whose config a finished run in ``runs_dir`` has
        from there instead of running it again (:func:`finished_runs`).
    """
    if resume and not runs_dir:
        raise ConfigError("--resume takes finished runs from --runs-dir: name the directory")
    spec = BenchSpec.load(spec_path, overrides)
    base_dir = Path(spec_path).parent
    grid = cells(spec, base_dir)
    # every final config validated (and every partition drawn) before any run, the tuning's too
    final = [(cell.label, cell.path, cell.sets) for cell in grid]
    check_partitions(_grid_configs(spec, final, spec.seeds, runs_dir))
    if skipped := checks_outside(spec, {cell.label for cell in grid}):
        log.warning("%d checks name settings outside this grid and are skipped (listed in the write-up), "
                    "the first: %s", len(skipped), skipped[0].claim)
    finished = finished_runs(runs_dir) if resume else None
    tuned = tune(spec, grid, runs_dir, jobs, finished) if spec.tuning else None
    if tuned:
        final = [(label, path, [*sets, *tuned[label]["overrides"]]) for label, path, sets in final]
    results = _run_all(_grid_configs(spec, final, spec.seeds, runs_dir), jobs, finished)
    source = {"spec_file": str(spec_path), "overrides": list(overrides), "spec_hash": spec.hash(base_dir)}
    return write_bench(spec, results, base_dir, command=f"fedsim bench {' '.join(sys.argv[2:]) or spec_path}",
                       source=source, tuned=tuned)


def rerender_bench(spec_path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Path:
    """Rewrite a grid's table, verdicts and plot from its stored JSON, without running it.

    For new or changed ``checks:`` or ``figures:`` on results already measured; curves come
    from the run directories named in the JSON, and are drawn only where every seed's run
    directory still exists (heatmaps need only the JSON).
    """
    spec = BenchSpec.load(spec_path, overrides)
    stored_path = Path(spec.out) / f"{spec.name}.json"
    if not stored_path.is_file():
        raise ConfigError(f"{stored_path}: no stored results to re-render; run the grid first")
    stored = json.loads(stored_path.read_text())
    base_dir = Path(spec_path).parent
    if stored.get("spec_hash") is not None and stored["spec_hash"] != spec.hash(base_dir):
        raise ConfigError(f"{stored_path}: its runs were made by another version of {spec_path} or its configs "
                          "(spec_hash differs); run the grid again")
    results = {row["setting"]: row["runs"] for row in stored["table"]}
    source = {"spec_file": str(spec_path), "overrides": list(overrides), "spec_hash": stored.get("spec_hash")}
    return write_bench(spec, results, base_dir, command=stored.get("command", f"fedsim bench {spec_path}"),
                       source=source, tuned=stored.get("tuning"))


def _mean_of(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.mean(values) if values else None


def _check_mean(runs: list[dict[str, Any]], metric: str) -> float | None:
    """Mean of ``metric`` over all seeds; a ``*_to_target`` never reached makes it infinite."""
    values = [r.get(metric) for r in runs]
    if metric.endswith("_to_target") and any(v is None for v in values):
        return math.inf
    return _mean_of(runs, metric)


def per_seed(runs: list[dict[str, Any]], metric: str) -> dict[Any, float]:
    """``metric`` by seed (a run without one is keyed by its position); a ``*_to_target``
    never reached is infinite, another missing value is left out."""
    values = {}
    for i, run in enumerate(runs):
        value = run.get(metric)
        if value is None and metric.endswith("_to_target"):
            value = math.inf
        if value is not None:
            values[run.get("seed", i)] = float(value)
    return values


def _paired(check: Check, setting: dict[Any, float], baseline: dict[Any, float] | float, alpha: float
            ) -> PairedVerdict:
    """The verdict of ``check`` over the seeds both sides have (a bar is every seed's baseline)."""
    seeds = [s for s in setting if isinstance(baseline, float) or s in baseline]
    return paired_verdict([check.margin(setting[s], baseline if isinstance(baseline, float) else baseline[s])
                           for s in seeds], alpha)


_RANK = {"DOES NOT HOLD": 0, "INCONCLUSIVE": 1, "HOLDS": 2}


def checks_outside(spec: BenchSpec, labels: Collection[str]) -> list[Check | WinnerCheck]:
    """The checks (and winner checks) that name a setting the grid of ``labels``
    lacks: a spec run on part of its grid or on another dataset through ``--set`` (the non-IID
    suite on CIFAR-10) skips them, warns before the runs and lists them in the write-up."""
    outside: list[Check | WinnerCheck] = [c for c in spec.checks
                                          if any(name not in labels for name in (c.setting, *c.baselines))]
    return outside + [w for w in spec.winners if w.settings and not any(w.settings in label for label in labels)]


def verdicts(spec: BenchSpec, results: dict[str, list[dict[str, Any]]],
             grid: dict[str, Cell] | None = None) -> list[str]:
    """One line per check: HOLDS, DOES NOT HOLD or INCONCLUSIVE from the paired seeds, with
    the means and the paired evidence. Against several baselines the least favourable
    verdict decides and is the one named. The ``winners`` checks need the grid's cells
    (``grid``: label -> :class:`Cell`)."""
    lines = []
    outside = checks_outside(spec, results)
    for check in spec.checks:
        if check in outside:
            continue
        a = _check_mean(results[check.setting], check.metric)
        setting = per_seed(results[check.setting], check.metric)
        if check.baseline is None:
            b, against = check.value, "bar"
            verdict = _paired(check, setting, float(check.value), spec.alpha)
        else:
            means = {name: _check_mean(results[name], check.metric) for name in check.baselines}
            paired = {name: _paired(check, setting, per_seed(results[name], check.metric), spec.alpha)
                      for name in check.baselines}
            # the least favourable verdict decides; among equals the baseline hardest to beat on the means
            measured = [n for n in check.baselines if means[n] is not None]
            hardest = (min if check.lower_is_better else max)(measured, key=means.__getitem__) if measured \
                else check.baselines[0]
            against = min(paired, key=lambda n: (_RANK[paired[n].outcome], n != hardest))
            verdict, b = paired[against], means[against]
            if len(means) > 1:
                against = f"the {'lowest' if check.lower_is_better else 'highest'} of {len(means)}, {against}" \
                    if against == hardest else f"{against} (of {len(means)})"
        fa = "-" if a is None else f"{a:.4g}"
        fb = "-" if b is None else f"{b:.4g}"
        factor = ""
        if check.ratio is not None and a and b and math.isfinite(a) and math.isfinite(b):
            measured = b / a if check.lower_is_better else a / b
            factor = f", {measured:.3g}x{' fewer' if check.lower_is_better else ''}, needs {check.ratio:g}x"
        lines.append(f"- {verdict.outcome}: {check.claim} "
                     f"({check.metric}: {check.setting} {fa} vs {against} {fb}{factor}; {verdict.describe()})")
    for winner in spec.winners:
        if winner in outside:
            continue
        if grid is None:
            raise ConfigError(f"winner check {winner.claim!r} needs the grid's cells")
        lines.append(_winner_verdict(winner, results, grid, spec.alpha))
    return lines


def tied_best(methods: dict[str, list[dict[str, Any]]], metric: str, lower_is_better: bool, alpha: float
              ) -> tuple[str, list[str]]:
    """The method of the best mean, and the methods it does not beat in a paired test (itself
    included): the tied best of one value of a :class:`WinnerCheck`."""
    means = {m: _check_mean(runs, metric) for m, runs in methods.items()}
    means = {m: v for m, v in means.items() if v is not None}
    leader = (min if lower_is_better else max)(means, key=means.__getitem__)
    beats = Check(claim="leader", setting=leader, baseline=leader, metric=metric, lower_is_better=lower_is_better)
    lead = per_seed(methods[leader], metric)
    tied = [m for m in means if m != leader and _paired(beats, lead, per_seed(methods[m], metric), alpha).outcome
            != "HOLDS"]
    return leader, [leader, *tied]


def _winner_verdict(check: WinnerCheck, results: dict[str, list[dict[str, Any]]], grid: dict[str, Cell],
                    alpha: float) -> str:
    """The verdict line of a :class:`WinnerCheck`, naming the tied best method(s) of every value."""
    groups: dict[str, dict[str, dict[str, list[dict[str, Any]]]]] = {}
    for label, runs in results.items():
        cell = grid.get(label)
        if cell is None or check.across not in cell.place or (check.settings and check.settings not in label):
            continue
        if _check_mean(runs, check.metric) is not None:
            group = groups.setdefault(_panel_title(cell.place, leave_out=check.across), {})
            group.setdefault(cell.place[check.across], {})[cell.method] = runs
    if not groups:
        raise ConfigError(f"winner check {check.claim!r}: no setting matches")
    outcomes, parts = [], []
    for title, values in groups.items():
        winners = {value: tied_best(methods, check.metric, check.lower_is_better, alpha)
                   for value, methods in values.items()}
        tied = [set(t) for _, t in winners.values()]
        sole = [next(iter(t)) if len(t) == 1 else None for t in tied]
        if check.best is not None:
            outcome = "HOLDS" if all(w == check.best for w in sole) else \
                "DOES NOT HOLD" if any(check.best not in t for t in tied) else "INCONCLUSIVE"
        else:
            outcome = "HOLDS" if not set.intersection(*tied) else \
                "DOES NOT HOLD" if sole[0] is not None and all(w == sole[0] for w in sole) else "INCONCLUSIVE"
        outcomes.append(outcome)
        named = ", ".join(f"{value} {'/'.join(t)} {_check_mean(values[value][leader], check.metric):.4g}"
                          for value, (leader, t) in winners.items())
        parts.append(named if len(groups) == 1 else f"{title}: {named}")
    outcome = min(outcomes, key=_RANK.__getitem__)
    return (f"- {outcome}: {check.claim} "
            f"(tied best {check.metric} per {check.across}, best mean first: {'; '.join(parts)})")


def reference_rows(reference: Reference, results: dict[str, list[dict[str, Any]]], grid: dict[str, Cell],
                   alpha: float) -> list[dict[str, Any]]:
    """Every published cell of ``reference`` against each grid cell at its place on the other
    axes, one row per value of ``reference.axis`` (:func:`fedsim.bench_reference.compare_orders`,
    with the published cell's ``at`` and that ``value``)."""
    values = list(dict.fromkeys(cell.place[reference.axis] for cell in grid.values()))
    rows = []
    for published in reference.cells:
        for value in values:
            at = {**published.at, reference.axis: value}
            seeds = {cell.method: per_seed(results[label], reference.metric) for label, cell in grid.items()
                     if label in results and cell.method in published.published
                     and all(cell.place.get(k) == v for k, v in at.items())}
            if seeds:
                rows.append({"at": published.at, "value": value,
                             **compare_orders(published.published, seeds, alpha)})
    return rows


def diverged_runs(results: dict[str, list[dict[str, Any]]], threshold: float) -> list[str]:
    """Every run that diverged (:func:`fedsim.bench_tuning.divergence`), as ``setting, seed s:
    why`` lines."""
    return [f"- {label}, seed {run.get('seed', i)}: {why}" for label, runs in results.items()
            for i, run in enumerate(runs) if (why := divergence(run, threshold))]


def seed_mean(runs: list[dict[str, Any]], key: str, x_key: str, layer: str | None = None,
              relative_to: str | None = None) -> list[dict[str, Any]]:
    """The mean over seeds of ``key`` (its ``layer`` entry, divided by the summary's
    ``relative_to`` entry) at every ``x_key`` that all the seeds' metrics rows share, with
    the seeds' lowest and highest value as ``<key>_min`` and ``<key>_max`` (the spread the
    curves shade)."""
    per_seed = []
    for run in runs:
        scale = run[relative_to][layer] if relative_to else 1.0
        per_seed.append({r[x_key]: (r[key] if layer is None else r[key][layer]) / scale
                         for r in RunDir.open(run["run"]).rows() if r.get(key) is not None})
    xs = sorted(set.intersection(*(set(points) for points in per_seed)))
    return [{x_key: x, key: statistics.mean(points[x] for points in per_seed),
             f"{key}_min": min(points[x] for points in per_seed), f"{key}_max": max(points[x] for points in per_seed)}
            for x in xs]


def figure_panels(figure: Figure, results: dict[str, list[dict[str, Any]]],
                  grid: dict[str, Cell]) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """The small multiples of a curves figure: panel title -> method -> seed-mean rows.

    A setting's panel is its place in the grid (config, the part of its label after
    ``panel_by``, its axis values), and with ``layers`` one panel per layer of it. Settings
    whose run directories are gone (a re-render elsewhere) are left out.
    """
    panels: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for label, runs in results.items():
        if figure.settings is not None and figure.settings not in label:
            continue
        if not all((Path(run["run"]) / "config.yaml").is_file() for run in runs):
            continue
        cell = grid.get(label)
        method, title = (cell.method, _panel_title(cell.place)) if cell else (label, _panel_title({}))
        for layer in figure.layers or [None]:
            panel = title if layer is None else (layer if not cell or not cell.place else f"{title} | {layer}")
            panels.setdefault(panel, {})[method] = seed_mean(runs, figure.key, figure.x_key, layer, figure.relative_to)
    return panels


def heatmap_tables(figure: Figure, results: dict[str, list[dict[str, Any]]], grid: dict[str, Cell]
                   ) -> dict[str, tuple[list[str], list[str], np.ndarray, np.ndarray]]:
    """The heatmaps of a heatmap figure: per remaining cell of the grid, methods (rows) x the
    values of ``figure.columns``, each the seed mean of the summaries' ``figure.metric``
    (NaN where missing, infinite for a target never reached), and the seeds' standard
    deviation of it (NaN where fewer than 2 seeds have a finite value)."""
    values: dict[str, dict[tuple[str, str], float]] = {}
    spreads: dict[str, dict[tuple[str, str], float]] = {}
    for label, runs in results.items():
        cell = grid.get(label)
        if cell is None or figure.columns not in cell.place or (figure.settings and figure.settings not in label):
            continue
        mean = _check_mean(runs, figure.metric)
        title = _panel_title(cell.place, leave_out=figure.columns)
        values.setdefault(title, {})[cell.method, cell.place[figure.columns]] = math.nan if mean is None else mean
        finite = [v for v in per_seed(runs, figure.metric).values() if math.isfinite(v)]
        spreads.setdefault(title, {})[cell.method, cell.place[figure.columns]] = \
            statistics.stdev(finite) if len(finite) > 1 else math.nan
    tables = {}
    for title, entries in values.items():
        rows = list(dict.fromkeys(method for method, _ in entries))
        columns = list(dict.fromkeys(column for _, column in entries))
        matrix, spread = (np.array([[table.get((r, c), math.nan) for c in columns] for r in rows], dtype=np.float64)
                          for table in (entries, spreads[title]))
        tables[title] = (rows, columns, matrix, spread)
    return tables


def distribution_panels(figure: Figure, results: dict[str, list[dict[str, Any]]], grid: dict[str, Cell]
                        ) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """The small multiples of a distribution figure: panel title (the setting's place in the
    grid) -> method -> rows of ``fraction_of_clients`` and the seed mean of the quantile there
    (``accuracy``, with the seeds' ``accuracy_min`` and ``accuracy_max``), from the summaries'
    ``figure.metric`` (else ``figure.fallback``, the method's name then marked with it)."""
    panels: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for label, runs in results.items():
        if figure.settings is not None and figure.settings not in label:
            continue
        cell = grid.get(label)
        method, title = (cell.method, _panel_title(cell.place)) if cell else (label, _panel_title({}))
        key = figure.metric
        if not any(r.get(key) for r in runs) and figure.fallback is not None:
            key = figure.fallback
            method = f"{method} ({key.removeprefix('final_').removesuffix('_quantiles').replace('_', ' ')})"
        quantiles = [r[key] for r in runs if r.get(key)]
        if not quantiles or len({len(q) for q in quantiles}) > 1:
            continue
        count = len(quantiles[0])
        panels.setdefault(title, {})[method] = [
            {"fraction_of_clients": i / max(count - 1, 1), "accuracy": statistics.mean(values),
             "accuracy_min": min(values), "accuracy_max": max(values)}
            for i, values in enumerate(zip(*quantiles, strict=True))]
    return panels


def write_bench(spec: BenchSpec, results: dict[str, list[dict[str, Any]]], base_dir: Path, command: str,
                source: dict[str, Any], tuned: dict[str, dict[str, Any]] | None = None) -> Path:
    """Write the markdown table, JSON and figures of a finished grid: ``<name>.png``, the
    seed-mean accuracy curves as small multiples (one panel per cell of the grid), and the
    spec's ``figures:``. ``source`` names the spec file, its overrides and the spec hash of
    the runs (None for runs older than spec hashes); ``tuned`` the tuning stage's record
    (:func:`tune`), whose chosen values each table row records."""
    out = Path(spec.out)
    out.mkdir(parents=True, exist_ok=True)
    env = environment()
    lines = [f"# {spec.name}", "",
             f"Command: `{command}`  ",
             "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()) + "  ",
             f"Spec hash: {source['spec_hash'] or 'none (runs older than spec hashes)'}", ""]
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
        extra_cells = "".join(f" {_extra_cell(k, v, _mean_of(first, k))} |" for k, v in extras.items())
        lines.append(f"| {label} | {_mean_std(finals)} | {rtt} | {statistics.mean(walls):.1f} |{extra_cells} "
                     f"{len(runs)} |")
        table.append({"setting": label, "final_accuracy_mean": statistics.mean(finals) if finals else None,
                      "final_accuracy_std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
                      "rounds_to_target_mean": statistics.mean(reached) if reached else None,
                      "reached": len(reached), **{f"{k}_mean": v for k, v in extras.items()},
                      **({"tuned": {**tuned[label].get("base", {}), **tuned[label]["chosen"]}} if tuned else {}),
                      "runs": runs})
    grid = {cell.label: cell for cell in cells(spec, base_dir)}
    checks = verdicts(spec, results, grid)
    if checks:
        lines += ["", f"Claim checks (paired over seeds: HOLDS or DOES NOT HOLD where a one-sided paired t-test "
                      f"at level {spec.alpha:g} supports it, the sign test where a target was never reached, "
                      "INCONCLUSIVE where the seed spread overlaps; the means shown are over all seeds):", *checks]
    skipped = checks_outside(spec, results)
    if skipped:
        lines += ["", f"Checks on settings outside this grid (skipped): {len(skipped)}",
                  *(f"- {check.claim}" for check in skipped)]
    diverged = diverged_runs(results, spec.diverged_loss)
    lines += ["", f"Diverged runs (stopped as diverging, or final test loss not finite or above "
                  f"{spec.diverged_loss:g}): {len(diverged) or 'none'}", *diverged]
    diverged_tuning = diverged_runs(tuning_results(tuned), spec.diverged_loss) if tuned else []
    if tuned:
        lines += ["", *tuning_lines(tuned, spec.tuning),
                  "", f"Diverged tuning runs (the same test, on the validation split): "
                      f"{len(diverged_tuning) or 'none'}", *diverged_tuning]
    published = reference_rows(spec.reference, results, grid, spec.alpha) if spec.reference else []
    if spec.reference:
        lines += ["", *reference_lines(spec.reference, published, spec.alpha)]
    if spec.notes:
        lines += ["", "## Notes (from the spec)", "", spec.notes.strip()]
    md = out / f"{spec.name}.md"
    md.write_text("\n".join(lines) + "\n")
    (out / f"{spec.name}.json").write_text(json.dumps(
        {"command": command, **source, "spec": spec.model_dump(), "environment": env, "table": table,
         "checks": checks, "diverged": diverged,
         **({"tuning": tuned, "diverged_tuning": diverged_tuning} if tuned else {}),
         **({"reference": published} if spec.reference else {})},
        indent=2))
    for figure in [Figure(file=spec.curves_file or f"{spec.name}.png", x_key=spec.x_key), *spec.figures]:
        if figure.kind == "heatmap":
            tables = heatmap_tables(figure, results, grid)
            if tables:
                plot_heatmaps(tables, out / figure.file, label=figure.ylabel or figure.metric.replace("_", " "))
        elif figure.kind == "distribution":
            if panels := distribution_panels(figure, results, grid):
                plot_panels(panels, out / figure.file, key="accuracy", x_key="fraction_of_clients",
                            ylabel=figure.ylabel or figure.metric.replace("_", " "))
        elif panels := figure_panels(figure, results, grid):
            plot_panels(panels, out / figure.file, key=figure.key, x_key=figure.x_key, ylabel=figure.ylabel)
    return md

"""The tuning stage of ``fedsim bench``: a spec's ``tuning:`` section.

Each method of the grid (a variant's label, or its part before ``panel_by``) declares a small
grid over named hyperparameters, e.g. the client learning rate, FedProx's mu over
NIID-Bench's {0.001, 0.01, 0.1, 1} (Li et al., ICDE 2022, arXiv 2102.02079) or a server
learning rate over values that bracket the optimum. In every setting of the grid (a cell:
method x axis values) each point of the method's grid is run once per tuning seed with
``data.validation_fraction`` of the training pool held out as the evaluation set, so tuning
never sees the test set the report uses; the point with the best mean ``metric`` over the
tuning seeds wins (the first in grid order on a tie; a point whose runs have no value, or
one of whose runs diverged (stopped as diverging, or a final loss not finite or above
the spec's ``diverged_loss``), loses). The final runs then use the chosen values on the
evaluation seeds, which must differ from the tuning seeds. Every method gets the same
budget: the same tuning seeds and the same number of grid points. A method that is another
plus one knob may name that method its ``base``: its grid then runs at the base's chosen
values in the same setting (FedProx's mu at FedAvg's tuned client lr). A chosen value at
either end of a grid of three or more values is flagged: the grid does not bracket the
optimum there.
"""

from __future__ import annotations

import itertools
import math
import statistics
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator


class Tuning(BaseModel):
    """``tuning:``: per-method grids, tuned per setting on tuning seeds and a validation split.

    Parameters
    ----------
    seeds : list of int
        The tuning seeds; none of them may be one of the spec's (evaluation) ``seeds``.
    validation_fraction : float, default 0.2
        The share of the training pool held out as the tuning runs' evaluation set.
    metric : str, default "final_accuracy"
        The summary value compared (measured on the validation split).
    fallback_metric : str or None
        The value compared for a method none of whose tuning runs has ``metric`` (FedAvg beside
        personalization methods scored by ``final_personal_accuracy_mean``: its clients have the
        global model only, scored by ``final_federated_accuracy``).
    lower_is_better : bool, default False
        Whether a lower ``metric`` is better.
    grids : dict of str to dict of str to list
        Method -> config key -> the values tried; the grid is the product of the lists.
    base : dict of str to str
        Method -> the method whose chosen values (in the same setting) its grid starts from:
        a method that is another plus one knob (FedProx is FedAvg plus mu, FedAdam FedAvg plus a
        server optimizer) tunes its knob at the base's tuned client settings, not at a fixed
        client learning rate the others are free to leave. The base is tuned first; a base has
        no base of its own, and the two grids tune different keys.
    """

    model_config = ConfigDict(extra="forbid")
    seeds: list[int] = Field(min_length=1)
    validation_fraction: float = Field(0.2, gt=0, lt=1)
    metric: str = "final_accuracy"
    fallback_metric: str | None = None
    lower_is_better: bool = False
    grids: dict[str, dict[str, list[Any]]] = Field(min_length=1)
    base: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _same_budget(self) -> Tuning:
        sizes = {method: len(grid_points(grid)) for method, grid in self.grids.items()}
        for method, grid in self.grids.items():
            for key, values in grid.items():
                if not values:
                    raise ValueError(f"tuning.grids.{method}.{key}: no values to try")
        if len(set(sizes.values())) > 1:
            told = ", ".join(f"{method} {size}" for method, size in sizes.items())
            raise ValueError(f"tuning.grids: every method is tuned with the same budget, but the grids have "
                             f"different numbers of points ({told})")
        return self

    @model_validator(mode="after")
    def _bases_fit(self) -> Tuning:
        for method, base in self.base.items():
            for name in (method, base):
                if name not in self.grids:
                    raise ValueError(f"tuning.base: {name} has no grid in tuning.grids")
            if base in self.base:
                raise ValueError(f"tuning.base: {method}'s base {base} has a base of its own ({self.base[base]}); "
                                 "bases are one level deep")
            shared = sorted(set(self.grids[method]) & set(self.grids[base]))
            if shared:
                raise ValueError(f"tuning.base: {method} and its base {base} both tune {', '.join(shared)}")
        return self

    def overrides(self, method: str) -> list[list[str]]:
        """The ``--set`` overrides of every point of ``method``'s grid, in grid order."""
        return [[override(key, value) for key, value in point.items()] for point in grid_points(self.grids[method])]


def grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """The product of the grid's value lists, the first key varying slowest."""
    return [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]


def override(key: str, value: Any) -> str:
    """``key=value`` with the value written as YAML reads it back (``1e-05`` as a float)."""
    return f"{key}={yaml.safe_dump(value, default_flow_style=True).removesuffix(chr(10)).removesuffix('...').strip()}"


def divergence(run: dict[str, Any], threshold: float) -> str | None:
    """Why ``run`` (a summary) counts as diverged, or None: the loop stopped it as diverging, or
    its final test loss is not finite (None in a summary, which holds no NaN) or above
    ``threshold``. A run not evaluated centrally (no final accuracy or loss) is not judged."""
    loss = run.get("final_loss")
    if run.get("status") == "diverged":
        return f"stopped as diverging at round {run.get('rounds_completed')}"
    if run.get("final_accuracy") is None and loss is None:
        return None
    if loss is None or not math.isfinite(loss):
        return "final test loss not finite"
    return f"final test loss {loss:.4g}" if loss > threshold else None


def any_diverged(runs: list[dict[str, Any]], threshold: float) -> bool:
    """Whether one of ``runs`` (summaries) diverged (:func:`divergence`)."""
    return any(divergence(r, threshold) for r in runs)


def score(runs: list[dict[str, Any]], metric: str, threshold: float) -> float | None:
    """The mean of ``metric`` over a grid point's tuning runs (None where none has it, or where
    one of them diverged, a final loss above ``threshold`` included: such a point loses)."""
    if any_diverged(runs, threshold):
        return None
    values = [r[metric] for r in runs if r.get(metric) is not None and math.isfinite(r[metric])]
    return statistics.mean(values) if values else None


def choose(scores: list[float | None], lower_is_better: bool) -> int:
    """The index of the best score (the first on a tie; None loses)."""
    worst = math.inf if lower_is_better else -math.inf
    keyed = [worst if s is None else s for s in scores]
    best = (min if lower_is_better else max)(keyed)
    return keyed.index(best)


def at_edge(grid: dict[str, list[Any]], chosen: dict[str, Any]) -> list[str]:
    """The keys whose chosen value is the first or last of a grid of three or more values."""
    return [key for key, values in grid.items() if len(values) >= 3 and chosen[key] in (values[0], values[-1])]


def method_scores(trial_runs: list[list[dict[str, Any]]], tuning: Tuning,
                  threshold: float) -> tuple[list[float | None], str]:
    """The score of every grid point of one setting and the metric scored: ``tuning.metric``,
    else ``tuning.fallback_metric`` where no tuning run of the setting has the metric; a point
    with a run whose final loss is above ``threshold`` (the spec's ``diverged_loss``) loses."""
    scores = [score(r, tuning.metric, threshold) for r in trial_runs]
    if all(sc is None for sc in scores) and tuning.fallback_metric is not None:
        return [score(r, tuning.fallback_metric, threshold) for r in trial_runs], tuning.fallback_metric
    return scores, tuning.metric


def tuning_results(tuned: dict[str, dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Every tuning grid point's runs, keyed ``setting at key=value, ...`` (the base's values
    last), the shape :func:`fedsim.bench.diverged_runs` reads."""
    return {f"{label} at " + ", ".join(f"{k}={v}" for k, v in {**point["values"], **record.get("base", {})}.items()):
            point["runs"] for label, record in tuned.items() for point in record["points"]}


def tuning_lines(tuned: dict[str, dict[str, Any]], tuning: Tuning) -> list[str]:
    """The markdown section of a tuned grid: per setting the chosen values, their validation
    score and the grid's other scores."""
    lines = ["## Tuning", "",
             f"Each setting's grid tried on tuning seeds {', '.join(map(str, tuning.seeds))} with "
             f"{tuning.validation_fraction:g} of the training pool held out for validation (the test set unused), "
             f"chosen by the mean validation {tuning.metric}"
             + (f" (where a method has none, {tuning.fallback_metric}: marked *)" if tuning.fallback_metric else "")
             + "; the table above ran the chosen values on the evaluation seeds"
             + ("; a method with a base (" + ", ".join(f"{m}: {b}" for m, b in tuning.base.items())
                + ") tuned its grid at the base's chosen values, shown after 'at'" if tuning.base else "") + ".", "",
             f"| setting | chosen | validation {tuning.metric} | grid (value: score) |", "|---|---|---|---|"]
    for label, record in tuned.items():
        chosen = ", ".join(f"{k}={v}" for k, v in record["chosen"].items())
        if record.get("base"):
            chosen += " at " + ", ".join(f"{k}={v}" for k, v in record["base"].items())
        if record["at_edge"]:
            chosen += f" (at the edge of its grid: {', '.join(record['at_edge'])})"
        best = record["points"][record["index"]]["score"]
        if record.get("metric", tuning.metric) != tuning.metric:
            chosen += " *"
        grid = "; ".join(f"{'/'.join(str(v) for v in p['values'].values())}: "
                         f"{'-' if p['score'] is None else format(p['score'], '.4f')}" for p in record["points"])
        lines.append(f"| {label} | {chosen} | {'-' if best is None else format(best, '.4f')} | {grid} |")
    return lines

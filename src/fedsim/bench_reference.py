"""A published leaderboard beside a grid: a spec's ``reference:`` section.

A benchmark that re-runs a paper's setting should say where its orderings agree with the
published ones. The section transcribes the published table (each cell: where in the grid it
sits, every method's published accuracy) and names the grid axis that carries the published
dataset (``axis``) and the value of it that reproduces the published setting (``value``).
Each published cell is set beside every grid cell at the same place on the other axes: the
one at ``value`` is a replication, the others (another dataset) are analogues, marked so.

Published tables give means only, so the comparison takes the published order as given and
asks this grid's paired seeds (:mod:`fedsim.outputs.paired`) about every published pair
"a above b": the pair **agrees** where the paired test finds a above b here too, is
**reversed** where it finds b above a, is **tied** where the two are equal in every seed (two
methods that coincide in this setting, e.g. FedNova and FedAvg when every client runs the same
steps; the paired test, which asks "at least as good", would call that agreement), and is
**undecided** where the seed spread overlaps. Published ties are left out (no order to compare).
"""

from __future__ import annotations

import itertools
import statistics
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from fedsim.outputs.paired import claim_margin, paired_verdict


class PublishedCell(BaseModel):
    """One cell of a published table: where it sits in the grid and the published values."""

    model_config = ConfigDict(extra="forbid")
    at: dict[str, str] = Field(description="axis -> value, every axis of the grid but the reference's `axis`")
    published: dict[str, float] = Field(min_length=2, description="method (a variant label) -> published value")


class Reference(BaseModel):
    """``reference:``: a published table the grid's orderings are compared with, cell by cell.

    Parameters
    ----------
    source : str
        Where the numbers are published (a paper's table, a repository's file at a commit).
    setting : str
        What every published cell shares (dataset, model, clients, rounds, local work) and how
        its methods map to the grid's variants.
    axis, value : str
        The grid axis that carries the published dataset, and its value that reproduces the
        published setting; cells at another value of it are analogues, not replications.
    metric : str, default "final_accuracy"
        The summary value compared (higher is better).
    cells : list of PublishedCell
        The published cells.
    """

    model_config = ConfigDict(extra="forbid")
    source: str
    setting: str
    axis: str
    value: str
    metric: str = "final_accuracy"
    cells: list[PublishedCell] = Field(min_length=1)

    def check_fits(self, axes: list[str]) -> None:
        """Raise ValueError (one line) where the section names an axis the grid lacks, or a cell
        leaves one out. Values and methods the grid lacks are not errors (a grid run on part of
        the spec through ``--set``): the write-up lists them."""
        if self.axis not in axes:
            raise ValueError(f"reference.axis {self.axis!r} is not an axis; known: {', '.join(axes) or '(none)'}")
        others = sorted(set(axes) - {self.axis})
        for cell in self.cells:
            if sorted(cell.at) != others:
                raise ValueError(f"reference cell {cell.at}: name every axis but {self.axis!r} ({', '.join(others)})")


def compare_orders(published: dict[str, float], seeds: dict[str, dict[Any, float]], alpha: float
                   ) -> dict[str, Any]:
    """One published cell against one grid cell.

    ``published``: method -> published value; ``seeds``: method -> {seed: value} in the grid
    (methods without finite values are left out). Returns the published and the grid's order
    (best first, by mean) and every published pair "a above b" sorted into ``agree``,
    ``reversed`` and ``undecided`` by the one-sided paired test of a against b on the shared
    seeds at level ``alpha``, and into ``tied`` where a equals b in every shared seed."""
    methods = [m for m in sorted(published, key=published.__getitem__, reverse=True) if seeds.get(m)]
    means = {m: statistics.mean(seeds[m].values()) for m in methods}
    sorted_pairs: dict[str, list[tuple[str, str]]] = {"agree": [], "reversed": [], "tied": [], "undecided": []}
    for a, b in itertools.combinations(methods, 2):
        if published[a] == published[b]:
            continue
        margins = [claim_margin(seeds[a][s], seeds[b][s]) for s in sorted(set(seeds[a]) & set(seeds[b]))]
        if margins and all(m == 0 for m in margins):
            sorted_pairs["tied"].append((a, b))
            continue
        kind = {"HOLDS": "agree", "DOES NOT HOLD": "reversed"}.get(paired_verdict(margins, alpha).outcome, "undecided")
        sorted_pairs[kind].append((a, b))
    return {"published": [(m, published[m]) for m in methods],
            "grid": sorted(means.items(), key=lambda item: item[1], reverse=True), **sorted_pairs}


def reference_lines(reference: Reference, rows: list[dict[str, Any]], alpha: float) -> list[str]:
    """The markdown section of :func:`compare_orders`' rows (each also names its published
    cell ``at`` and the grid's ``value`` of the reference axis)."""
    lines = ["## Published leaderboard", "", f"Source: {reference.source}. {reference.setting}", "",
             f"Every published pair \"a above b\" against this grid's paired seeds ({reference.metric}, one-sided "
             f"paired t-test at level {alpha:g}): agree (a above b here too), reversed (b above a here), tied "
             f"(equal in every seed), undecided (the seed spread overlaps). Only cells at "
             f"{reference.axis}={reference.value} replicate the published setting; the others are analogues on "
             "another dataset.", "",
             f"| published cell | {reference.axis} | replicates | published order | this grid's order (mean) "
             "| agree / reversed / tied / undecided | reversed pairs |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        at = " ".join(f"{k}={v}" for k, v in row["at"].items())
        replicates = "yes" if row["value"] == reference.value else f"no (analogue on {row['value']})"
        published = " > ".join(f"{m} {v:.3g}" for m, v in row["published"])
        grid = " > ".join(f"{m} {v:.3g}" for m, v in row["grid"])
        reversed_pairs = ", ".join(f"{b} above {a}" for a, b in row["reversed"]) or "-"
        lines.append(f"| {at} | {row['value']} | {replicates} | {published} | {grid} | "
                     f"{len(row['agree'])} / {len(row['reversed'])} / {len(row['tied'])} / {len(row['undecided'])} | "
                     f"{reversed_pairs} |")
    placed = [row["at"] for row in rows]
    outside = [" ".join(f"{k}={v}" for k, v in cell.at.items()) for cell in reference.cells if cell.at not in placed]
    if outside:
        lines += ["", f"Published cells outside this grid: {', '.join(outside)}."]
    missing = sorted({m for cell in reference.cells if cell.at in placed for m in cell.published}
                     - {m for row in rows for m, _ in row["published"]})
    if missing:
        lines += ["", f"Published methods this grid does not run: {', '.join(missing)}."]
    if not any(row["value"] == reference.value for row in rows):
        lines += ["", f"No cell of this grid replicates the published setting: its {reference.axis} axis has no "
                      f"{reference.value!r} (add it, e.g. with `--set`, on a machine that has the data)."]
    return lines

"""FedDyn's arguments are its own: a misspelt one is refused in one line that lists FedDyn's
keys (not FedAvg's or another algorithm's), a bad value names its key, and its rule (h pairs
with the round's own replies) refuses EF21-PP, from the CLI and in a Flower app."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedsim.cli import app
from fedsim.flower import FedDyn

QUICKSTART = Path(__file__).parents[3] / "configs" / "quickstart.yaml"


def _refusal(*sets: str) -> str:
    result = CliRunner().invoke(app, ["validate", str(QUICKSTART), *[arg for s in sets for arg in ("--set", s)]])
    assert result.exit_code == 2, result.output
    [line] = result.output.strip().splitlines()
    return line


def test_a_misspelt_argument_is_refused_in_one_line_listing_feddyns_own_keys():
    assert _refusal("strategy.name=feddyn", "strategy.alhpa=0.1") == (
        "config error: strategy.alhpa: unknown key; allowed here: alpha, fraction_evaluate, fraction_train, "
        "min_successful, name, server_opt")
    result = CliRunner().invoke(app, ["run", str(QUICKSTART), "--set", "strategy.name=feddyn", "--set",
                                      "strategy.alhpa=0.1"])
    assert result.exit_code == 2 and "strategy.alhpa: unknown key; allowed here: alpha," in result.output


def test_alpha_must_be_positive():
    assert _refusal("strategy.name=feddyn", "strategy.alpha=0") == (
        "config error: strategy.alpha: Input should be greater than 0 (got 0)")
    with pytest.raises(ValueError, match="FedDyn: alpha: Input should be greater than 0"):
        FedDyn(alpha=-1.0)


def test_ef21_pp_is_refused_because_h_pairs_with_the_rounds_own_replies():
    assert _refusal("strategy.name=feddyn", "quant.uplink.codec=topk", "quant.uplink.fraction=0.1",
                    "quant.uplink.error_feedback=ef21") == (
        "config error: strategy.name: feddyn updates its state h with the round's own replies; "
        "quant.uplink.error_feedback: ef21 aggregates every client's stale estimate (EF21-PP) instead; use none or ef")

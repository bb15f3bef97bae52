"""Run-level checks of the shared loop: a diverging run is warned about, a non-finite global
model stops the run with one line naming the step, and summary.json stays valid JSON."""

import json
import logging
from pathlib import Path

import pytest

from fedsim.config import load_config
from fedsim.loops.skeleton import DivergedError, DivergenceWatch
from fedsim.runner import run_experiment

QUICKSTART = Path(__file__).parents[2] / "configs" / "quickstart.yaml"


def test_the_divergence_warning_fires_once_past_a_hundredfold_loss(caplog):
    watch = DivergenceWatch([{"round": 1, "centralised_loss": 2.0}])
    with caplog.at_level(logging.WARNING, logger="fedsim.loops.skeleton"):
        for step, loss in enumerate([150.0, 250.0, 1e29, None], start=2):  # None: not evaluated
            watch.check({"round": step, "centralised_loss": loss})
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == ["step 3: the test loss grew from 2 to 250; training is diverging "
                        "(lower client.lr or strategy.server_opt.lr)"]
    with pytest.raises(DivergedError, match="^step 6: the test loss is inf; training diverged"):
        watch.check({"round": 6, "centralised_loss": float("inf")})


@pytest.mark.parametrize(("server_lr", "message"), [
    ("1e39", r"^step 1: the model holds NaN or Inf in body\.1\.bias, body\.1\.weight, "),  # Inf weights
    ("1e38", r"^step \d: the test loss is (nan|inf); training diverged "),  # finite weights, non-finite loss
])
def test_a_diverged_run_stops_in_one_line_naming_the_step(tmp_path, server_lr, message):
    cfg = load_config(QUICKSTART, [f"output.dir={tmp_path}", "sim.backend=inprocess", "partition.num_clients=3",
                                   "rounds=5", f"strategy.server_opt.lr={server_lr}", "eval.federated=false",
                                   "output.plots=false"])
    with pytest.raises(DivergedError, match=message) as raised:
        run_experiment(cfg)
    assert "\n" not in str(raised.value)
    (run_dir,) = tmp_path.iterdir()
    strict = {"parse_constant": _no_constants}  # valid JSON: no bare NaN or Infinity
    summary = json.loads((run_dir / "summary.json").read_text(), **strict)
    rows = [json.loads(line, **strict) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert summary["status"] == "diverged" and len(rows) >= 1
    assert raised.value.run_path == run_dir
    if server_lr == "1e38":  # the non-finite test loss is recorded as null
        assert rows[-1]["centralised_loss"] is None


def _no_constants(name: str):
    raise ValueError(f"{name} is not JSON")

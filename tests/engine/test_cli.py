"""The command line: partition, report, validate (fast, in-process runs)."""

from pathlib import Path

from typer.testing import CliRunner

from fedsim.cli import app
from fedsim.sim.results import RunDir
from fedsim.sim.runner import run_experiment

QUICKSTART = Path(__file__).parents[2] / "configs" / "quickstart.yaml"


def _flat(output: str) -> str:
    return " ".join(output.split())


def test_validate_accepts_the_quickstart():
    result = CliRunner().invoke(app, ["validate", str(QUICKSTART)])
    assert result.exit_code == 0 and "ok" in result.output


def test_partition_prints_per_client_histograms_and_writes_a_png(tmp_path):
    out = tmp_path / "p.png"
    result = CliRunner().invoke(app, ["partition", str(QUICKSTART), "--set", "partition.num_clients=3",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "dirichlet over 3 clients" in _flat(result.output)
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in result.output.splitlines()]
    totals = [int(cells[-1]) for cells in rows if cells and cells[0].isdigit()]
    assert len(totals) == 3
    assert sum(totals) == 1437  # every training sample of the digits pool, once


def test_report_compares_runs_in_one_table_and_one_plot(small_config, tmp_path):
    paths = [run_experiment(small_config("rounds=2", "sim.backend=inprocess", f"strategy.name={name}",
                                         "partition.num_clients=4"))[0] for name in ("fedavg", "fedprox")]
    out = tmp_path / "cmp.png"
    result = CliRunner().invoke(app, ["report", *map(str, paths), "--out", str(out)])
    assert result.exit_code == 0, result.output
    text = _flat(result.output)
    assert "fedavg" in text and "fedprox" in text
    for path in paths:
        final = RunDir.open(path).summary()["final_accuracy"]
        assert f"{final:.4f}" in text
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_report_of_a_missing_run_dir_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(app, ["report", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "not a run directory" in _flat(result.output)

"""The command line: partition, report, validate (fast, in-process runs)."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedsim.cli import app
from fedsim.outputs.results import RunDir
from fedsim.runner import run_experiment

QUICKSTART = Path(__file__).parents[2] / "configs" / "quickstart.yaml"


def _flat(output: str) -> str:
    return " ".join(output.split())


def test_validate_accepts_the_quickstart():
    result = CliRunner().invoke(app, ["validate", str(QUICKSTART)])
    assert result.exit_code == 0 and "ok" in result.output


def test_partition_prints_per_client_histograms_and_writes_json_and_png(tmp_path):
    out = tmp_path / "part"
    result = CliRunner().invoke(app, ["partition", str(QUICKSTART), "--set", "partition.num_clients=3",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "partition.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "dirichlet over 3 clients" in _flat(result.output)
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in result.output.splitlines()]
    totals = [int(cells[-1]) for cells in rows if cells and cells[0].isdigit()]
    assert len(totals) == 3
    assert sum(totals) == 1437  # every training sample of the digits pool, once
    report = json.loads((out / "partition.json").read_text())
    assert [c["size"] for c in report["clients"]] == totals
    assert [c["id"] for c in report["clients"]] == [0, 1, 2]
    assert all(sum(c["label_counts"]) == c["size"] == c["train_size"] + c["test_size"] for c in report["clients"])
    assert 0 < report["heterogeneity"]["label_tv_mean"] < 1
    assert report["heterogeneity"]["size_max"] == max(totals)


def test_partition_of_many_clients_skips_the_table_and_measures_one_label_skew(tmp_path):
    result = CliRunner().invoke(app, ["partition", str(QUICKSTART), "--out", str(tmp_path),
                                      "--set", "partition.num_clients=120", "--set", "partition.scheme=pathological",
                                      "--set", "partition.classes_per_client=1"])
    assert result.exit_code == 0, result.output
    assert "│" not in result.output
    report = json.loads((tmp_path / "partition.json").read_text())
    assert len(report["clients"]) == 120
    assert all(sum(1 for n in c["label_counts"] if n) == 1 for c in report["clients"])
    assert report["heterogeneity"]["labels_per_client_mean"] == 1.0


@pytest.mark.parametrize(("overrides", "message"), [
    (["partition.num_clients=2000"],
     "config error: partition: dirichlet: 2000 partitions need at least as many samples; got 1437"),
    (["partition.num_clients=200"],
     "config error: partition: dirichlet: partition.num_clients 200 x partition.min_size 10 needs 2000 samples but "
     "the data has 1437; lower partition.min_size or partition.num_clients"),
    (["partition.scheme=pathological", "partition.classes_per_client=11"],
     "config error: partition.classes_per_client: 11 labels per client but data.name digits has 10 classes; "
     "allowed 1..10"),
])
def test_validate_refuses_a_partition_the_data_cannot_satisfy_in_one_line(overrides, message):
    sets = [arg for o in overrides for arg in ("--set", o)]
    result = CliRunner().invoke(app, ["validate", str(QUICKSTART), *sets])
    assert result.exit_code == 2
    assert _flat(result.output) == message


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

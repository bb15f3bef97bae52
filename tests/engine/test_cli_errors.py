"""What the command line guarantees on failure: a user error is one line on stderr with exit
code 2 and no run directory (``--debug`` adds the traceback); a run whose every round was
skipped says so and exits 1."""

from pathlib import Path

from typer.testing import CliRunner

from fedsim.cli import app

QUICKSTART = Path(__file__).parents[2] / "configs" / "quickstart.yaml"


def _invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def test_a_config_error_is_one_line_on_stderr_with_exit_code_2(tmp_path):
    result = _invoke("validate", str(QUICKSTART), "--set", "strategy.name=gossip", "--set", "strategy.degree=10",
                     "--set", "faults.crash=[99]")
    assert result.exit_code == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("config error: ") and "strategy.degree" in lines[0] and "faults.crash" in lines[0]


def test_run_refuses_bad_data_before_creating_a_run_directory(tmp_path):
    runs = tmp_path / "runs"
    result = _invoke("run", str(QUICKSTART), "--set", f"output.dir={runs}", "--set", "data.name=npz",
                     "--set", f"data.path={tmp_path / 'missing.npz'}", "--no-progress")
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [f"config error: data: npz: {tmp_path / 'missing.npz'} is not a file"]
    assert not runs.exists()


def test_debug_shows_the_traceback_of_a_user_error(tmp_path):
    result = _invoke("--debug", "validate", str(QUICKSTART), "--set", f"output.dir={tmp_path}", "--set",
                     "partition.num_clients=5000")
    assert result.exit_code == 2
    assert "Traceback" in result.stderr and "preflight" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("config error: partition: dirichlet: 5000 partitions")


def test_validate_reports_ok_for_a_config_that_runs(tmp_path):
    result = _invoke("validate", str(QUICKSTART), "--set", f"output.dir={tmp_path}")
    assert result.exit_code == 0 and result.stdout.startswith("ok: ")


def test_a_run_whose_every_round_was_skipped_says_so_and_exits_1(tmp_path):
    runs = tmp_path / "runs"
    result = _invoke("run", str(QUICKSTART), "--no-progress", "--set", f"output.dir={runs}", "--set", "rounds=2",
                     "--set", "sim.backend=inprocess", "--set", "partition.num_clients=3", "--set",
                     "client.local_steps=1", "--set", "faults.crash=[0, 1, 2]", "--set", "output.plots=false")
    assert result.exit_code == 1
    assert "every one of the 2 rounds was skipped" in result.stderr
    (run_dir,) = runs.iterdir()
    assert (run_dir / "summary.json").exists()


def test_a_run_whose_rounds_were_all_skipped_after_a_fault_says_so_and_exits_1(tmp_path):
    runs = tmp_path / "runs"
    result = _invoke("run", str(QUICKSTART), "--no-progress", "--set", f"output.dir={runs}", "--set", "rounds=3",
                     "--set", "sim.backend=inprocess", "--set", "partition.num_clients=3", "--set",
                     "client.local_steps=1", "--set", "faults.crash=[0, 1, 2]", "--set", "faults.rounds=[2, 3]",
                     "--set", "output.plots=false")
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines()[-1].startswith(
        "rounds lost: every round from 2 to the last (3) was skipped"), result.stderr


def test_a_run_that_recovers_from_a_skipped_round_exits_0(tmp_path):
    runs = tmp_path / "runs"
    result = _invoke("run", str(QUICKSTART), "--no-progress", "--set", f"output.dir={runs}", "--set", "rounds=3",
                     "--set", "sim.backend=inprocess", "--set", "partition.num_clients=3", "--set",
                     "client.local_steps=1", "--set", "faults.crash=[0, 1, 2]", "--set", "faults.rounds=[2]",
                     "--set", "output.plots=false")
    assert result.exit_code == 0, result.stderr

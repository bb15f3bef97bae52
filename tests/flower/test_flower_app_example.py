"""examples/flower-app: a plain Flower app with fedsim's Flag Aggregator, run in Flower's
simulation engine (Ray backend), learns the digits in 3 rounds."""

import logging
import os
import tomllib
from pathlib import Path

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

APP_DIR = Path(__file__).parents[2] / "examples" / "flower-app"


def test_example_app_learns_the_digits_in_three_rounds_of_flowers_simulation(tmp_path, monkeypatch, caplog):
    # The app is imported by name, here and in Flower's Ray workers; Flower's Ray backend hands
    # sys.path to its workers through PYTHONPATH and leaves it set: setenv restores it afterwards.
    monkeypatch.syspath_prepend(str(APP_DIR))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(APP_DIR), os.environ.get("PYTHONPATH")])))
    monkeypatch.chdir(tmp_path)  # the ServerApp writes final_model.pt into its working directory
    from digits_app import client_app, server_app, task

    run_config = tomllib.loads((APP_DIR / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert run_config["num-server-rounds"] == 3

    # run_simulation runs the app's ServerApp and ClientApp but passes no run config (flwr run
    # reads it from pyproject.toml): hand the app's [tool.flwr.app.config] to its main.
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        context.run_config.update(run_config)
        server_app.main(grid, context)

    # address "local": a Ray of this test's own, never a cluster another test started (tests/cluster
    # runs one beside this test under xdist, and its stop would take these actors with it)
    with caplog.at_level(logging.INFO, logger="flwr"):
        run_simulation(server_app=server, client_app=client_app.app, num_supernodes=10,
                       backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0},
                                       "init_args": {"logging_level": logging.ERROR, "log_to_driver": False,
                                                     "address": "local"}})
    assert "Starting Flag strategy" in caplog.text
    assert caplog.text.count("aggregate_train: 10 replies accepted, 0 dropped") == 3

    model = task.Net()
    model.load_state_dict(torch.load(tmp_path / "final_model.pt"))
    _, accuracy = task.test(model, task.load_test_data())
    # an untrained model is at 0.1; FedAvg reaches about 0.92 here, the Flag Aggregator about 0.91
    assert accuracy >= 0.85

"""Client-level outcomes: percentiles of the clients' own test accuracies in every row that
runs federated evaluation, synchronous and asynchronous."""

from pathlib import Path

import numpy as np
import pytest
import torch

from fedsim.clients.train import evaluate
from fedsim.config import load_config
from fedsim.outputs.results import RunDir
from fedsim.runner import run_experiment
from fedsim.sim.components import federated_data, make_model
from fedsim.strategies.evaluation import client_accuracy_percentiles

ROOT = Path(__file__).parents[2]
KEYS = ("client_accuracy_p10", "client_accuracy_p50", "client_accuracy_p90")


def test_percentiles_interpolate_between_sorted_client_accuracies():
    # sorted 0.2, 0.4, 0.6, 0.8, 1.0: p10 at rank 0.4 -> 0.28, p50 at rank 2 -> 0.6, p90 at rank 3.6 -> 0.92
    out = client_accuracy_percentiles([1.0, 0.4, 0.2, 0.8, 0.6])
    assert out == pytest.approx({"client_accuracy_p10": 0.28, "client_accuracy_p50": 0.6, "client_accuracy_p90": 0.92})
    assert client_accuracy_percentiles([0.7]) == {k: 0.7 for k in KEYS}
    assert client_accuracy_percentiles([]) == {}


def test_sync_rows_carry_the_percentiles_of_the_final_models_client_accuracies(tmp_path):
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", [
        f"output.dir={tmp_path}", "sim.backend=inprocess", "output.plots=false", "rounds=2",
        "partition.alpha=0.1", "client.local_epochs=1", "output.checkpoint_every=1"])
    path, summary = run_experiment(cfg)
    last = RunDir.open(path).rows()[-1]
    data = federated_data(cfg)
    model = make_model(cfg.model, data.train, cfg.seed)
    state = torch.load(Path(path) / "checkpoints" / "round-00002.pt", weights_only=False)["model"]
    model.load_state_dict(state)
    accuracies = [evaluate(model, data.client(i)[1], torch.device("cpu")).accuracy
                  for i in range(cfg.partition.num_clients) if len(data.client_test[i])]
    expected = np.percentile(accuracies, [10, 50, 90])
    assert [last[k] for k in KEYS] == pytest.approx(expected.tolist())
    assert last["client_accuracy_p10"] < last["client_accuracy_p90"]  # label skew leaves clients behind
    assert [summary[f"final_{k}"] for k in KEYS] == [last[k] for k in KEYS]


def test_clients_train_and_evaluate_on_the_rounds_feature_noise(tmp_path):
    """Under feature noise the clients' test splits carry the noise drawn for the round that
    evaluates them: the last row's percentiles are those of round 2's draws."""
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", [
        f"output.dir={tmp_path}", "sim.backend=inprocess", "output.plots=false", "rounds=2",
        "partition.scheme=feature_noise", "partition.noise_std=1.0", "partition.num_clients=5",
        "client.local_epochs=1", "output.checkpoint_every=1"])
    path, _ = run_experiment(cfg)
    last = RunDir.open(path).rows()[-1]
    data = federated_data(cfg)
    model = make_model(cfg.model, data.train, cfg.seed)
    model.load_state_dict(torch.load(Path(path) / "checkpoints" / "round-00002.pt", weights_only=False)["model"])

    def percentiles(server_round):
        accuracies = [evaluate(model, data.client(i, server_round)[1], torch.device("cpu")).accuracy
                      for i in range(cfg.partition.num_clients)]
        return np.percentile(accuracies, [10, 50, 90]).tolist()

    assert [last[k] for k in KEYS] == pytest.approx(percentiles(2))
    assert percentiles(2) != pytest.approx(percentiles(1))


def test_async_rows_carry_the_percentiles_when_clients_evaluate(tmp_path):
    cfg = load_config(ROOT / "configs" / "fedbuff.yaml", [
        f"output.dir={tmp_path}", "output.plots=false", "strategy.horizon=2", "eval.federated=true",
        "partition.client_test_fraction=0.2", "partition.num_clients=8", "strategy.buffer_size=4"])
    path, _ = run_experiment(cfg)
    rows = RunDir.open(path).rows()
    assert rows and all(r["client_accuracy_p10"] <= r["client_accuracy_p50"] <= r["client_accuracy_p90"]
                        for r in rows)

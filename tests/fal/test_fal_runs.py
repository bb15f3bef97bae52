"""Federated adversarial learning in whole runs: the batched backend's stacked attack (per-row
input gradients with torch.func) trains exactly what one-at-a-time training does, an
interrupted run resumes to the uninterrupted numbers, and ``eval.robust`` adds
``robust_accuracy`` rows to any run."""

from pathlib import Path

import numpy as np
import pytest
import torch

from fedsim.clients.adversarial import AdversarialInputs, attack_generator
from fedsim.clients.batched import train_stacked
from fedsim.clients.objective import ClientObjective
from fedsim.clients.train import train_local
from fedsim.config import AdversarialConfig, ClientConfig, load_config
from fedsim.data import ArrayDataset
from fedsim.losses import REGISTRY
from fedsim.models.mlp import MLP
from fedsim.outputs.results import RunDir
from fedsim.runner import run_experiment

QUICKSTART = Path(__file__).parents[2] / "configs" / "quickstart.yaml"
SMALL = ("partition.num_clients=4", "output.plots=false", "eval.federated=false", "client.local_steps=3",
         "client.adversarial.epsilon=0.1", "client.adversarial.steps=3")


def _rows(path):
    return [{k: v for k, v in row.items() if k != "wall_time_s"} for row in RunDir.open(path).rows()]


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_stacked_adversarial_training_equals_one_client_at_a_time(norm):
    torch.manual_seed(0)
    sizes = [23, 17, 9]  # unequal: short last batches, padded rows, clients ending at different steps
    datasets = [ArrayDataset(x=torch.rand(n, 1, 4, 4).numpy(), y=torch.randint(0, 3, (n,)).numpy(), num_classes=3,
                             name="toy") for n in sizes]
    model = MLP((1, 4, 4), 3, hidden=[8])
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    client = ClientConfig(local_epochs=2, batch_size=8, lr=0.1, momentum=0.9)
    attack = AdversarialConfig(epsilon=0.2, steps=3, norm=norm)

    def objective(hooks, per_sample):
        return ClientObjective(REGISTRY["cross_entropy"](reduction="none" if per_sample else "mean"), hooks=hooks)

    alone = []
    for k, data in enumerate(datasets):
        model.load_state_dict(start)
        hooks = (AdversarialInputs(attack, [attack_generator(0, 1, k)]),)
        train_local(model, data, client, objective(hooks, False), torch.Generator().manual_seed(k), torch.device("cpu"))
        alone.append({name: p.detach().clone() for name, p in model.named_parameters()})
    stacked_hooks = (AdversarialInputs(attack, [attack_generator(0, 1, k) for k in range(3)]),)
    final, _ = train_stacked(model, {n: torch.stack([start[n]] * 3) for n in start}, datasets,
                             [torch.Generator().manual_seed(k) for k in range(3)], client,
                             objective(stacked_hooks, True), torch.device("cpu"))
    for k in range(3):
        for name in start:
            torch.testing.assert_close(final[name][k], alone[k][name], rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(alone[0][n], start[n]) for n in start)


def test_a_batched_run_gives_the_in_process_numbers(tmp_path):
    rows = {}
    for backend in ("inprocess", "batched"):
        cfg = load_config(QUICKSTART, [f"output.dir={tmp_path / backend}", *SMALL, "rounds=2",
                                       f"sim.backend={backend}"])
        rows[backend] = _rows(run_experiment(cfg)[0])
    for a, b in zip(rows["inprocess"], rows["batched"], strict=True):
        for key in ("centralised_accuracy", "robust_accuracy", "train_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key
    assert all(r["robust_accuracy"] < r["centralised_accuracy"] for r in rows["batched"])


def test_an_adversarial_run_resumed_from_a_checkpoint_ends_exactly_like_an_uninterrupted_one(tmp_path):
    cfg = load_config(QUICKSTART, [f"output.dir={tmp_path}", *SMALL, "rounds=4", "output.checkpoint_every=2",
                                   "sim.backend=inprocess", "strategy.fraction_train=0.5"])
    reference, _ = run_experiment(cfg)
    interrupted, _ = run_experiment(cfg)
    run = RunDir.open(interrupted)
    (run.checkpoint_dir / "round-00004.pt").unlink()  # as if killed during round 3
    assert run.latest_checkpoint().round == 2
    run_experiment(cfg, resume=interrupted)
    assert _rows(interrupted) == _rows(reference)
    assert all(np.isfinite(r["robust_accuracy"]) for r in _rows(reference))


def test_eval_robust_scores_a_plain_fedavg_run_and_needs_no_adversarial_clients(tmp_path):
    cfg = load_config(QUICKSTART, [f"output.dir={tmp_path}", "partition.num_clients=4", "output.plots=false",
                                   "eval.federated=false", "client.local_steps=3", "rounds=2", "sim.backend=batched",
                                   "eval.robust.epsilon=0.05", "eval.robust.steps=5"])
    assert cfg.client.adversarial is None and cfg.eval.robust.step_size == pytest.approx(2.5 * 0.05 / 5)
    path, summary = run_experiment(cfg)
    rows = _rows(path)
    assert [0.0 <= r["robust_accuracy"] <= r["centralised_accuracy"] for r in rows] == [True, True]
    assert summary["final_robust_accuracy"] == rows[-1]["robust_accuracy"]

"""SCAFFOLD's ``strategy.correction``: the correction through the gradient (fedsim's default)
and on the weights after each step (NIID-Bench's ``train_net_scaffold``), each equal to a
plain PyTorch computation of its formula, with heavy-ball momentum where the two differ."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fedsim.clients.local_steps import momentum_steps
from fedsim.config import load_config
from fedsim.params import ParamSpec
from fedsim.runner import run_experiment
from fedsim.sim.components import federated_data, make_model

QUICKSTART = Path(__file__).parents[2] / "configs" / "quickstart.yaml"
K, LR, RHO, ROUNDS, CLIENTS = 3, 0.2, 0.9, 2, 3


def _run(tmp_path, correction, backend="inprocess"):
    cfg = load_config(QUICKSTART, [
        f"output.dir={tmp_path / correction / backend}", f"sim.backend={backend}", "eval.federated=false",
        "output.plots=false", "model.hidden=[8]", f"partition.num_clients={CLIENTS}", "client.batch_size=2000",
        f"client.momentum={RHO}", f"client.lr={LR}", f"client.local_steps={K}", "strategy.name=scaffold",
        f"strategy.correction={correction}", f"rounds={ROUNDS}", "output.checkpoint_every=1"])
    path, _ = run_experiment(cfg)
    return cfg, Path(path)


def _client(model, spec, x, data, c, c_i, correction):
    """K full-batch heavy-ball steps (buf <- rho buf + g; w <- w - lr buf) from ``x`` with the
    SCAFFOLD correction; returns (y, c_i+)."""
    state = model.state_dict()
    state.update(spec.unflatten(x.clone()))
    model.load_state_dict(state)
    shift = spec.unflatten(c - c_i)
    inputs, labels = torch.from_numpy(data.x), torch.from_numpy(data.y)
    buffers = {}
    for _ in range(K):
        model.zero_grad()
        F.cross_entropy(model(inputs), labels).backward()
        with torch.no_grad():
            for name, p in model.named_parameters():
                g = p.grad + shift[name] if correction == "gradient" else p.grad
                buffers[name] = g.clone() if name not in buffers else RHO * buffers[name] + g
                p -= LR * buffers[name]
                if correction == "weights":
                    p -= LR * shift[name]  # NIID-Bench: net_para - lr * (c_global - c_local) after the step
    y = spec.flatten(model.state_dict())
    a = momentum_steps(K, RHO) if correction == "gradient" else K  # weights: NIID-Bench's (cnt * lr)
    return y, c_i - c + (x - y) / (a * LR)


@pytest.mark.parametrize("correction", ["gradient", "weights"])
def test_scaffold_correction_equals_its_formula_in_plain_pytorch_with_momentum(tmp_path, correction):
    cfg, path = _run(tmp_path, correction)
    data = federated_data(cfg)
    model = make_model(cfg.model, data.train, cfg.seed)
    spec = ParamSpec.of(model)
    x = spec.flatten(model.state_dict())
    c, c_local = torch.zeros(spec.dim), [torch.zeros(spec.dim) for _ in range(CLIENTS)]
    for rnd in range(1, ROUNDS + 1):
        dy, dc = [], []
        for i in range(CLIENTS):
            y, c_new = _client(model, spec, x, data.client(i)[0], c, c_local[i], correction)
            dy.append(y - x)
            dc.append(c_new - c_local[i])
            c_local[i] = c_new
        x = x + torch.stack(dy).mean(0)
        c = c + torch.stack(dc).sum(0) / CLIENTS
        ckpt = torch.load(path / "checkpoints" / f"round-{rnd:05d}.pt", weights_only=False)
        torch.testing.assert_close(spec.flatten(ckpt["model"]), x, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(ckpt["strategy"]["scaffold_control"], c, atol=2e-4, rtol=1e-3)
    assert c.abs().max() > 1e-2


def test_the_two_corrections_differ_under_momentum_and_the_batched_engine_matches(tmp_path):
    final = {}
    for correction, backend in (("gradient", "inprocess"), ("weights", "inprocess"), ("weights", "batched")):
        _, path = _run(tmp_path, correction, backend)
        ckpt = torch.load(path / "checkpoints" / f"round-{ROUNDS:05d}.pt", weights_only=False)
        final[correction, backend] = torch.cat([v.flatten() for v in ckpt["model"].values()])
    torch.testing.assert_close(final["weights", "batched"], final["weights", "inprocess"], atol=2e-5, rtol=1e-4)
    assert (final["gradient", "inprocess"] - final["weights", "inprocess"]).abs().max() > 1e-3

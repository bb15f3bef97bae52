"""FedDyn's update rule: a fedsim run equals the paper's algorithm written out in plain
PyTorch (feddyn_reference.py), server side (theta, h) and client side (every h_i), and the
client term's stacked form equals its per-client form row by row."""

from pathlib import Path

import torch
from feddyn_reference import feddyn_rounds
from fedsim_feddyn import (
    GRADIENT_STATE_KEY,
    DynamicRegulariser,
    dynamic_regulariser,
    stacked_dynamic_regulariser,
)

from fedsim.config import load_config
from fedsim.outputs.results import Checkpoint, RunDir
from fedsim.params import ParamSpec
from fedsim.records import to_state_dict
from fedsim.runner import run_experiment
from fedsim.sim.components import federated_data, make_model
from fedsim.strategies.participation import build_sampler

QUICKSTART = Path(__file__).parents[3] / "configs" / "quickstart.yaml"
ALPHA, LR, STEPS, ROUNDS = 0.1, 0.3, 3, 3
# full-batch gradient descent without momentum (the reference's local solver), 2 of 4
# clients a round (so N = 4 differs from |P_t| = 2), a checkpoint every round
FULL_BATCH = ("sim.backend=inprocess", "eval.federated=false", "output.plots=false", "model.hidden=[8]",
              "partition.num_clients=4", "strategy.fraction_train=0.5", "client.batch_size=2000",
              "client.momentum=0.0", f"client.local_steps={STEPS}", f"client.lr={LR}", "strategy.name=feddyn",
              f"strategy.alpha={ALPHA}", f"rounds={ROUNDS}", "output.checkpoint_every=1")


def test_feddyn_run_equals_the_papers_algorithm_in_plain_pytorch(tmp_path):
    cfg = load_config(QUICKSTART, [f"output.dir={tmp_path}", *FULL_BATCH])
    path, _ = run_experiment(cfg)
    data = federated_data(cfg)
    model = make_model(cfg.model, data.train, cfg.seed)
    spec = ParamSpec.of(model)
    sampler = build_sampler(cfg)
    sampled = [sampler.sample(r) for r in range(1, ROUNDS + 1)]
    clients = [(torch.from_numpy(d.x), torch.from_numpy(d.y)) for d in (data.client(i)[0] for i in range(4))]
    reference = feddyn_rounds(model, clients, sampled, ALPHA, LR, STEPS)

    run = RunDir.open(path)
    for rnd, want in enumerate(reference, start=1):
        ckpt = torch.load(Path(path) / "checkpoints" / f"round-{rnd:05d}.pt", weights_only=False)
        saved = Checkpoint(rnd, ckpt["model"], ckpt["strategy"], ckpt["elapsed_s"], ckpt["clients"])
        for name, value in want.theta.items():
            torch.testing.assert_close(ckpt["model"][name], value, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ckpt["strategy"]["feddyn_h"], spec.flatten(want.h), atol=1e-5, rtol=1e-5)
        for i, h_i in enumerate(want.h_clients):
            if any(i in s for s in sampled[:rnd]):
                kept = to_state_dict(run.client_state(saved, i)[GRADIENT_STATE_KEY])
                for name, value in h_i.items():
                    torch.testing.assert_close(kept[name], value, atol=1e-5, rtol=1e-5)
            else:  # a client that has not trained yet keeps no state
                assert i not in saved.clients or GRADIENT_STATE_KEY not in run.client_state(saved, i)
    # the run exercised every term: a client trained twice (its -<h_i, theta> mattered) and
    # the server's correction -h/alpha is not small beside the mean update
    assert len({i for s in sampled for i in s}) < sum(len(s) for s in sampled)
    assert max(v.abs().max() for v in reference[-1].h.values()) / ALPHA > 1e-2


def test_the_stacked_term_equals_each_clients_own_term_on_the_rows_still_training():
    generator = torch.Generator().manual_seed(0)
    shapes = {"w": (3, 2), "b": (3,)}
    h = {n: torch.randn(4, *s, generator=generator) for n, s in shapes.items()}
    start = {n: torch.randn(4, *s, generator=generator) for n, s in shapes.items()}
    params = {n: torch.randn(2, *s, generator=generator) for n, s in shapes.items()}  # 2 of 4 rows still train
    stacked = DynamicRegulariser(ALPHA, h, start).stacked_extra_loss(params, torch.zeros(2, 5, 10), torch.ones(2, 5))
    assert stacked.shape == (2,)
    for k in range(2):
        own = dynamic_regulariser({n: p[k] for n, p in params.items()}, {n: v[k] for n, v in h.items()},
                                  {n: v[k] for n, v in start.items()}, ALPHA)
        torch.testing.assert_close(stacked[k], own)
    assert torch.equal(stacked, stacked_dynamic_regulariser(params, h, start, ALPHA))

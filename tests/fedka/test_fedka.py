"""FedKA (fedsim.fedka) and partition.scheme domains (fedsim.data.domains): MK-MMD and voting
against plain computations, the server's update rule written out, deterministic domains,
exact resume, one-line refusals."""

from __future__ import annotations

import copy
import math
from collections import Counter

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from fedsim.clients.batched import train_stacked
from fedsim.clients.hooks import extra_term, stacked_extra_term
from fedsim.clients.train import local_steps, train_local
from fedsim.config import ConfigError, load_config
from fedsim.data.array_dataset import ArrayDataset
from fedsim.data.domains import domain_split, transform
from fedsim.fedka.algorithm import WORKSPACE, FedKA, WorkspaceMatching
from fedsim.fedka.mmd import mk_mmd
from fedsim.fedka.voting import federated_vote
from fedsim.outputs.results import RunDir
from fedsim.params import ParamSpec
from fedsim.runner import run_experiment
from fedsim.seeding import derive_seed
from fedsim.sim.components import build_objective, federated_data, make_model
from fedsim.strategies.replies import ClientUpdate

CONFIG = "configs/fedka.yaml"
CPU = torch.device("cpu")


def test_mk_mmd_matches_a_hand_computation_and_is_zero_for_the_same_sample():
    x, y = [[0.0], [1.0]], [[0.0], [2.0]]
    pooled = [p[0] for p in x + y]
    h = sum((a - b) ** 2 for a in pooled for b in pooled) / (4 * 3)
    scales = (0.5, 2.0)

    def k(a, b):
        return sum(math.exp(-((a - b) ** 2) / (s * h)) for s in scales) / len(scales)

    def mean_k(u, v):
        return sum(k(a[0], b[0]) for a in u for b in v) / (len(u) * len(v))

    expected = mean_k(x, x) + mean_k(y, y) - 2 * mean_k(x, y)
    got = mk_mmd(torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64), scales)
    assert got.item() == pytest.approx(expected, rel=1e-12)
    z = torch.randn(7, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert mk_mmd(z, z[torch.randperm(7, generator=torch.Generator().manual_seed(1))]).item() == pytest.approx(0, abs=1e-12)
    assert mk_mmd(z, z + 3.0).item() > 0.1


def test_federated_vote_matches_a_plain_count():
    predictions = torch.randint(0, 4, (5, 60), generator=torch.Generator().manual_seed(0))
    labels, agreed = federated_vote(predictions, 4, threshold=0.6)
    for j in range(60):
        counts = Counter(predictions[:, j].tolist())
        top = max(counts.values())
        assert labels[j].item() == min(c for c, n in counts.items() if n == top)
        assert agreed[j].item() == (top >= 0.6 * 5)
    assert federated_vote(torch.tensor([[1, 2], [1, 2]]), 3, 1.0)[1].tolist() == [True, True]


def test_domain_transforms_are_deterministic_and_do_what_they_say():
    x = np.random.default_rng(0).random((3, 1, 4, 4)).astype(np.float32)
    for name in ("identity", "rotate", "invert", "noise", "blur", "scale"):
        np.testing.assert_array_equal(transform(x, name, 5), transform(x, name, 5))
    np.testing.assert_array_equal(transform(x, "rotate", 0)[0, 0], np.rot90(x[0, 0]))
    np.testing.assert_allclose(transform(x, "invert", 0), 1 - x)
    assert not np.array_equal(transform(x, "noise", 1), transform(x, "noise", 2))
    flat = np.full((1, 1, 4, 4), 0.25, dtype=np.float32)
    np.testing.assert_allclose(transform(flat, "blur", 0), flat)  # a constant image stays
    np.testing.assert_allclose(transform(x, "scale", 0)[0, 0, 1:3, 1:3],
                               x[0, 0].reshape(2, 2, 2, 2).mean(axis=(1, 3)))  # 2x2 means, centred
    v = np.random.default_rng(1).standard_normal((5, 6)).astype(np.float32)
    np.testing.assert_allclose(np.linalg.norm(transform(v, "rotate", 3), axis=1), np.linalg.norm(v, axis=1), rtol=1e-5)
    np.testing.assert_array_equal(transform(v, "shift", 3), transform(v, "shift", 3))


def test_domain_split_holds_out_the_target_and_tests_on_it():
    rng = np.random.default_rng(0)
    train = ArrayDataset(rng.random((60, 1, 4, 4)).astype(np.float32), rng.integers(0, 3, 60), 3, "toy")
    test = ArrayDataset(rng.random((10, 1, 4, 4)).astype(np.float32), rng.integers(0, 3, 10), 3, "toy")
    split = domain_split(train, test, ["identity", "invert", "rotate"], "rotate", 4, seed=0)
    again = domain_split(train, test, ["identity", "invert", "rotate"], "rotate", 4, seed=0)
    assert len(split.clients) == 4 and all(np.array_equal(a, b) for a, b in zip(split.clients, again.clients))
    held = set(np.concatenate(split.clients).tolist())
    assert held.isdisjoint(split.target.tolist()) and len(held) + len(split.target) == 60
    assert split.target.tolist() == list(range(40, 60))  # the third share, the rotated one
    np.testing.assert_array_equal(split.test.x, np.rot90(test.x, axes=(2, 3)))
    np.testing.assert_array_equal(split.train.x[:20], train.x[np.random.default_rng([0, 27]).permutation(60)[:20]])


def test_the_stacked_matching_term_equals_each_clients_own():
    z = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    logits = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(1))
    embeddings = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(2))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.float32)
    hook = WorkspaceMatching(z, 0.5, [1.0, 2.0])
    stacked = stacked_extra_term(hook, {}, logits, mask, embeddings)
    torch.testing.assert_close(stacked[0], extra_term(hook, None, logits[0], embeddings[0]))
    torch.testing.assert_close(stacked[1], extra_term(hook, None, logits[1, :3], embeddings[1, :3]))
    torch.testing.assert_close(stacked[1], 0.5 * mk_mmd(embeddings[1, :3], z, [1.0, 2.0]))


def _plain_mk_mmd(x, y, scales):
    """MK-MMD^2 written out over the rows (lists of floats), as the module docstring states it."""
    pooled = x + y
    dist = [[sum((a - b) ** 2 for a, b in zip(u, v)) for v in pooled] for u in pooled]
    h = sum(map(sum, dist)) / (len(pooled) * (len(pooled) - 1))
    kern = [[sum(math.exp(-d / (s * h)) for s in scales) / len(scales) for d in row] for row in dist]
    n = len(x)

    def block(rows, cols):
        return sum(kern[i][j] for i in rows for j in cols) / (len(rows) * len(cols))

    return block(range(n), range(n)) + block(range(n, len(pooled)), range(n, len(pooled))) \
        - 2 * block(range(n), range(n, len(pooled)))


def _tiny_fedka(config):
    cfg = config("model.hidden=[6]")
    data = federated_data(cfg)
    return cfg, data, make_model(cfg.model, data.train, cfg.seed)


def test_the_clients_matching_term_is_mk_mmd_of_the_features_before_the_head(config):
    cfg, data, model = _tiny_fedka(config)
    x = torch.from_numpy(data.train.x[:9])
    y = torch.from_numpy(data.train.y[:9])
    z = torch.randn(5, 6, generator=torch.Generator().manual_seed(0))
    scales = [0.5, 1.0, 4.0]
    hook = WorkspaceMatching(z, 0.7, scales)
    loss, _ = build_objective(cfg, 9, (hook,))(model, x, y, torch.arange(9), torch.Generator().manual_seed(0))
    loss_alone, _ = build_objective(cfg, 9, ())(model, x, y, torch.arange(9), torch.Generator().manual_seed(0))
    features = model.features(x).detach()
    assert features.shape == (9, 6)  # the hidden layer, not the 10 logits
    expected = 0.7 * _plain_mk_mmd(features.double().tolist(), z.double().tolist(), scales)
    assert (loss - loss_alone).item() == pytest.approx(expected, rel=1e-4)


def test_the_server_workspace_is_the_global_models_features_of_the_target_inputs(config):
    cfg, data, model = _tiny_fedka(config)
    spec = ParamSpec.of(model)
    strategy = FedKA.from_experiment(cfg, spec, {i: i for i in range(4)}, _Everyone(4))
    strategy._global = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()
    z = torch.from_numpy(np.array(strategy.extra_content(1)[WORKSPACE]["z"].numpy()))
    assert z.shape == (cfg.strategy.workspace_size, 6)
    with torch.no_grad():
        torch.testing.assert_close(z, model.features(strategy.workspace_x))


def test_fedka_clients_trained_as_one_stack_equal_one_at_a_time(config):
    cfg, data, model = _tiny_fedka(config)
    clients = sorted((data.client(pid)[0] for pid in range(4)), key=lambda d: -local_steps(len(d.y), cfg.client))
    start_state = {k: v.clone() for k, v in model.state_dict().items()}
    z = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))
    alone = []
    for k, train_set in enumerate(clients):
        model.load_state_dict(start_state)
        objective = build_objective(cfg, len(train_set.y), (WorkspaceMatching(z, 1.0, [0.5, 1.0, 2.0]),))
        result = train_local(model, train_set, cfg.client, objective, torch.Generator().manual_seed(k), CPU)
        alone.append(({n: p.detach().clone() for n, p in model.named_parameters()}, result))
    start = {n: torch.stack([start_state[n]] * len(clients)) for n, _ in model.named_parameters()}
    objective = build_objective(cfg, 1, (WorkspaceMatching(z, 1.0, [0.5, 1.0, 2.0]),), per_sample=True)
    final, results = train_stacked(model, start, clients, [torch.Generator().manual_seed(k) for k in range(4)],
                                   cfg.client, objective, CPU)
    for k, (params, result) in enumerate(alone):
        for name, value in params.items():
            torch.testing.assert_close(final[name][k], value, rtol=0, atol=1e-5)
        assert math.isclose(results[k].loss, result.loss, rel_tol=1e-5)


@pytest.fixture
def config(tmp_path):
    def make(*overrides):
        return load_config(CONFIG, [f"output.dir={tmp_path / 'runs'}", "rounds=3", "output.plots=false",
                                    "client.local_epochs=1", *overrides])
    return make


class _Everyone:
    def __init__(self, n):
        self.n = n

    def sample(self, server_round):
        return list(range(self.n))


def test_fedka_server_step_is_fedavg_then_sgd_on_the_unanimous_votes(config):
    cfg = config("strategy.vote_from=1", "strategy.finetune_steps=3", "strategy.matching=false",
                 "strategy.vote_threshold=0.5")
    data = federated_data(cfg)
    net = make_model(cfg.model, data.train, cfg.seed)
    spec = ParamSpec.of(net)
    strategy = FedKA.from_experiment(cfg, spec, {i: i for i in range(4)}, _Everyone(4))
    w = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    strategy._global = w.clone()
    gen = torch.Generator().manual_seed(3)
    updates = [ClientUpdate(i, 10 + 5 * i, 0.3 * torch.randn(spec.dim, generator=gen), 0) for i in range(4)]
    got = strategy.aggregate_updates(1, updates)

    # the same by hand: example-weighted mean, each client model votes, SGD on the kept labels
    sizes = torch.tensor([10.0, 15.0, 20.0, 25.0])
    mean = sum(s * u.update for s, u in zip(sizes, updates)) / sizes.sum()
    x = torch.from_numpy(data.train.x[data.unlabelled[0]])

    def model_at(vector):
        model = copy.deepcopy(net)
        torch.nn.utils.vector_to_parameters(vector.float(), model.parameters())
        return model

    with torch.no_grad():
        votes = [model_at(w + u.update)(x).argmax(1).tolist() for u in updates]
    keep, labels = [], []
    for j in range(len(x)):
        counts = Counter(v[j] for v in votes)
        top = max(counts.values())
        if top >= 0.5 * 4:
            keep.append(j)
            labels.append(min(c for c, n in counts.items() if n == top))
    model = model_at(w + mean)
    sgd = torch.optim.SGD(model.parameters(), lr=cfg.strategy.finetune_lr)
    generator = torch.Generator().manual_seed(derive_seed(cfg.seed, "fedka-finetune", 1))
    xs, ys = x[keep], torch.tensor(labels)
    for _ in range(3):
        batch = torch.randint(len(ys), (min(32, len(ys)),), generator=generator)
        sgd.zero_grad()
        F.cross_entropy(model(xs[batch]), ys[batch]).backward()
        sgd.step()
    torch.testing.assert_close(got, torch.nn.utils.parameters_to_vector(model.parameters()).detach() - w,
                               atol=1e-5, rtol=0)


def test_fedka_with_matching_and_voting_off_is_fedavg(config):
    _, fedka = run_experiment(config("strategy={name: fedka, matching: false, voting: false}"))
    _, fedavg = run_experiment(config("strategy={name: fedavg}"))
    assert fedka["final_accuracy"] == fedavg["final_accuracy"] and fedka["final_loss"] == fedavg["final_loss"]


def test_a_resumed_fedka_run_continues_exactly(config):
    cfg = config("rounds=4", "output.checkpoint_every=2", "strategy.vote_from=2", "strategy.vote_threshold=0.5")
    path, _ = run_experiment(cfg)
    first = RunDir.open(path).rows()
    (RunDir.open(path).checkpoint_dir / "round-00004.pt").unlink()
    run_experiment(cfg, resume=path)
    again = RunDir.open(path).rows()
    assert [{k: v for k, v in r.items() if k != "wall_time_s"} for r in again] == \
        [{k: v for k, v in r.items() if k != "wall_time_s"} for r in first]


@pytest.mark.parametrize(("overrides", "message"), [
    (["partition={scheme: dirichlet, num_clients: 4}"],
     "partition.scheme: 'dirichlet'; strategy.name 'fedka' needs a held-out target domain"),
    (["strategy.voting=false", "strategy.finetune_steps=3"], "strategy: finetune_steps: 3 is not read with voting false"),
    (["partition.target_domain=rotate"], "partition.target_domain: 'rotate' is not one of partition.domains"),
    (["partition.num_clients=6"], "partition.num_clients: 6 clients over the 4 source domains of partition.domains"),
    (["data.name=synthetic"], "partition.domains: blur not a domain of data.name 'synthetic'"),
    (["strategy={name: fedavg}", "partition.alpha=0.3"], "partition.alpha: 0.3 is not read under partition.scheme"),
])
def test_misconfigurations_are_refused_in_one_line(config, overrides, message):
    with pytest.raises(ConfigError) as err:
        config(*overrides)
    assert message in str(err.value)
    assert len(str(err.value).splitlines()) == 1

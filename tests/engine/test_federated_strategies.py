"""Issue 6 end to end on the in-process grid: every strategy trains digits; the adapter
behaviours that only show in a federated run (Krum's assumed f, FedAU's weights, FedLEx's
phases, FedLD's client term); attacks on a fixed seeded set of Byzantine clients; the
participation models driving who trains, and a Markov-participation run resuming identically."""

from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord

from fedsim.algorithms.fedau import fedau_aggregate
from fedsim.algorithms.krum import krum, multi_krum
from fedsim.attacks import choose_byzantine
from fedsim.clients.quantization import build_codec
from fedsim.config import LinkSettings, load_config
from fedsim.loops.sync import build_strategy, label_mix, run_sync
from fedsim.outputs.results import RunDir
from fedsim.params import ParamSpec
from fedsim.runner import run_experiment
from fedsim.seeding import seed_everything
from fedsim.sim.client_app import ClientRuntime
from fedsim.sim.components import federated_data, make_model
from fedsim.sim.inprocess import InProcessGrid
from fedsim.sim.messaging import client_nodes
from fedsim.strategies.participation import BernoulliParticipation, build_sampler
from fedsim.strategies.replies import ClientUpdate, screen_train_replies

QUICKSTART = Path(__file__).parents[2] / "configs" / "quickstart.yaml"
FAST = ("sim.backend=inprocess", "eval.federated=false", "output.plots=false")


class RecordingGrid(InProcessGrid):
    """The in-process grid, keeping every (messages, replies) exchange of the run."""

    def __init__(self, runtime, num_nodes):
        super().__init__(runtime, num_nodes)
        self.exchanges = []

    def collect(self, messages, timeout):
        replies = super().collect(messages, timeout)
        self.exchanges.append((messages, replies))
        return replies


def recorded_run(cfg):
    """Run ``cfg`` through :func:`run_sync` on a :class:`RecordingGrid`; return the grid and rows."""
    seed_everything(cfg.seed)
    grid = RecordingGrid(ClientRuntime(cfg), cfg.partition.num_clients)
    run = RunDir.create(cfg)
    run_sync(grid, cfg, run, resume=False, show_progress=False)
    return grid, run.rows()


def train_exchanges(grid):
    return [(m, r) for m, r in grid.exchanges if m and m[0].metadata.message_type == "train"]


def strategy_with_grid(cfg):
    """A strategy built as the engine builds it, its grid, and the initial global arrays."""
    data = federated_data(cfg)
    model = make_model(cfg.model, data.train, cfg.seed)
    spec = ParamSpec.of(model)
    grid = InProcessGrid(ClientRuntime(cfg), cfg.partition.num_clients)
    node_of = client_nodes(grid, cfg.partition.num_clients, 10)
    return build_strategy(cfg, spec, node_of, label_mix(data)), grid, ArrayRecord(model.state_dict())


def offline_strategy(cfg):
    """A strategy over ``num_clients`` fake nodes, for calling its hooks directly."""
    data = federated_data(cfg)
    spec = ParamSpec.of(make_model(cfg.model, data.train, cfg.seed))
    node_of = {pid: 1000 + pid for pid in range(cfg.partition.num_clients)}
    return build_strategy(cfg, spec, node_of, label_mix(data)), spec


def fake_updates(ids, dim, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [ClientUpdate(partition_id=i, num_examples=10 + i, update=torch.randn(dim, generator=gen), nbytes=0)
            for i in ids]


# ----------------------------------------------------------------------------- strategies
@pytest.mark.parametrize("name, floor", [
    ("fedavg", 0.8), ("fedprox", 0.8), ("median", 0.7), ("trimmed_mean", 0.8), ("krum", 0.45),
    ("multikrum", 0.7), ("flag", 0.8), ("fedau", 0.8), ("fedld", 0.8), ("fedlex", 0.7),
])
def test_each_strategy_learns_digits_in_a_short_run(small_config, name, floor):
    # 10 clients, NIID-Bench's Dirichlet 0.5, 4 rounds of 5 local epochs: FedAvg reaches about
    # 0.84, the median and FedLEx about 0.73;
    # Krum follows one client's update per round, so it trails the others on non-IID data;
    # Multi-Krum averages the n - f best of 10 updates, f = 3 (the most Krum tolerates), about 0.75.
    path, summary = run_experiment(small_config(*FAST, "rounds=4", f"strategy.name={name}"))
    rows = RunDir.open(path).rows()
    assert summary["status"] == "completed" and len(rows) == 4
    assert all(not r["skipped"] and r["num_failed"] == 0 for r in rows)
    assert summary["final_accuracy"] >= floor
    assert rows[-1]["centralised_accuracy"] > rows[0]["centralised_accuracy"]


def test_krum_assumes_the_most_byzantine_replies_it_tolerates(small_config):
    """Unset, f is the largest Krum tolerates among the round's replies, floor((n - 3) / 2),
    whatever the attack (the rule a Flower app gets, which knows no attack fraction)."""
    strategy, spec = offline_strategy(small_config("strategy.name=krum", "attack.name=alie",
                                                   "attack.fraction=0.3"))
    assert [strategy.num_byzantine(1, n) for n in (10, 7, 3)] == [3, 2, 0]
    updates = fake_updates(range(10), spec.dim)
    stacked = torch.stack([u.update for u in updates])
    assert torch.equal(strategy.aggregate_updates(1, updates), krum(stacked, 3))
    fixed, _ = offline_strategy(small_config("strategy.name=krum", "strategy.num_byzantine=1",
                                             "attack.name=alie", "attack.fraction=0.3"))
    assert fixed.num_byzantine(1, 10) == 1


def test_krum_and_multikrum_skip_a_round_failures_leave_too_few_replies_for(small_config, caplog):
    """Validation keeps f and m within the clients a round asks; a round whose valid replies
    cannot hold them is skipped (the rule's guarantee does not hold there), as in a Flower app."""
    krum_strategy, spec = offline_strategy(small_config("strategy.name=krum", "strategy.num_byzantine=4"))
    updates = fake_updates([0, 2, 5], spec.dim)
    assert krum_strategy.aggregate_updates(3, updates) is None
    assert "Krum: 3 usable replies, not more than num_byzantine=4; round 3 skipped" in caplog.text
    multi, _ = offline_strategy(small_config("strategy.name=multikrum", "strategy.num_byzantine=1",
                                             "strategy.m=5"))
    assert multi.aggregate_updates(4, updates) is None
    assert "MultiKrum: 3 usable replies, fewer than m=5; round 4 skipped" in caplog.text
    stacked = torch.stack([u.update for u in updates])
    within, _ = offline_strategy(small_config("strategy.name=multikrum", "strategy.num_byzantine=1",
                                              "strategy.m=3"))
    torch.testing.assert_close(within.aggregate_updates(4, updates), multi_krum(stacked, 1, 3))


def test_fedau_known_weights_are_inverse_probabilities_over_all_clients(small_config):
    cfg = small_config("strategy.name=fedau", "strategy.weights=known", "participation.model=bernoulli",
                       "participation.p_low=0.1", "participation.p_high=0.9")
    strategy, spec = offline_strategy(cfg)
    p = strategy.engine.sampler.probabilities()
    ids = [1, 4, 7]
    updates = fake_updates(ids, spec.dim)
    strategy.observe(1, updates)
    got = strategy.aggregate_updates(1, updates)
    expected = sum(u.update / float(p[u.partition_id]) for u in updates) / cfg.partition.num_clients
    torch.testing.assert_close(got, expected)


def test_fedau_online_weights_start_at_one_and_divide_by_the_number_of_clients(small_config):
    cfg = small_config("strategy.name=fedau", "participation.model=bernoulli")
    strategy, spec = offline_strategy(cfg)
    n = cfg.partition.num_clients
    first = fake_updates([0, 3], spec.dim, seed=1)
    strategy.observe(1, first)
    torch.testing.assert_close(strategy.aggregate_updates(1, first), (first[0].update + first[1].update) / n)
    # client 0 took part in round 1, so its gap of 1 is closed; round 4 is its second
    # participation: omega = mean of the closed gaps = 1; client 5 comes for the first time.
    later = fake_updates([0, 5], spec.dim, seed=2)
    strategy.observe(4, later)
    torch.testing.assert_close(strategy.aggregate_updates(4, later),
                               fedau_aggregate(torch.stack([u.update for u in later]), [1.0, 1.0], n))


def test_fedau_under_bernoulli_participation_learns(small_config):
    for weights in ("online", "known"):
        path, summary = run_experiment(small_config(
            *FAST, "rounds=6", "strategy.name=fedau", f"strategy.weights={weights}",
            "participation.model=bernoulli", "participation.p_low=0.3", "participation.p_high=0.9"))
        assert summary["final_accuracy"] >= 0.7, weights


def test_fedlex_scouts_explore_then_everyone_trains_with_the_guidance(small_config):
    cfg = small_config(*FAST, "rounds=4", "strategy.name=fedlex", "strategy.explore_rounds=2",
                       "strategy.scouts=3", "client.local_epochs=2")
    grid, rows = recorded_run(cfg)
    assert [r["num_sampled"] for r in rows] == [3, 3, 10, 10]
    rounds = train_exchanges(grid)
    scouts = {m.metadata.dst_node_id for m in rounds[0][0]}
    assert len(scouts) == 3 and {m.metadata.dst_node_id for m in rounds[1][0]} == scouts
    for messages, _ in rounds[:2]:
        assert all("guidance" not in m.content.array_records for m in messages)

    data = federated_data(cfg)
    spec = ParamSpec.of(make_model(cfg.model, data.train, cfg.seed))
    for messages, replies in rounds[2:]:
        assert all("guidance" in m.content.array_records for m in messages)
        guidance = messages[0].content["guidance"].to_torch_state_dict()
        assert set(guidance) == set(spec.names)
        for values in guidance.values():
            assert float(values.min()) == 0.0 and float(values.max()) == 1.0  # not all ones
        # the clients multiplied their gradients by it: nothing moves where it is 0
        sent = {m.metadata.dst_node_id: int(m.content["config"]["partition-id"]) for m in messages}
        accepted, failures = screen_train_replies(replies, sent, spec.dim, build_codec(LinkSettings()))
        assert not failures and len(accepted) == 10
        for update in accepted:
            moved = spec.unflatten(update.update)
            for name, mask in guidance.items():
                assert torch.all(moved[name][mask == 0] == 0), name
                assert torch.any(moved[name][mask > 0] != 0), name
    assert rows[-1]["centralised_accuracy"] > 0.35  # from 0.1; 0.39 after 2 rounds of all clients


def test_fedld_clients_add_the_margin_regulariser(small_config):
    # One local step: the reported loss is the first batch's objective, on the same batch
    # and model for both strategies, so the difference is beta * log(1 + ||softmax||_F^2).
    common = ("client.local_steps=1", "client.batch_size=32")
    beta = 0.5
    fedld, grid, arrays = strategy_with_grid(small_config(*common, "strategy.name=fedld",
                                                          f"strategy.beta={beta}"))
    fedavg, plain_grid, _ = strategy_with_grid(small_config(*common, "strategy.name=fedavg"))
    with_term = list(fedld.configure_train(1, arrays, ConfigRecord(), grid))
    without = list(fedavg.configure_train(1, arrays, ConfigRecord(), plain_grid))
    assert all(float(m.content["config"]["fedld-beta"]) == beta for m in with_term)  # for a Flower app's clients
    assert all("fedld-beta" not in m.content["config"] for m in without)
    loss_with = [r.content["metrics"]["train_loss"] for r in grid.send_and_receive(with_term)]
    loss_without = [r.content["metrics"]["train_loss"] for r in plain_grid.send_and_receive(without)]
    batch, classes = 32, 10
    for a, b in zip(loss_with, loss_without, strict=True):
        # ||P||_F^2 of a batch of B rows lies in [B/C, B] (a client may hold fewer than B samples)
        assert beta * torch.log1p(torch.tensor(1.0 / classes)) < a - b <= beta * torch.log1p(torch.tensor(batch)) + 1e-5


# ------------------------------------------------------------------------------ attacks
def test_byzantine_clients_are_a_fixed_seeded_set(small_config):
    cfg = small_config("partition.num_clients=20", "attack.name=sign_flip", "attack.fraction=0.3")
    first, _ = offline_strategy(cfg)
    again, _ = offline_strategy(cfg)
    other, _ = offline_strategy(small_config("partition.num_clients=20", "attack.name=sign_flip",
                                             "attack.fraction=0.3", "seed=1"))
    assert first.engine.byzantine == again.engine.byzantine == set(choose_byzantine(20, 0.3, 0))
    assert len(first.engine.byzantine) == 6 and other.engine.byzantine != first.engine.byzantine


def test_update_attack_replaces_exactly_the_byzantine_rows_before_aggregation(small_config):
    cfg = small_config("client.local_steps=1", "attack.name=sign_flip", "attack.fraction=0.3",
                       "attack.scale=2.0")
    strategy, grid, arrays = strategy_with_grid(cfg)
    messages = list(strategy.configure_train(1, arrays, ConfigRecord(), grid))
    replies = list(grid.send_and_receive(messages))
    spec, global_flat = strategy.spec, strategy.spec.flatten(arrays.to_torch_state_dict())
    sent = {m.metadata.dst_node_id: int(m.content["config"]["partition-id"]) for m in messages}
    honest, _ = screen_train_replies(replies, sent, spec.dim, build_codec(LinkSettings()))
    new_arrays, _ = strategy.aggregate_train(1, replies)
    flipped = torch.stack([-2.0 * u.update if u.partition_id in strategy.engine.byzantine else u.update for u in honest])
    weights = torch.tensor([float(u.num_examples) for u in honest])
    expected = global_flat + (weights / weights.sum()) @ flipped
    torch.testing.assert_close(spec.flatten(new_arrays.to_torch_state_dict()), expected)
    assert len(strategy.engine.byzantine) == 3


def test_sign_flip_at_30_percent_breaks_fedavg_but_not_flag_or_median(small_config):
    # With the default scale 1, 3 flipped of 10 clients only slow FedAvg down (the mean keeps
    # 40% of the honest direction) and it still learns at this scale; scale 4 reverses the
    # mean, so FedAvg climbs the loss while Flag and the median keep learning.
    finals = {}
    for name in ("fedavg", "flag", "median"):
        _, summary = run_experiment(small_config(
            *FAST, "rounds=6", "client.local_epochs=3", f"strategy.name={name}",
            "attack.name=sign_flip", "attack.fraction=0.3", "attack.scale=4"))
        finals[name] = summary["final_accuracy"]
    assert finals["fedavg"] <= 0.25, finals
    assert finals["flag"] >= 0.35 and finals["median"] >= 0.35, finals


@pytest.fixture(scope="module")
def trained_arrays(tmp_path_factory):
    """The global model of a short clean FedAvg run (about 0.84 test accuracy)."""
    cfg = load_config(QUICKSTART, [*FAST, "rounds=4", f"output.dir={tmp_path_factory.mktemp('runs')}"])
    path, summary = run_experiment(cfg)
    assert summary["final_accuracy"] > 0.8
    return ArrayRecord(RunDir.open(path).latest_checkpoint().model)


def test_label_flip_makes_the_byzantine_clients_train_on_flipped_labels(small_config, trained_arrays):
    # From a model that knows the digits, one local step's batch accuracy is high against the
    # true labels and near zero against y -> 9 - y.
    cfg = small_config("client.local_steps=1", "attack.name=label_flip", "attack.fraction=0.3")
    strategy, grid, _ = strategy_with_grid(cfg)
    messages = list(strategy.configure_train(1, trained_arrays, ConfigRecord(), grid))
    accuracy = {int(m.content["config"]["partition-id"]): float(r.content["metrics"]["train_accuracy"])
                for m, r in zip(messages, grid.send_and_receive(messages), strict=True)}
    assert strategy.engine.attack is None and len(strategy.engine.byzantine) == 3
    for pid, acc in accuracy.items():
        if pid in strategy.engine.byzantine:
            assert acc <= 0.2, (pid, acc)
        else:
            assert acc >= 0.5, (pid, acc)


# ------------------------------------------------------------------------ participation
@pytest.mark.parametrize("settings, varies", [
    (("participation.model=uniform", "strategy.fraction_train=0.5"), False),
    (("participation.model=bernoulli", "participation.p_low=0.1", "participation.p_high=0.9"), True),
    (("participation.model=bernoulli", "participation.tied_to_labels=true", "participation.p_mean=0.4",
      "participation.p_low=0.1"), True),
    (("participation.model=markov", "participation.p_low=0.2", "participation.p_high=0.9",
      "participation.p_off_to_on=0.3"), True),
    (("participation.model=cyclic", "participation.num_groups=3"), True),
], ids=["uniform", "bernoulli", "bernoulli-tied", "markov", "cyclic"])
def test_participation_model_drives_the_sampled_clients(small_config, settings, varies):
    cfg = small_config(*FAST, "rounds=6", "client.local_epochs=1", *settings)
    grid, rows = recorded_run(cfg)
    # with federated evaluation off, one training exchange per round
    trained = [sorted(int(m.content["config"]["partition-id"]) for m in msgs) for msgs, _ in train_exchanges(grid)]
    sampler = build_sampler(cfg, label_mix(federated_data(cfg)))
    expected = [sampler.sample(t) for t in range(1, 7)]
    assert trained == expected
    assert [r["num_sampled"] for r in rows] == [len(s) for s in expected]
    assert [r["skipped"] for r in rows] == [len(s) == 0 for s in expected]
    assert (len({len(s) for s in expected}) > 1) == varies
    if cfg.participation.model == "uniform":
        assert all(len(s) == 5 for s in expected)
    if cfg.participation.model == "cyclic":  # every client exactly once per cycle of 3 rounds
        assert sorted(sum(expected[:3], [])) == list(range(10)) and expected[3:] == expected[:3]
    if cfg.participation.tied_to_labels:
        tied = BernoulliParticipation.from_label_distribution(
            label_mix(federated_data(cfg)), mean_probability=0.4, min_probability=0.1, seed=cfg.seed)
        assert sampler.probabilities() == pytest.approx(tied.probabilities())


def test_markov_participation_with_fedau_resumes_identically(small_config):
    cfg = small_config(*FAST, "rounds=6", "client.local_epochs=1", "output.checkpoint_every=3",
                       "strategy.name=fedau", "participation.model=markov", "participation.p_low=0.2",
                       "participation.p_high=0.9", "participation.p_off_to_on=0.3")
    reference, _ = run_experiment(cfg)
    interrupted, _ = run_experiment(cfg)
    run = RunDir.open(interrupted)
    (run.checkpoint_dir / "round-00006.pt").unlink()
    state = run.latest_checkpoint().strategy
    assert state["sampler"]["round"] == 3 and "fedau_weights" in state
    run_experiment(cfg, resume=interrupted)

    def trace(path):
        return [(r["round"], r["num_sampled"], r["centralised_accuracy"]) for r in RunDir.open(path).rows()]

    assert trace(interrupted) == trace(reference)
    assert len({n for _, n, _ in trace(reference)}) > 1

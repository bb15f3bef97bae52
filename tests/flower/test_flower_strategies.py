"""fedsim.flower: fedsim's aggregators as Flower strategies.

Each strategy's ``aggregate_train`` on a fixed set of replies must equal the pure function
on the stacked updates (the one fedsim's engine uses); bad replies are dropped and the
round goes on where Flower's FedAvg raises; FedAU's weights follow the nodes across rounds.
"""

import inspect
import logging
import random

import numpy as np
import pytest
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.serverapp.exception import InconsistentMessageReplies
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

import fedsim.flower as ff
from fedsim.algorithms.fedau import FedAUConfig, fedau_aggregate
from fedsim.algorithms.fedld import FedLDConfig, fedld_aggregate
from fedsim.algorithms.fedlex import FedLExConfig, guidance_matrix
from fedsim.algorithms.flag import FlagConfig, flag_aggregate
from fedsim.algorithms.krum import (
    KrumConfig,
    MultiKrumConfig,
    krum,
    krum_max_byzantine,
    multi_krum,
)
from fedsim.algorithms.median import coordinate_median
from fedsim.algorithms.trimmed_mean import TrimmedMeanConfig, trimmed_mean
from fedsim.sim.inprocess import InProcessGrid
from fedsim.sim.messaging import FIRST_NODE_ID
from fedsim.strategies.aggregate import weighted_mean

NUM_NODES = 7
NODES = list(range(FIRST_NODE_ID, FIRST_NODE_ID + NUM_NODES))
SHAPES = {"layer.weight": (4, 3), "layer.bias": (4,)}


class AppGrid(InProcessGrid):
    """Flower's ClientApp ``app`` served in this process for ``num_nodes`` nodes, each with its
    own Context, as Flower's simulation engine serves it."""

    def __init__(self, app: ClientApp, num_nodes: int) -> None:
        super().__init__(runtime=None, num_partitions=num_nodes)
        self.app = app
        self.contexts: dict[int, Context] = {}

    def _deliver(self, batch):
        for msg in batch:
            pid = self.partition_of(msg)
            context = self.contexts.setdefault(pid, Context(
                run_id=1, node_id=msg.metadata.dst_node_id, state=RecordDict(), run_config={},
                node_config={"partition-id": pid, "num-partitions": self.num_partitions}))
            try:
                reply = self.app(msg, context)
            except Exception as exc:  # a failing ClientApp is an error reply, as under Ray
                error = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(exc).__name__}: {exc}")
                reply = Message(error, reply_to=msg)
            self._replies[msg.metadata.message_id] = reply


def _grid(num_nodes: int = NUM_NODES) -> AppGrid:
    """A grid whose nodes are never called here (the replies are built by hand)."""
    return AppGrid(ClientApp(), num_nodes)


def _global(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    state = {name: torch.randn(shape, generator=generator) for name, shape in SHAPES.items()}
    state["steps"] = torch.tensor(7, dtype=torch.int64)  # an integer buffer: never aggregated
    return state


def _updates(seed: int = 1, nodes=NODES) -> dict[int, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return {node: {name: torch.randn(shape, generator=generator) for name, shape in SHAPES.items()}
            for node in nodes}


def _reply(node: int, content: RecordDict | None = None, error: str | None = None) -> Message:
    metadata = Metadata(run_id=1, message_id="", src_node_id=node, dst_node_id=0, reply_to_message_id="x",
                        group_id="", created_at=0.0, ttl=100.0, message_type="train")
    if error is not None:
        return Message(metadata=metadata,
                       error=Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=error))
    return Message(metadata=metadata, content=content)


def _train_reply(node: int, state: dict[str, torch.Tensor], num_examples: float = 10, **metrics) -> Message:
    record = MetricRecord({"num-examples": num_examples, "train_loss": (node % 7) / 10, **metrics})
    return _reply(node, RecordDict({"arrays": ArrayRecord(state), "metrics": record}))


def _trained(global_state, update):
    return {**global_state, **{name: global_state[name] + update[name] for name in SHAPES}}


def _stack(updates, nodes):
    return torch.stack([torch.cat([updates[n][name].reshape(-1) for name in SHAPES]) for n in nodes])


def _examples(node: int) -> int:
    return 5 + 3 * (node - FIRST_NODE_ID)


def _as_state(vector: torch.Tensor, global_state) -> dict[str, torch.Tensor]:
    out, offset = dict(global_state), 0
    for name, shape in SHAPES.items():
        size = int(np.prod(shape))
        out[name] = global_state[name] + vector[offset:offset + size].reshape(shape)
        offset += size
    return out


def _fedld_reference(stacked, weights):
    layers = [stacked[:, :12].reshape(-1, 4, 3), stacked[:, 12:]]
    return torch.cat([t.reshape(-1) for t in fedld_aggregate(layers, weights, keep=0.5)])


# strategy, and the pure function on (stacked updates (N, D), weights (N,), N nodes)
CASES = {
    "fedavg": (lambda: ff.FedAvg(), lambda u, w, n: weighted_mean(u, w)),
    "median": (lambda: ff.Median(), lambda u, w, n: coordinate_median(u)),
    "trimmed_mean": (lambda: ff.TrimmedMean(beta=0.2), lambda u, w, n: trimmed_mean(u, 0.2)),
    "krum": (lambda: ff.Krum(num_byzantine=1), lambda u, w, n: krum(u, 1)),
    "krum_default_f": (lambda: ff.Krum(), lambda u, w, n: krum(u, krum_max_byzantine(u.shape[0]))),
    "multikrum": (lambda: ff.MultiKrum(num_byzantine=1, m=3), lambda u, w, n: multi_krum(u, 1, 3)),
    "multikrum_default_m": (lambda: ff.MultiKrum(), lambda u, w, n: multi_krum(u, krum_max_byzantine(u.shape[0]))),
    "flag": (lambda: ff.Flag(r=2), lambda u, w, n: flag_aggregate(u, r=2)),
    "fedau": (lambda: ff.FedAU(K=5), lambda u, w, n: fedau_aggregate(u, torch.ones(u.shape[0]), num_clients=n)),
    "fedld": (lambda: ff.FedLD(keep=0.5), lambda u, w, n: _fedld_reference(u, w)),
    # round 1, momentum buffer m = delta: w + 1.0 * delta
    "fedlex": (lambda: ff.FedLEx(explore_rounds=3, scouts=NUM_NODES), lambda u, w, n: weighted_mean(u, w)),
}


def _round_one(strategy, replies):
    """configure_train (remembers the global arrays) then aggregate_train, as start() does."""
    global_state = _global()
    list(strategy.configure_train(1, ArrayRecord(global_state), ConfigRecord(), _grid()))
    return global_state, strategy.aggregate_train(1, replies)


@pytest.mark.parametrize("make, reference", CASES.values(), ids=CASES.keys())
def test_aggregate_train_equals_the_pure_function_on_the_stacked_updates(make, reference):
    global_state, updates = _global(), _updates()
    replies = [_train_reply(n, _trained(global_state, updates[n]), _examples(n)) for n in NODES]
    random.Random(0).shuffle(replies)  # arrival order does not matter: rows are sorted by node id
    _, (arrays, metrics) = _round_one(make(), replies)
    weights = torch.tensor([float(_examples(n)) for n in NODES], dtype=torch.float64)
    expected = _as_state(reference(_stack(updates, NODES), weights, NUM_NODES), global_state)
    got = arrays.to_torch_state_dict()
    assert list(got) == list(global_state)  # the global model's keys, in its order
    for name in SHAPES:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)
    assert got["steps"].dtype == torch.int64 and int(got["steps"]) == 7
    flower_metrics = aggregate_metricrecords([m.content for m in replies], "num-examples")
    assert metrics["train_loss"] == pytest.approx(flower_metrics["train_loss"])


def _bad_replies(global_state, updates):
    """Good replies from NODES[:4]; every other node's reply is broken in its own way."""
    good = [_train_reply(n, _trained(global_state, updates[n]), _examples(n)) for n in NODES[:4]]
    nan = _trained(global_state, updates[NODES[4]])
    nan["layer.bias"] = nan["layer.bias"] * float("nan")
    short = _trained(global_state, updates[NODES[5]])
    short["layer.weight"] = short["layer.weight"][:2]
    bad = [
        _train_reply(NODES[4], nan),
        _train_reply(NODES[5], short),
        _reply(NODES[6], error="ClientAppException: out of memory"),
        _train_reply(9001, {name: global_state[name] for name in SHAPES}),  # no 'steps'
        _reply(9002, RecordDict({"arrays": ArrayRecord(global_state), "metrics": MetricRecord({"loss": 1.0})})),
        _train_reply(9003, global_state, num_examples=0),
        _train_reply(9004, global_state, extra_metric=1.0),  # its MetricRecord differs from the others'
    ]
    return good, bad


REASONS = {
    NODES[4]: "array 'layer.bias' holds NaN or Inf",
    NODES[5]: "array 'layer.weight' has shape (2, 3), expected (4, 3)",
    NODES[6]: "client error: ClientAppException: out of memory",
    9001: "arrays do not match the global model's: missing ['steps'], unexpected []",
    9002: "its MetricRecord has no 'num-examples'",
    9003: "'num-examples' must be a positive number, got 0",
    9004: "its MetricRecord (['extra_metric', 'num-examples', 'train_loss']) differs in form from the other "
          "replies' (['num-examples', 'train_loss'])",
}


@pytest.mark.parametrize("make, reference", CASES.values(), ids=CASES.keys())
def test_bad_replies_are_dropped_with_a_warning_and_the_round_goes_on(make, reference, caplog):
    global_state, updates = _global(), _updates()
    good, bad = _bad_replies(global_state, updates)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        _, (arrays, _) = _round_one(make(), bad[:3] + good + bad[3:])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for node, reason in REASONS.items():
        assert f"node {node}: reply dropped: {reason}" in warnings
    weights = torch.tensor([float(_examples(n)) for n in NODES[:4]], dtype=torch.float64)
    expected = _as_state(reference(_stack(updates, NODES[:4]), weights, NUM_NODES), global_state)
    got = arrays.to_torch_state_dict()
    for name in SHAPES:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)


def test_a_float64_model_is_aggregated_in_float64():
    # updates of 1e-9 on weights near 1 vanish in float32 (spacing 1.2e-7 there)
    global_state = {"w": torch.ones(5, dtype=torch.float64)}
    updates = {n: torch.full((5,), 1e-9 * (1 + n - FIRST_NODE_ID), dtype=torch.float64) for n in NODES[:3]}
    strategy = ff.FedAvg()
    list(strategy.configure_train(1, ArrayRecord(global_state), ConfigRecord(), _grid()))
    arrays, _ = strategy.aggregate_train(1, [_train_reply(n, {"w": 1.0 + updates[n]}) for n in NODES[:3]])
    got = arrays.to_torch_state_dict()["w"]
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, 1.0 + torch.full((5,), 2e-9, dtype=torch.float64), rtol=1e-15, atol=1e-15)


def test_flowers_fedavg_ends_the_round_on_the_same_bad_replies():
    global_state, updates = _global(), _updates()
    good, bad = _bad_replies(global_state, updates)
    with pytest.raises(InconsistentMessageReplies):
        FedAvg().aggregate_train(1, good + bad)


def test_a_round_without_a_usable_reply_keeps_the_global_model():
    global_state, updates = _global(), _updates()
    _, bad = _bad_replies(global_state, updates)
    _, (arrays, metrics) = _round_one(ff.Flag(), bad[:3])
    assert arrays is None and metrics is None


def test_evaluation_replies_are_screened_too(caplog):
    def evaluation(node, **metrics):
        return _reply(node, RecordDict({"metrics": MetricRecord(metrics)}))

    replies = [evaluation(1, **{"num-examples": 10, "accuracy": 0.5}),
               evaluation(2, **{"num-examples": 30, "accuracy": 0.9}),
               evaluation(3, accuracy=0.1),
               _reply(4, error="timeout")]
    with caplog.at_level(logging.WARNING, logger="flwr"):
        metrics = ff.Median().aggregate_evaluate(1, replies)
    assert metrics["accuracy"] == pytest.approx((10 * 0.5 + 30 * 0.9) / 40)
    assert "node 3: reply dropped: its MetricRecord has no 'num-examples'" in caplog.text
    assert "node 4: reply dropped: client error: timeout" in caplog.text


def test_fedau_weights_follow_the_nodes_across_rounds():
    # Nodes a, b, c (N = 3) take part in rounds {a, b}, {a}, {b, c}, {a, b, c}. A node's weight
    # is the mean of its gaps closed before the round (1 before any). Round 4:
    # a: gaps 1, 1 -> 1;  b: gaps 1, 2 -> 1.5;  c: gap 3 -> 3.  With K = 2, c's open gap is
    # recorded as 2 when it reaches 2 (end of round 2), so c weighs 2 in round 3, and round
    # 3 closes a gap of 1: 1.5 in round 4.
    a, b, c = NODES[:3]
    participation = [[a, b], [a], [c, b], [b, c, a]]  # c and b reply out of node order
    for K, omega in ((50, {3: {c: 1.0}, 4: {a: 1.0, b: 1.5, c: 3.0}}),
                     (2, {3: {c: 2.0}, 4: {a: 1.0, b: 1.5, c: 1.5}})):
        strategy, grid = ff.FedAU(K=K, min_available_nodes=3), _grid(3)
        global_state = _global()
        for server_round, nodes in enumerate(participation, start=1):
            updates = _updates(seed=server_round, nodes=nodes)
            list(strategy.configure_train(server_round, ArrayRecord(global_state), ConfigRecord(), grid))
            replies = [_train_reply(n, _trained(global_state, updates[n])) for n in nodes]
            if server_round == 2:  # b's reply is broken: b does not take part in round 2
                replies.append(_reply(b, error="crashed"))
            arrays, _ = strategy.aggregate_train(server_round, replies)
            ordered = sorted(nodes)
            weights = torch.tensor([omega.get(server_round, {}).get(n, 1.0) for n in ordered])
            expected = _as_state(fedau_aggregate(_stack(updates, ordered), weights, num_clients=3), global_state)
            got = arrays.to_torch_state_dict()
            for name in SHAPES:
                torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)
            global_state = got
        assert strategy.index == {a: 0, b: 1, c: 2}


def test_fedld_sends_beta_to_the_clients():
    messages = list(ff.FedLD(beta=0.05).configure_train(1, ArrayRecord(_global()), ConfigRecord(), _grid()))
    assert len(messages) == NUM_NODES
    assert all(m.content["config"]["fedld-beta"] == 0.05 for m in messages)


def test_fedlex_explores_with_scouts_then_sends_their_guidance():
    random.seed(0)
    strategy, grid = ff.FedLEx(explore_rounds=2, scouts=3, server_opt={"name": "momentum", "momentum": 0.5}), _grid()
    global_state, momentum = _global(), None
    for server_round in (1, 2):
        messages = list(strategy.configure_train(server_round, ArrayRecord(global_state), ConfigRecord(), grid))
        scouts = sorted(m.metadata.dst_node_id for m in messages)
        assert len(scouts) == 3 and scouts == strategy.scouts  # the same scouts in every exploration round
        assert all("guidance" not in m.content for m in messages)
        updates = _updates(seed=server_round, nodes=scouts)
        trained = {n: _trained(global_state, updates[n]) for n in scouts}
        arrays, _ = strategy.aggregate_train(server_round, [_train_reply(n, trained[n]) for n in scouts])
        delta = weighted_mean(_stack(updates, scouts), [10.0] * 3)
        momentum = delta if momentum is None else 0.5 * momentum + delta  # FedAvgM, lr 1
        expected = _as_state(momentum, global_state)
        got = arrays.to_torch_state_dict()
        for name in SHAPES:
            torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)
        base, global_state = global_state, got
    messages = list(strategy.configure_train(3, ArrayRecord(global_state), ConfigRecord(), grid))
    assert sorted(m.metadata.dst_node_id for m in messages) == NODES  # FedAvg's sampling again
    expected_guidance = guidance_matrix({k: base[k] for k in SHAPES}, [{k: trained[n][k] for k in SHAPES}
                                                                       for n in scouts])
    for message in messages:
        sent = message.content["guidance"].to_torch_state_dict()
        assert sorted(sent) == sorted(SHAPES)
        for name in SHAPES:
            torch.testing.assert_close(sent[name], expected_guidance[name])


def test_krum_skips_a_round_with_too_few_replies_for_its_num_byzantine(caplog):
    global_state, updates = _global(), _updates()
    replies = [_train_reply(n, _trained(global_state, updates[n])) for n in NODES[:2]]
    with caplog.at_level(logging.WARNING, logger="flwr"):
        _, (arrays, metrics) = _round_one(ff.Krum(num_byzantine=2), replies)
    assert arrays is None and metrics is not None
    assert "Krum: 2 usable replies, not more than num_byzantine=2; round 1 skipped" in caplog.text


OWN_DEFAULTS = {
    ff.FedAU: (FedAUConfig, ["K"]),
    ff.FedLD: (FedLDConfig, ["keep", "beta"]),
    ff.FedLEx: (FedLExConfig, ["explore_rounds", "scouts"]),
    ff.Flag: (FlagConfig, ["r", "lam", "max_iter", "tol"]),
    ff.TrimmedMean: (TrimmedMeanConfig, ["beta"]),
    ff.Krum: (KrumConfig, ["num_byzantine"]),
    ff.MultiKrum: (MultiKrumConfig, ["num_byzantine", "m"]),
}


@pytest.mark.parametrize("cls", OWN_DEFAULTS, ids=lambda c: c.__name__)
def test_own_arguments_default_to_fedsims_config_and_flowers_are_unchanged(cls):
    section, names = OWN_DEFAULTS[cls]
    parameters = inspect.signature(cls).parameters
    assert {name: parameters[name].default for name in names} == {
        name: section.model_fields[name].default for name in names}
    strategy = cls(0.5, 0.25, 3, min_available_nodes=4, weighted_by_key="n")  # FedAvg's, positional too
    assert (strategy.fraction_train, strategy.fraction_evaluate, strategy.min_train_nodes,
            strategy.min_available_nodes, strategy.weighted_by_key) == (0.5, 0.25, 3, 4, "n")
    assert isinstance(strategy, FedAvg)


@pytest.mark.parametrize("make, message", [
    (lambda: ff.Flag(r=0), "Flag: r: Input should be greater than or equal to 1 (got 0)"),
    (lambda: ff.TrimmedMean(beta=0.5), "TrimmedMean: beta: Input should be less than 0.5 (got 0.5)"),
    (lambda: ff.FedLD(keep=0.0), "FedLD: keep: Input should be greater than 0 (got 0.0)"),
    (lambda: ff.FedAU(K=0), "FedAU: K: Input should be greater than or equal to 1 (got 0)"),
    (lambda: ff.MultiKrum(m=0), "MultiKrum: m: Input should be greater than or equal to 1 (got 0)"),
    (lambda: ff.FedLEx(server_opt={"name": "momentum", "momentum": 1.0}),
     "FedLEx: server_opt.momentum: Input should be less than 1 (got 1.0)"),
])
def test_bad_own_arguments_are_refused_naming_them(make, message):
    with pytest.raises(ValueError) as err:
        make()
    assert str(err.value) == message


def _faulty_client_app(short: bool = True) -> ClientApp:
    """Nodes move their arrays towards a common target; partition 1 sends NaN, partition 2 a
    short array (when ``short``)."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context) -> Message:
        pid = int(context.node_config["partition-id"])
        state = msg.content["arrays"].to_torch_state_dict()
        state["layer.weight"] = 0.5 * state["layer.weight"] + 0.5 * (1.0 + 0.01 * pid)
        if pid == 1:
            state["layer.bias"] = torch.full((4,), float("nan"))
        if pid == 2 and short:
            state["layer.weight"] = state["layer.weight"][:3]
        metrics = MetricRecord({"num-examples": 10 + pid, "train_loss": 1.0})
        return Message(RecordDict({"arrays": ArrayRecord(state), "metrics": metrics}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context) -> Message:
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": 5, "accuracy": 0.5})}), reply_to=msg)

    return app


@pytest.mark.parametrize("make", [
    lambda: ff.Median(), lambda: ff.TrimmedMean(), lambda: ff.Krum(), lambda: ff.MultiKrum(), lambda: ff.Flag(),
    lambda: ff.FedAU(), lambda: ff.FedLD(), lambda: ff.FedLEx(explore_rounds=1, scouts=4),
], ids=["median", "trimmed_mean", "krum", "multikrum", "flag", "fedau", "fedld", "fedlex"])
def test_strategy_start_runs_to_the_end_with_faulty_nodes(make):
    grid = AppGrid(_faulty_client_app(), 6)
    result = make().start(grid, ArrayRecord(_global()), num_rounds=3)
    final = result.arrays.to_torch_state_dict()
    assert all(bool(torch.isfinite(v.float()).all()) for v in final.values())
    assert not torch.equal(final["layer.weight"], _global()["layer.weight"])
    assert sorted(result.train_metrics_clientapp) == [1, 2, 3]
    assert result.evaluate_metrics_clientapp[3]["accuracy"] == pytest.approx(0.5)


def test_flowers_fedavg_does_not_survive_the_same_faulty_nodes():
    with pytest.raises(ValueError, match="could not be broadcast"):  # the short array ends the run
        FedAvg().start(AppGrid(_faulty_client_app(), 6), ArrayRecord(_global()), num_rounds=1)
    result = FedAvg().start(AppGrid(_faulty_client_app(short=False), 6), ArrayRecord(_global()), num_rounds=1)
    assert torch.isnan(result.arrays.to_torch_state_dict()["layer.bias"]).all()  # NaN poisons the model


def test_the_sample_size_is_taken_once_min_available_nodes_have_connected(monkeypatch):
    """Nodes still connecting when round 1 starts (2 of 4 seen first): fraction_train 1.0 with
    min_available_nodes 4 trains all 4, where Flower's FedAvg counts the 2 before it waits."""
    grid = _grid(4)
    seen = iter([[1, 2], [1, 2], [1, 2, 3, 4]])
    monkeypatch.setattr(grid, "get_node_ids", lambda: next(seen, [1, 2, 3, 4]))
    monkeypatch.setattr("flwr.serverapp.strategy.strategy_utils.sleep", lambda seconds: None)
    strategy = ff.FedAvg(fraction_train=1.0, min_available_nodes=4)
    assert sorted(strategy.participants(1, grid)) == [1, 2, 3, 4]

"""Flat parameter vectors, reply screening and server optimizers."""

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    Error,
    Message,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.common.constant import ErrorCode

from fedsim.algorithms.api import ServerOptConfig
from fedsim.config import load_config
from fedsim.outputs import results
from fedsim.outputs.results import RunDir
from fedsim.params import ParamSpec, get_flat, set_flat
from fedsim.quant import codecs
from fedsim.runner import run_experiment
from fedsim.strategies.aggregate import weighted_mean
from fedsim.strategies.replies import (
    Failure,
    LocalReply,
    TrainReply,
    screen_model_reply,
    screen_replies,
    screen_train_replies,
)
from fedsim.strategies.server_opt import ServerOptimizer

QUICKSTART = Path(__file__).parents[2] / "configs" / "quickstart.yaml"


def test_flatten_round_trip_skips_integer_buffers():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    spec = ParamSpec.of(model)
    assert "1.num_batches_tracked" not in spec.names
    assert spec.dim == 3 * 2 + 2 + 2 * 4  # linear w, b; bn weight, bias, running mean, var
    vec = torch.arange(spec.dim, dtype=torch.float32)
    set_flat(model, spec, vec)
    assert torch.equal(get_flat(model, spec), vec)
    layers = spec.split_layers(vec[None].repeat(2, 1))
    assert [tuple(t.shape) for t in layers][0] == (2, 2, 3)
    assert torch.equal(spec.join_layers([t[0] for t in layers]), vec)


def test_buffers_take_the_aggregate_as_it_is_and_only_parameters_the_server_optimizer():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    spec = ParamSpec.of(model)
    assert spec.buffers == {"1.running_mean", "1.running_var"}
    mask = spec.parameter_mask()
    assert mask.dtype == torch.bool and int(mask.sum()) == spec.dim - 4
    x = get_flat(model, spec)  # running_var starts at 1
    delta = torch.full((spec.dim,), -0.01)
    opt = ServerOptimizer(ServerOptConfig(name="adam", lr=1.0))
    stepped = opt.step(x, delta, mask)
    # Adam's first step: m = 0.1 d, v = 0.01 d^2, x + lr m / (sqrt(v) + eps) = x - 0.5 here; a
    # running variance of 1 would lose half; the buffers take x + delta, the clients' mean
    step = 0.1 * -0.01 / ((0.01 * 0.01**2) ** 0.5 + 1e-3)
    torch.testing.assert_close(stepped[mask], x[mask] + step)
    torch.testing.assert_close(stepped[~mask], x[~mask] - 0.01)
    assert torch.count_nonzero(opt.m[~mask]) == 0 and torch.count_nonzero(opt.v[~mask]) == 0
    no_mask = ServerOptimizer(ServerOptConfig(name="adam", lr=1.0)).step(x, delta)
    torch.testing.assert_close(no_mask, x + step)  # every entry steps


def test_flatten_rows_is_flatten_of_each_row():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.ReLU(), torch.nn.Linear(2, 4))
    spec = ParamSpec.of(model)
    stacked = {name: torch.randn(5, *p.shape, generator=torch.Generator().manual_seed(i))
               for i, (name, p) in enumerate(model.named_parameters())}
    rows = spec.flatten_rows(stacked)
    assert rows.shape == (5, spec.dim)
    for k in range(5):
        assert torch.equal(rows[k], spec.flatten({name: value[k] for name, value in stacked.items()}))
    with pytest.raises(ValueError, match="rows of shape"):
        spec.flatten_rows({**stacked, "0.weight": torch.zeros(5, 3, 2)})


def test_flatten_rejects_wrong_shapes():
    spec = ParamSpec(("w",), ((2, 2),))
    with pytest.raises(ValueError, match="shape"):
        spec.flatten({"w": torch.zeros(3)})
    with pytest.raises(ValueError, match="model has 4"):
        spec.unflatten(torch.zeros(5))


IDENTITY = codecs.build("identity")


def _reply(node: int, update, num_examples=10, error: str | None = None, record: str = "update") -> Message:
    md = Metadata(run_id=1, message_id="", src_node_id=node, dst_node_id=0, reply_to_message_id="x",
                  group_id="", created_at=0.0, ttl=100.0, message_type="train")
    if error:
        return Message(metadata=md,
                       error=Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=error))
    payload = IDENTITY.encode(torch.tensor(update, dtype=torch.float32))
    arrays = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in payload.to_arrays().items()})
    content = RecordDict({record: arrays, "metrics": MetricRecord({"num-examples": num_examples})})
    return Message(metadata=md, content=content)


def test_screening_rejects_bad_replies_and_names_the_client():
    sent = {101: 0, 102: 1, 103: 2, 104: 3, 105: 4, 106: 5}
    replies = [
        _reply(106, [1.0, 2.0, 3.0]),
        _reply(101, [1.0, 2.0, 3.0]),
        _reply(102, [1.0, float("nan"), 3.0]),
        _reply(103, [1.0, 2.0]),
        _reply(104, [1.0, 2.0, 3.0], error="boom"),
        _reply(999, [1.0, 2.0, 3.0]),  # not asked this round: ignored
    ]
    accepted, failures = screen_train_replies(replies, sent, dim=3, codec=IDENTITY)
    assert [u.partition_id for u in accepted] == [0, 5]  # sorted by partition id
    assert accepted[0].nbytes == 6 + 3 * 4  # header + three float32 values
    reasons = {f.partition_id: f.reason for f in failures}
    assert "NaN" in reasons[1]
    assert "shape (2,)" in reasons[2]
    assert "boom" in reasons[3]
    assert reasons[4] == "no reply before the timeout"
    assert all(isinstance(f, Failure) for f in failures)


def _request(node: int) -> Message:
    md = Metadata(run_id=1, message_id=f"m{node}", src_node_id=0, dst_node_id=node, reply_to_message_id="",
                  group_id="", created_at=0.0, ttl=100.0, message_type="train")
    return Message(metadata=md, content=RecordDict())


def _train_reply(update) -> TrainReply:
    payload = IDENTITY.encode(torch.tensor(update, dtype=torch.float32))
    extra = {"control": ArrayRecord({"c": Array(np.arange(3, dtype=np.float32))}),
             "feature-metrics": MetricRecord({"drift": 0.25, "train_loss": 9.0, "histogram": [1, 2]})}
    return TrainReply(payload, {"num-examples": 7, "train_loss": 0.5, "steps": 3}, extra)


def test_a_local_reply_screens_exactly_as_the_records_it_stands_for():
    sent = {101: 0, 102: 1, 103: 2}
    updates = {101: [1.0, -2.0, 3.5], 102: [1.0, float("inf"), 3.0], 103: [1.0, 2.0]}
    local = [LocalReply(_train_reply(u), reply_to=_request(node)) for node, u in updates.items()]
    sent_as_records = [Message(content=_train_reply(u).content(), reply_to=_request(node))
                       for node, u in updates.items()]
    assert all(reply.unread() is not None for reply in local)  # screening reads no records
    fast, fast_failures = screen_train_replies(local, sent, dim=3, codec=IDENTITY)
    assert all(reply.unread() is not None for reply in local)
    slow, slow_failures = screen_train_replies(sent_as_records, sent, dim=3, codec=IDENTITY)
    assert [(u.partition_id, u.num_examples, u.nbytes, u.metrics) for u in fast] == \
        [(u.partition_id, u.num_examples, u.nbytes, u.metrics) for u in slow]
    assert torch.equal(fast[0].update, torch.tensor([1.0, -2.0, 3.5]))
    assert fast[0].metrics == {"num-examples": 7.0, "train_loss": 9.0, "steps": 3.0, "drift": 0.25}
    assert fast_failures == slow_failures
    assert [f.reason for f in fast_failures] == ["update holds NaN or Inf", "update has shape (2,), expected (3,)"]


def test_a_local_reply_is_an_ordinary_reply_once_its_content_is_read():
    request = _request(101)
    reply = LocalReply(_train_reply([1.0, 2.0, 3.0]), reply_to=request)
    assert reply.metadata.reply_to_message_id == "m101" and reply.metadata.src_node_id == 101
    content = reply.content
    assert list(content) == ["update", "metrics", "control", "feature-metrics"]
    assert reply.unread() is None and reply.content is content  # built once
    assert content["metrics"]["num-examples"] == 7
    assert torch.equal(IDENTITY.decode(IDENTITY.from_arrays({k: v.numpy() for k, v in content["update"].items()})),
                       torch.tensor([1.0, 2.0, 3.0]))
    content["update"] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in
                                     IDENTITY.encode(torch.tensor([0.0, 0.0, 1.0])).to_arrays().items()})
    accepted, _ = screen_train_replies([reply], {101: 0}, dim=3, codec=IDENTITY)  # what the records now hold
    assert torch.equal(accepted[0].update, torch.tensor([0.0, 0.0, 1.0]))
    replaced = LocalReply(_train_reply([1.0, 2.0, 3.0]), reply_to=request)
    replaced.content = RecordDict({"metrics": MetricRecord({"num-examples": 1})})
    assert screen_train_replies([replaced], {101: 0}, dim=3, codec=IDENTITY)[1] == [
        Failure(0, "reply has no 'update' record")]


def test_rows_are_fsynced_before_each_checkpoint_and_at_the_end_not_per_round(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(results.os, "fsync", synced.append)
    written = []
    save = RunDir.save_checkpoint

    def save_checkpoint(run, ckpt):
        path = save(run, ckpt)
        written.append((ckpt.round, len(synced)))
        return path

    monkeypatch.setattr(RunDir, "save_checkpoint", save_checkpoint)
    cfg = load_config(QUICKSTART, [f"output.dir={tmp_path}", "rounds=5", "output.checkpoint_every=2",
                                   "sim.backend=inprocess", "client.local_epochs=1", "eval.federated=false",
                                   "output.plots=false"])
    path, _ = run_experiment(cfg)
    assert len(RunDir.open(path).rows()) == 5
    assert written == [(2, 1), (4, 2), (5, 3)]  # each checkpoint's writing fsyncs the rows once
    assert len(synced) == 4  # three checkpoints and the end of the run, not one per round


def test_model_replies_need_a_whole_finite_model_but_no_examples():
    sent = {101: 0, 102: 1, 103: 2, 104: 3}
    replies = [_reply(101, [1.0, 2.0, 3.0], num_examples=0, record="model"),
               _reply(102, [1.0, float("inf"), 3.0], record="model"),
               _reply(103, [1.0, 2.0, 3.0, 4.0], record="model"),
               _reply(104, [1.0, 2.0, 3.0])]  # a training reply is not a model
    accepted, failures = screen_replies(replies, sent, lambda msg, pid: screen_model_reply(msg, pid, dim=3))
    assert [u.partition_id for u in accepted] == [0]
    assert torch.equal(accepted[0].update, torch.tensor([1.0, 2.0, 3.0]))
    assert [f.reason for f in failures] == ["model holds NaN or Inf", "model has shape (4,), expected (3,)",
                                            "reply has no 'model' record"]


def test_weighted_mean_is_example_weighted():
    updates = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert torch.allclose(weighted_mean(updates, torch.tensor([3.0, 1.0])), torch.tensor([0.75, 0.25]))


def test_server_momentum_and_adam_match_hand_computation():
    x = torch.zeros(2)
    d = torch.tensor([1.0, -2.0])
    mom = ServerOptimizer(ServerOptConfig(name="momentum", lr=0.5, momentum=0.9))
    x1 = mom.step(x, d)
    x2 = mom.step(x1, d)
    assert torch.allclose(x2, 0.5 * d + 0.5 * (0.9 * d + d))
    adam = ServerOptimizer(ServerOptConfig(name="adam", lr=0.1, beta1=0.9, beta2=0.99, eps=1e-3))
    y = adam.step(x, d)
    m, v = 0.1 * d, 0.01 * d**2
    assert torch.allclose(y, 0.1 * m / (v.sqrt() + 1e-3))
    state = adam.state_dict()
    other = ServerOptimizer(ServerOptConfig(name="adam", lr=0.1, beta1=0.9, beta2=0.99, eps=1e-3))
    other.load_state_dict(state)
    assert torch.equal(other.step(y, d), adam.step(y, d))


def test_server_adagrad_and_yogi_match_hand_computation_over_two_rounds():
    """Reddi et al. (arXiv 2003.00295), Algorithm 2: v <- v + d^2 (FedAdagrad), v <- v -
    (1 - b2) d^2 sign(v - d^2) (FedYogi); m and the step as FedAdam's."""
    x, d1, d2 = torch.zeros(2), torch.tensor([1.0, -2.0]), torch.tensor([0.5, 4.0])
    lr, b1, b2, eps = 0.1, 0.9, 0.99, 1e-3
    m1, m2 = (1 - b1) * d1, b1 * (1 - b1) * d1 + (1 - b1) * d2
    for name, v1, v2 in (
            ("adagrad", d1**2, d1**2 + d2**2),
            # round 1: v = 0 < d^2, so v grows by (1 - b2) d^2; round 2: the first entry's v
            # (0.01) is below d2^2 (0.25) and grows, the second's (0.04) is below 16 and grows
            ("yogi", (1 - b2) * d1**2, (1 - b2) * d1**2 + (1 - b2) * d2**2)):
        opt = ServerOptimizer(ServerOptConfig(name=name, lr=lr, beta1=b1, beta2=b2, eps=eps))
        y1 = opt.step(x, d1)
        assert torch.allclose(y1, lr * m1 / (v1.sqrt() + eps)), name
        assert torch.allclose(opt.step(y1, d2), y1 + lr * m2 / (v2.sqrt() + eps)), name
    # Yogi's v shrinks towards a smaller d^2 by at most (1 - b2) d^2, where Adam's decays by b2
    yogi, adam = (ServerOptimizer(ServerOptConfig(name=n, beta2=b2)) for n in ("yogi", "adam"))
    big, small = torch.tensor([20.0]), torch.tensor([1.0])
    for opt in (yogi, adam):
        opt.step(x[:1], big)
        opt.step(x[:1], small)
    v1 = (1 - b2) * big**2
    assert torch.allclose(yogi.v, v1 - (1 - b2) * small**2)  # v = 4 > d^2 = 1: it shrinks, to 3.99
    assert torch.allclose(adam.v, b2 * v1 + (1 - b2) * small**2)


def test_fedadagrad_and_fedyogi_learn_digits_at_their_default_server_learning_rates(tmp_path):
    """The quickstart, 10 rounds: FedAdagrad (lr 0.1) and FedYogi (lr 0.01) pass 0.8 (FedAvg
    is at ~0.95 by then; adaptive steps of ~lr per coordinate are slower here); FedYogi
    follows FedAdam closely, as v starts at 0 in both, but not to the letter."""
    rows = {}
    for name in ("adagrad", "yogi", "adam"):
        cfg = load_config(QUICKSTART, [f"strategy.server_opt.name={name}", "rounds=10", "sim.backend=inprocess",
                                       "eval.federated=false", "output.plots=false",
                                       f"output.dir={tmp_path / name}"])
        path, summary = run_experiment(cfg)
        assert summary["status"] == "completed"
        rows[name] = RunDir.open(path).rows()
    assert rows["adagrad"][-1]["centralised_accuracy"] >= 0.8 and rows["yogi"][-1]["centralised_accuracy"] >= 0.8
    assert [r["centralised_loss"] for r in rows["yogi"]] != [r["centralised_loss"] for r in rows["adam"]]

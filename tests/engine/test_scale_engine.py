"""The scale engine: clients trained together (stacked models), the batched backend, group
messages, and federations of 10,000 clients.

The stacked trainer must compute what ``train_local`` computes client by client; the
batched backend must give the in-process backend's numbers; grouped delivery must keep
failures per client.
"""

import logging
import math

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.supercore.task_identity import TaskIdentity

from fedsim.algorithms.fedld import FedLDRegulariser
from fedsim.algorithms.fedlex import GuidanceMask
from fedsim.algorithms.fedprox import ProximalTerm
from fedsim.algorithms.scaffold import ScaffoldCorrection
from fedsim.clients import batched
from fedsim.clients.batched import per_sample_loss, train_stacked, vectorisable_reason
from fedsim.clients.hooks import ClientHook, vectorises
from fedsim.clients.train import local_steps, train_local
from fedsim.config import ConfigError, validate_config
from fedsim.losses import REGISTRY
from fedsim.outputs.results import RunDir
from fedsim.runner import run_experiment
from fedsim.sim import group_messages
from fedsim.sim.client_app import Outcome
from fedsim.sim.components import build_objective, federated_data, make_model
from fedsim.sim.messaging import FIRST_NODE_ID
from fedsim.sim.ray_nodes import GroupedGrid

CPU = torch.device("cpu")


def _clients(cfg, count):
    """``count`` clients of ``cfg``'s partition, in decreasing order of local steps."""
    data = federated_data(cfg)
    train_sets = [data.client(pid)[0] for pid in range(count)]
    return sorted(train_sets, key=lambda d: -local_steps(len(d.y), cfg.client))


def _hooks(kind, params, shape_of):
    if kind == "prox":
        return (ProximalTerm(0.1, params),)
    if kind == "fedld":
        return (FedLDRegulariser(0.03),)
    if kind == "guidance":
        gen = torch.Generator().manual_seed(5)
        return (GuidanceMask({name: torch.rand(shape, generator=gen) for name, shape in shape_of.items()}),)
    return ()


CASES = {
    "mlp-sgd-momentum-wd": ({"client": {"local_epochs": 2, "momentum": 0.9, "weight_decay": 1e-3}}, "prox", 1e-6),
    "mlp-adam": ({"client": {"local_epochs": 2, "optimizer": "adam", "lr": 0.01}}, "fedld", 1e-5),
    "mlp-steps-guidance": ({"client": {"local_steps": 6, "batch_size": 8}}, "guidance", 1e-6),
    "cnn-sgd": ({"model": {"name": "cnn"}, "client": {"local_steps": 3, "batch_size": 16, "momentum": 0.5}},
                "prox", 1e-4),
    "mlp-harmonic": ({"loss": {"name": "harmonic"}, "client": {"local_epochs": 1}}, None, 1e-6),
}


@pytest.mark.parametrize("overrides, hook, atol", CASES.values(), ids=CASES.keys())
def test_stacked_training_equals_training_each_client_alone(overrides, hook, atol, monkeypatch):
    shrinks = []  # the stack drops the leaves of finished clients (optimizer state sliced alike)
    monkeypatch.setattr(batched, "_shrunk", lambda *a, _real=batched._shrunk: shrinks.append(a[2]) or _real(*a))
    cfg = validate_config({"partition": {"num_clients": 6}, **overrides})
    model = make_model(cfg.model, federated_data(cfg).train, cfg.seed)
    start_state = {k: v.clone() for k, v in model.state_dict().items()}
    shapes = {name: p.shape for name, p in model.named_parameters()}
    clients = _clients(cfg, 6)
    assert len({len(d.y) for d in clients}) > 1  # unequal sizes: padded, masked batches
    alone = []
    for k, train_set in enumerate(clients):
        model.load_state_dict(start_state)
        hooks = _hooks(hook, {n: p.detach().clone() for n, p in model.named_parameters()}, shapes)
        result = train_local(model, train_set, cfg.client, build_objective(cfg, len(train_set.y), hooks),
                             torch.Generator().manual_seed(k), CPU)
        alone.append(({n: p.detach().clone() for n, p in model.named_parameters()}, result))

    start = {n: torch.stack([start_state[n]] * len(clients)) for n in shapes}
    final, results = train_stacked(model, start, clients, [torch.Generator().manual_seed(k) for k in range(6)],
                                   cfg.client, build_objective(cfg, 1, _hooks(hook, start, shapes), per_sample=True),
                                   CPU)
    for k, (params, result) in enumerate(alone):
        for name, value in params.items():
            torch.testing.assert_close(final[name][k], value, rtol=0, atol=atol)
        assert (results[k].steps, results[k].num_examples, results[k].accuracy) == \
            (result.steps, result.num_examples, result.accuracy)
        assert math.isclose(results[k].loss, result.loss, rel_tol=1e-5)
    if "local_epochs" in overrides["client"]:  # unequal step counts: rows finish early
        assert shrinks and shrinks[-1] < 6


def test_stacked_scaffold_corrects_each_row_with_its_own_control_variate():
    """SCAFFOLD's stacked correction, g_k - c_k + c with every client's own c_k, trains each
    row as that client trains alone (rows finishing early included)."""
    cfg = validate_config({"partition": {"num_clients": 6}, "strategy": {"name": "scaffold"},
                           "client": {"local_epochs": 2, "momentum": 0.9}})
    model = make_model(cfg.model, federated_data(cfg).train, cfg.seed)
    start_state = {k: v.clone() for k, v in model.state_dict().items()}
    shapes = {name: p.shape for name, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(3)
    c_global = {n: 0.1 * torch.randn(shape, generator=gen) for n, shape in shapes.items()}
    c_local = [{n: 0.1 * torch.randn(shape, generator=gen) for n, shape in shapes.items()} for _ in range(6)]
    clients = _clients(cfg, 6)
    alone = []
    for k, train_set in enumerate(clients):
        model.load_state_dict(start_state)
        hooks = (ScaffoldCorrection(c_local[k], c_global),)
        train_local(model, train_set, cfg.client, build_objective(cfg, len(train_set.y), hooks),
                    torch.Generator().manual_seed(k), CPU)
        alone.append({n: p.detach().clone() for n, p in model.named_parameters()})
    start = {n: torch.stack([start_state[n]] * len(clients)) for n in shapes}
    stacked_hook = ScaffoldCorrection({n: torch.stack([c[n] for c in c_local]) for n in shapes}, c_global)
    final, _ = train_stacked(model, start, clients, [torch.Generator().manual_seed(k) for k in range(6)], cfg.client,
                             build_objective(cfg, 1, (stacked_hook,), per_sample=True), CPU)
    for k, params in enumerate(alone):
        for name, value in params.items():
            torch.testing.assert_close(final[name][k], value, rtol=0, atol=1e-6)


def test_stacked_training_needs_clients_in_decreasing_order_of_steps():
    cfg = validate_config({"partition": {"num_clients": 6}})
    model = make_model(cfg.model, federated_data(cfg).train, cfg.seed)
    clients = _clients(cfg, 6)[::-1]
    start = {n: torch.stack([p.detach()] * 6) for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="decreasing order of local steps"):
        train_stacked(model, start, clients, [torch.Generator() for _ in clients], cfg.client,
                      build_objective(cfg, 1, per_sample=True), CPU)


def test_step_rows_place_each_clients_batch_at_its_rows_and_mask_the_padding():
    gen = torch.Generator().manual_seed(3)
    sizes = [9, 4, 1, 7]
    schedules = [[torch.randperm(n, generator=gen)[: min(n, 5)], torch.randperm(n, generator=gen)[:2]] for n in sizes]
    offsets = [0, 9, 13, 14]
    for step, active in ((0, 4), (1, 3)):
        index, mask = batched._step_rows(schedules, offsets, step, active, batch_size=6)
        expected_index, expected_mask = torch.zeros(active, 6, dtype=torch.long), torch.zeros(active, 6)
        for k in range(active):  # the reference: one row at a time
            batch = schedules[k][step]
            expected_index[k, : len(batch)] = batch + offsets[k]
            expected_mask[k, : len(batch)] = 1.0
        assert torch.equal(index, expected_index) and torch.equal(mask, expected_mask)
        assert mask.dtype == torch.float32


def test_every_per_sample_loss_gives_per_sample_terms_under_vmap():
    logits, targets = torch.randn(3, 5, 4), torch.randint(0, 4, (3, 5))
    embeddings, classifier = torch.randn(3, 5, 6), torch.randn(3, 4, 6)
    for name in filter(per_sample_loss, REGISTRY):
        loss = REGISTRY[name](reduction="none")
        available = {"logits": logits, "targets": targets, "embeddings": embeddings, "classifier": classifier}
        inputs = {k: available[k] for k in loss.inputs}
        batched = torch.func.vmap(lambda kw: loss(**kw))(inputs)
        for k in range(3):
            one = loss(**{key: value[k] for key, value in inputs.items()})
            assert one.shape == (5,), name
            torch.testing.assert_close(batched[k], one, msg=name)


def test_what_cannot_vectorise_says_why():
    def reason(**raw):
        cfg = validate_config(raw)
        return vectorisable_reason(cfg, make_model(cfg.model, federated_data(cfg).train, cfg.seed))

    assert reason() is None
    assert "quant.qat" in reason(quant={"qat": {"weight_bits": 8}})
    assert "quant.lowbit" in reason(quant={"lowbit": {"bits": 8}})
    assert "loss.name: 'dice'" in reason(loss={"name": "dice"})
    assert "loss.name: 'aldr_kl'" in reason(loss={"name": "aldr_kl"})  # per-sample state
    assert "loss.name: 'linear_cross_entropy'" in reason(loss={"name": "linear_cross_entropy"})
    assert "BatchNorm" in reason(model={"name": "resnet8"})

    class OneSided(ClientHook):
        def extra_loss(self, model, logits):
            return logits.sum()

    assert not vectorises(OneSided())
    assert all(vectorises(h) for h in (ProximalTerm(0.1, {}), FedLDRegulariser(0.1), GuidanceMask({})))


def test_a_group_message_carries_each_shared_record_once_and_each_clients_state():
    shared = ArrayRecord({"w": torch.ones(3)})
    states = {4: RecordDict({"partition-4/memory": ArrayRecord({"e": torch.full((2,), 4.0)})}), 9: RecordDict()}
    members = [(pid, RecordDict({"arrays": shared, "config": ConfigRecord({"partition-id": pid})}), states[pid])
               for pid in (4, 9)]
    packed = group_messages.pack_members("train", members)
    assert sum(1 for record in packed.array_records.values() if record is shared) == 1
    message_type, unpacked = group_messages.unpack_members(packed)
    assert message_type == "train" and [pid for pid, _, _ in unpacked] == [4, 9]
    assert all(content["arrays"] is shared for _, content, _ in unpacked)
    assert [int(content["config"]["partition-id"]) for _, content, _ in unpacked] == [4, 9]
    assert [list(state) for _, _, state in unpacked] == [["partition-4/memory"], []]
    answered = group_messages.MemberReply(4, RecordDict({"arrays": shared}), state=unpacked[0][2])
    raised = group_messages.MemberReply(9, None, ErrorCode.CLIENT_APP_RAISED_EXCEPTION, "ValueError: bad",
                                        RecordDict())
    replies = group_messages.unpack_replies(group_messages.pack_replies([answered, raised]))
    assert replies[0].content["arrays"] is shared and replies[1].content is None
    assert (replies[1].code, replies[1].reason) == (ErrorCode.CLIENT_APP_RAISED_EXCEPTION, "ValueError: bad")
    assert replies[0].state["partition-4/memory"]["e"].numpy().tolist() == [4.0, 4.0]
    assert not len(replies[1].state)


class _RefusingEngineGrid:
    """A simulation engine's grid with two nodes that accepts no message."""

    def get_node_ids(self):
        return [7, 8]

    def push_messages(self, messages):
        return []

    def pull_messages(self, message_ids):
        return []


@pytest.fixture
def server_task(monkeypatch):
    """This process is a ServerApp's task, whose messages take their sender from its identity."""
    for name, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", SUPERLINK_NODE_ID)):
        monkeypatch.setattr(TaskIdentity, name, value)


def _train_messages(pids) -> list[Message]:
    return [Message(RecordDict(), dst_node_id=FIRST_NODE_ID + pid, message_type="train") for pid in pids]


def test_failed_members_carry_flowers_error_codes(server_task):
    raised = Outcome(None, ValueError("bad"), 0.1).member_reply(3, timeout_s=10.0)
    late = Outcome(RecordDict(), None, 11.0).member_reply(3, timeout_s=10.0)
    assert raised.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert late.code == ErrorCode.REPLY_MESSAGE_UNAVAILABLE
    grid = GroupedGrid(_RefusingEngineGrid(), num_partitions=4, clients_per_node=2)
    grid.partition_nodes(wait_s=1.0)
    replies = grid.collect(_train_messages(range(4)), timeout=1.0)
    assert [reply.error.code for reply in replies] == [ErrorCode.NODE_UNAVAILABLE] * 4


def test_only_the_first_push_of_grouped_nodes_waits_for_the_workers_to_start(server_task):
    grid = GroupedGrid(_RefusingEngineGrid(), num_partitions=4, clients_per_node=2)
    grid.partition_nodes(wait_s=30.0)
    grid.push_messages(_train_messages(range(4)))
    assert grid.allowance(2.0) == grid.allowance(2.0) == 32.0  # asking twice spends nothing
    grid.push_messages(_train_messages(range(2)))
    assert grid.allowance(2.0) == 2.0


def _rows(cfg):
    path, summary = run_experiment(cfg)
    return RunDir.open(path).rows(), summary


BACKEND_CASES = {
    "mlp-fedavg": ("model.name=mlp", "strategy.name=fedavg"),
    "mlp-fedprox": ("model.name=mlp", "strategy.name=fedprox", "strategy.mu=0.1"),
    "mlp-median": ("model.name=mlp", "strategy.name=median"),
    "cnn-fedavg": ("model.name=cnn", "strategy.name=fedavg", "client.local_epochs=1"),
    "cnn-fedprox": ("model.name=cnn", "strategy.name=fedprox", "strategy.mu=0.1", "client.local_epochs=1"),
    "cnn-median": ("model.name=cnn", "strategy.name=median", "client.local_epochs=1"),
    "mlp-scaffold": ("model.name=mlp", "strategy.name=scaffold"),
    "mlp-fedlex": ("model.name=mlp", "strategy.name=fedlex", "strategy.explore_rounds=1", "strategy.scouts=3"),
}


@pytest.mark.parametrize("sets", BACKEND_CASES.values(), ids=BACKEND_CASES.keys())
def test_the_batched_backend_gives_the_numbers_of_the_inprocess_backend(small_config, sets):
    common = ("rounds=3", "output.plots=false", "eval.federated=false", *sets)
    batched, _ = _rows(small_config("sim.backend=batched", *common))
    alone, _ = _rows(small_config("sim.backend=inprocess", *common))
    assert len(batched) == len(alone) == 3
    for b, a in zip(batched, alone, strict=True):
        assert abs(b["centralised_accuracy"] - a["centralised_accuracy"]) <= 0.01
        assert math.isclose(b["centralised_loss"], a["centralised_loss"], rel_tol=0.01)
        assert math.isclose(b["train_loss"], a["train_loss"], rel_tol=0.01)
        assert (b["num_success"], b["bytes_up"], b["bytes_down"]) == (a["num_success"], a["bytes_up"], a["bytes_down"])


def test_the_batched_backend_trains_one_client_at_a_time_where_it_must(small_config, caplog):
    common = ("rounds=2", "output.plots=false", "eval.federated=false", "loss.name=dice")
    with caplog.at_level(logging.WARNING, logger="fedsim.runner"):
        batched, _ = _rows(small_config("sim.backend=batched", *common))
    assert "loss.name: 'dice' is not a mean of per-sample terms" in caplog.text
    alone, _ = _rows(small_config("sim.backend=inprocess", *common))
    assert [r["centralised_loss"] for r in batched] == [r["centralised_loss"] for r in alone]


def test_batched_failures_stay_per_client(small_config):
    rows, summary = _rows(small_config(
        "sim.backend=batched", "rounds=2", "partition.num_clients=6", "faults.crash=[1]", "faults.nan=[2]",
        "faults.wrong_shape=[3]", "faults.slow=[4]", "faults.slow_s=60", "client.timeout_s=10",
        "eval.federated=false", "output.plots=false"))
    reasons = {f["client"]: f["reason"] for f in rows[0]["failures"]}
    assert "crashed" in reasons[1] and "NaN" in reasons[2] and "shape" in reasons[3]
    assert reasons[4] == "no reply before the timeout"
    assert rows[0]["num_success"] == 2 and rows[0]["num_failed"] == 4
    assert summary["status"] == "completed"


def test_ten_thousand_clients_run_one_round(small_config):
    cfg = small_config("sim.backend=batched", "rounds=1", "data.name=synthetic", "data.synthetic.dim=10",
                       "partition.scheme=natural", "partition.num_clients=10000", "strategy.fraction_train=0.002",
                       "eval.federated=false", "output.plots=false", "client.local_epochs=1")
    assert cfg.data.synthetic.num_devices == 10000
    rows, summary = _rows(cfg)
    assert summary["status"] == "completed"
    assert rows[0]["num_sampled"] == 20 and rows[0]["num_success"] == 20
    assert np.isfinite(rows[0]["centralised_loss"])


def test_configs_that_cannot_hold_are_refused_at_validation():
    with pytest.raises(ConfigError, match="clients_per_node: groups clients on Flower nodes under backend 'ray'"):
        validate_config({"sim": {"backend": "batched", "clients_per_node": 4}})
    with pytest.raises(ConfigError, match="a natural partition has one per group and data.synthetic.num_devices is 30"):
        validate_config({"data": {"name": "synthetic", "synthetic": {"num_devices": 30}},
                         "partition": {"scheme": "natural", "num_clients": 50}})
    with pytest.raises(ConfigError, match="natural client ids, which data.name digits does not have"):
        validate_config({"partition": {"scheme": "natural"}})
    natural = validate_config({"data": {"name": "synthetic"}, "partition": {"scheme": "natural", "num_clients": 77}})
    assert natural.data.synthetic.num_devices == 77
    assert validate_config({"data": {"name": "synthetic"}}).data.synthetic.num_devices == 30


def test_a_round_too_large_for_one_stack_trains_in_several(small_config, monkeypatch):
    common = ("sim.backend=batched", "rounds=2", "output.plots=false", "eval.federated=false")
    whole, _ = _rows(small_config(*common))
    monkeypatch.setattr("fedsim.clients.batched.MAX_STACKED_VALUES", 3 * 9610)  # 3 digits MLPs a stack
    split, _ = _rows(small_config(*common))
    for a, b in zip(whole, split, strict=True):
        assert math.isclose(a["centralised_loss"], b["centralised_loss"], rel_tol=1e-4)
        assert a["bytes_up"] == b["bytes_up"]

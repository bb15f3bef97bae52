"""Personalized FL (``personalization:``): each method's client update rule pinned against a
plain-PyTorch computation over two rounds, its validation, exact resume with its personal
state, and the batched backend against one client at a time.

The client runtime is driven directly for one client; full-batch steps (``client.batch_size``
above the client's examples) make the reference independent of the batch order.
"""

import math

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from torch.nn import functional as F

from fedsim.algorithms.scaffold import control_variate_update, decode_vector, encode_vector
from fedsim.clients.personalization import PERSONAL_KEY, Personalization, in_layers
from fedsim.clients.training_features import stacked_reason
from fedsim.config import ConfigError
from fedsim.outputs.results import RunDir
from fedsim.records import to_state_dict
from fedsim.runner import run_experiment
from fedsim.sim.client_app import ClientRuntime, Member, worker
from fedsim.strategies.evaluation import ClientEvaluation, federated_metrics
from fedsim.strategies.new_clients import NEW_CLIENT, held_out_clients

PID = 1
STEPS = 3
LR = 0.05
CLIENT = ("sim.backend=inprocess", "partition.num_clients=4", f"client.local_steps={STEPS}",
          "client.batch_size=100000", f"client.lr={LR}", "client.momentum=0", "model.name=mlp", "model.hidden=[16]")


def _decode(runtime, reply):
    arrays = {name: array.numpy() for name, array in reply.content()["update"].items()}
    return runtime.uplink.codec.decode(runtime.uplink.codec.from_arrays(arrays))


def _client_rounds(cfg, rounds=2):
    """(global models, sent updates, personal states, personal accuracies) of client PID
    alone over ``rounds`` rounds, its update applied as the new global model (FedAvg of one)."""
    runtime = ClientRuntime(cfg)
    w = worker(runtime.cfg_json)
    state, global_state = {}, {k: v.clone() for k, v in w.model.state_dict().items()}
    globals_, updates, personal, accuracies = [], [], [], []
    for server_round in range(1, rounds + 1):
        globals_.append(global_state)
        content = RecordDict({"arrays": ArrayRecord(global_state), "config": ConfigRecord({"server-round": server_round})})
        outcome = runtime.run("train", [Member(PID, content, state)])[0]
        assert outcome.error is None, outcome.error
        update = _decode(runtime, outcome.reply)
        updates.append(update)
        personal.append(to_state_dict(state[PERSONAL_KEY]) if PERSONAL_KEY in state else None)
        global_state = {**global_state, **w.spec.unflatten(w.spec.flatten(global_state) + update)}
        evaluation = runtime.run("evaluate", [Member(PID, RecordDict({"arrays": ArrayRecord(global_state),
                                                                      "config": content["config"]}), state)])[0]
        accuracies.append(evaluation.reply["metrics"]["personal_accuracy"])
    return w, globals_, updates, personal, accuracies


def _data(w, split, server_round=1):
    data = w.data.client(PID, server_round)[split]
    return torch.as_tensor(data.x, dtype=torch.float32), torch.as_tensor(data.y, dtype=torch.long)


def _sgd(w, state, steps, trains=lambda step, name: True, extra=lambda params: 0.0, server_round=1):
    """Plain full-batch SGD from ``state``: ``trains(step, name)`` says which parameters move."""
    model = w.model
    model.load_state_dict(state)
    model.train()
    x, y = _data(w, 0, server_round)
    for step in range(steps):
        model.zero_grad()
        params = dict(model.named_parameters())
        loss = F.cross_entropy(model(x), y) + extra(params)
        loss.backward()
        with torch.no_grad():
            for name, p in params.items():
                if trains(step, name):
                    p -= LR * p.grad
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _accuracy(w, state):
    w.model.load_state_dict(state)
    w.model.eval()
    x, y = _data(w, 1)
    with torch.no_grad():
        return (w.model(x).argmax(1) == y).float().mean().item()


def _layers(w):
    """The personal layers of the run's personalization feature."""
    return next(feature.head for feature in w.features if isinstance(feature, Personalization))


def _head_split(w, update):
    mask = torch.cat([torch.full((size,), in_layers(name, _layers(w)))
                      for name, size in zip(w.spec.names, w.spec.sizes, strict=True)])
    return update[mask], update[~mask]


def _personal_head_rule(small_config, method, trains, *sets):
    """The rule fedper and fedrep share: train from the global body and the client's own head
    (``trains`` picks the parameters of each step), keep the head, send the body's update."""
    client = [c for c in CLIENT if not c.startswith("model.hidden")] if "model.name=resnet8" in sets else CLIENT
    w, globals_, updates, personal, accuracies = _client_rounds(small_config(*client, f"personalization.method={method}",
                                                                             *sets))
    head = None
    for r, (global_state, update) in enumerate(zip(globals_, updates, strict=True)):
        start = {**global_state, **(head or {})}
        trained = _sgd(w, start, STEPS, trains, server_round=r + 1)
        head = {k: v for k, v in trained.items() if in_layers(k, _layers(w)) and v.is_floating_point()}
        sent_head, sent_body = _head_split(w, update)
        assert torch.count_nonzero(sent_head) == 0
        expected = w.spec.flatten(trained) - w.spec.flatten(start)
        torch.testing.assert_close(sent_body, _head_split(w, expected)[1], atol=1e-5, rtol=1e-4)
        assert personal[r].keys() == head.keys()
        for name, value in head.items():
            torch.testing.assert_close(personal[r][name], value, atol=1e-5, rtol=1e-4)
        personal_model = {**global_state, **w.spec.unflatten(w.spec.flatten(global_state) + update), **head}
        assert accuracies[r] == pytest.approx(_accuracy(w, personal_model), abs=1e-6)


def test_fedper_trains_body_and_personal_head_together_and_sends_only_the_body(small_config):
    _personal_head_rule(small_config, "fedper", lambda step, name: True)


def test_fedrep_trains_the_head_with_the_body_frozen_then_the_body_with_the_head_frozen(small_config):
    head_steps = 2
    _personal_head_rule(small_config, "fedrep", lambda step, name: in_layers(name, ("head",)) == (step < head_steps),
                        f"personalization.head_steps={head_steps}")


def test_fedbn_keeps_the_normalisation_layers_local_and_sends_the_rest(small_config):
    _personal_head_rule(small_config, "fedbn", lambda step, name: True, "model.name=resnet8")


def test_fedbn_on_the_mlp_with_batch_norm_keeps_its_batch_norm_layers_local(small_config):
    _personal_head_rule(small_config, "fedbn", lambda step, name: True, "model.norm=batch")


def test_ditto_trains_a_personal_model_pulled_toward_the_global_one_beside_the_plain_update(small_config):
    lam = 0.5
    w, globals_, updates, personal, accuracies = _client_rounds(
        small_config(*CLIENT, "personalization.method=ditto", f"personalization.lam={lam}"))
    v = None
    for r, (global_state, update) in enumerate(zip(globals_, updates, strict=True)):
        trained = _sgd(w, global_state, STEPS, server_round=r + 1)
        torch.testing.assert_close(update, w.spec.flatten(trained) - w.spec.flatten(global_state), atol=1e-5, rtol=1e-4)
        pull = {k: t.detach().clone() for k, t in global_state.items()}

        def prox(params, pull=pull):
            return 0.5 * lam * sum(((p - pull[n]) ** 2).sum() for n, p in params.items())

        v = _sgd(w, v or global_state, STEPS, extra=prox, server_round=r + 1)
        for name, value in v.items():
            torch.testing.assert_close(personal[r][name], value, atol=1e-5, rtol=1e-4)
        assert accuracies[r] == pytest.approx(_accuracy(w, v), abs=1e-6)


def test_apfl_steps_its_personal_model_and_alpha_on_the_mixture_with_the_global_model(small_config):
    alpha, alpha_lr = 0.3, 0.5
    w, globals_, updates, personal, accuracies = _client_rounds(small_config(
        *CLIENT, "personalization.method=apfl", f"personalization.alpha={alpha}", f"personalization.alpha_lr={alpha_lr}"))
    model = w.model
    v = None
    for r, (global_state, update) in enumerate(zip(globals_, updates, strict=True)):
        trained = _sgd(w, global_state, STEPS, server_round=r + 1)
        torch.testing.assert_close(update, w.spec.flatten(trained) - w.spec.flatten(global_state), atol=1e-5, rtol=1e-4)
        g_params = {n: global_state[n].clone() for n, _ in model.named_parameters()}
        v = v or {n: t.clone() for n, t in g_params.items()}
        x, y = _data(w, 0, r + 1)
        for _ in range(STEPS):
            model.load_state_dict({**global_state, **{n: alpha * v[n] + (1 - alpha) * g_params[n] for n in v}})
            model.zero_grad()
            F.cross_entropy(model(x), y).backward()
            grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
            alpha_grad = sum(float(((v[n] - g_params[n]) * grads[n]).sum()) for n in v)
            v = {n: v[n] - LR * alpha * grads[n] for n in v}
            alpha = min(max(alpha - alpha_lr * alpha_grad, 0.0), 1.0)
        for name, value in v.items():
            torch.testing.assert_close(personal[r][name], value, atol=1e-5, rtol=1e-4)
        new_global = {**global_state, **w.spec.unflatten(w.spec.flatten(global_state) + update)}
        mixed = {**new_global, **{n: alpha * v[n] + (1 - alpha) * new_global[n] for n in v}}
        assert accuracies[r] == pytest.approx(_accuracy(w, mixed), abs=1e-6)
    assert alpha != 0.3  # the weight moved


def test_finetune_evaluates_the_global_model_after_finetune_steps_on_the_train_split(small_config):
    steps = 4
    w, globals_, updates, personal, accuracies = _client_rounds(
        small_config(*CLIENT, "personalization.method=finetune", f"personalization.finetune_steps={steps}"))
    assert personal == [None, None]  # fine-tuning keeps nothing between rounds
    for r, (global_state, update) in enumerate(zip(globals_, updates, strict=True)):
        torch.testing.assert_close(update, w.spec.flatten(_sgd(w, global_state, STEPS, server_round=r + 1))
                                   - w.spec.flatten(global_state), atol=1e-5, rtol=1e-4)
        evaluated = {**global_state, **w.spec.unflatten(w.spec.flatten(global_state) + update)}
        assert accuracies[r] == pytest.approx(_accuracy(w, _sgd(w, evaluated, steps)), abs=1e-6)


@pytest.mark.parametrize(("sets", "line"), [
    (("personalization.method=fedper", "personalization.head=[classifier]"),
     "personalization.head: 'classifier' names no layer of model.name 'mlp'"),
    (("personalization.method=fedper", "personalization.lam=0.5"),
     "personalization.lam: 0.5 is not read by personalization.method 'fedper'; leave it unset"),
    (("personalization.finetune_steps=3",),
     "personalization.finetune_steps: 3 is not read by personalization.method 'none'; leave it unset"),
    (("personalization.method=ditto", "eval.federated=false"),
     "personalization.method: 'ditto' is evaluated on the clients' test splits; eval.federated is false"),
    (("personalization.method=fedbn",),
     "personalization.method: 'fedbn' keeps the normalisation layers local; model.name 'mlp' has none"),
    (("model.name=cnn", "model.norm=batch"),
     "model.norm: the MLP's normalisation layers; model.name is 'cnn'"),
    (("personalization.method=dito",), "personalization.method: Input should be"),
    (("personalization.method=apfl", "client.momentum=0.9"),
     "personalization.method: 'apfl' steps v and alpha by plain SGD (Deng et al. 2020, Algorithm 1); "
     "client.momentum is 0.9"),
    (("personalization.method=ditto", "quant.lowbit.bits=8"),
     "personalization.method: 'ditto' trains its personal model in full precision; quant.lowbit is set"),
])
def test_validation_refuses_what_the_method_does_not_read_or_cannot_do_in_one_line(small_config, sets, line):
    with pytest.raises(ConfigError) as err:
        small_config(*sets)
    assert len(str(err.value).splitlines()) == 1
    assert str(err.value).startswith(line)


RUN = ("sim.backend=inprocess", "partition.num_clients=4", "rounds=4", "output.checkpoint_every=2",
       "output.plots=false", "strategy.fraction_train=0.5", "client.local_steps=3")


def _rows(path):
    return [{k: v for k, v in row.items() if k != "wall_time_s"} for row in RunDir.open(path).rows()]


RESUMED = {"fedper": (), "fedrep": ("personalization.head_steps=2",), "ditto": (), "finetune": (), "apfl": ("client.momentum=0",),
           "fedbn": ("model.name=resnet8",), "fedbn-mlp": ("model.norm=batch",)}


@pytest.mark.parametrize("method", RESUMED)
def test_a_resumed_run_ends_exactly_like_an_uninterrupted_one_with_the_personal_state(small_config, method):
    cfg = small_config(*RUN, f"personalization.method={method.split('-')[0]}", *RESUMED[method])
    reference, _ = run_experiment(cfg)
    interrupted, _ = run_experiment(cfg)
    run = RunDir.open(interrupted)
    (run.checkpoint_dir / "round-00004.pt").unlink()  # as if killed during round 3
    checkpoint = run.latest_checkpoint()
    assert checkpoint.round == 2
    assert bool(checkpoint.clients) == (method != "finetune")  # fine-tuning keeps no state
    run_experiment(cfg, resume=interrupted)
    rows = _rows(interrupted)
    assert rows == _rows(reference)
    assert "personal_accuracy_mean" in rows[-1]
    assert RunDir.open(reference).summary()["final_personal_accuracy_mean"] == rows[-1]["personal_accuracy_mean"]


@pytest.mark.parametrize("method", ["fedper", "ditto", "finetune"])
def test_the_batched_backend_gives_the_personal_numbers_of_one_client_at_a_time(small_config, method):
    common = (*RUN[1:], f"personalization.method={method}")
    batched = RunDir.open(run_experiment(small_config("sim.backend=batched", *common))[0]).rows()
    alone = RunDir.open(run_experiment(small_config("sim.backend=inprocess", *common))[0]).rows()
    for b, a in zip(batched, alone, strict=True):
        assert math.isclose(b["train_loss"], a["train_loss"], rel_tol=0.01)
        assert abs(b["personal_accuracy_mean"] - a["personal_accuracy_mean"]) <= 0.02


def test_fedrep_clients_train_stacked_head_phase_then_body_phase_as_one_at_a_time(small_config):
    cfg = small_config(*CLIENT, "personalization.method=fedrep", "personalization.head_steps=2")
    assert stacked_reason(cfg) is None
    global_state = {k: v.clone() for k, v in worker(ClientRuntime(cfg).cfg_json).model.state_dict().items()}
    content = RecordDict({"arrays": ArrayRecord(global_state), "config": ConfigRecord({"server-round": 1})})
    updates = {}
    for vectorise in (True, False):
        runtime = ClientRuntime(cfg, vectorise=vectorise)
        if vectorise:
            def alone(*args):
                raise AssertionError("a client trained alone")
            runtime._train_alone = alone
        updates[vectorise] = [_decode(runtime, o.reply) for o in runtime.run("train", [Member(p, content, {})
                                                                                        for p in range(4)])]
    for stacked, alone in zip(updates[True], updates[False], strict=True):
        torch.testing.assert_close(stacked, alone, atol=1e-5, rtol=1e-4)


def test_personal_accuracies_are_one_value_per_client_weighted_by_nothing():
    evaluations = [ClientEvaluation(1000, 0.5, 0.9, 0.2), ClientEvaluation(10, 0.5, 0.1, 0.4),
                   ClientEvaluation(10, 0.5, 0.1, 0.9), ClientEvaluation(0, 0.0, 0.0, 0.0)]
    metrics = federated_metrics(evaluations)
    assert metrics["personal_accuracy_p50"] == pytest.approx(0.4)
    assert metrics["personal_accuracy_mean"] == pytest.approx(0.5)  # the client without test examples left out
    assert {"personal_accuracy_p10", "personal_accuracy_p90"} <= metrics.keys()
    # the sorted-accuracy curve at 0, 5, ..., 100 percent, whatever the number of clients
    assert metrics["personal_accuracy_quantiles"][0] == pytest.approx(0.2)
    assert metrics["personal_accuracy_quantiles"][10] == pytest.approx(0.4)
    assert metrics["personal_accuracy_quantiles"][-1] == pytest.approx(0.9)
    assert len(metrics["personal_accuracy_quantiles"]) == 21
    assert not any(key.startswith("personal") for key in federated_metrics([ClientEvaluation(10, 0.5, 0.1)]))


def test_scaffold_under_fedper_computes_its_control_variate_from_the_body_it_sends(small_config):
    cfg = small_config(*CLIENT, "strategy.name=scaffold", "personalization.method=fedper")
    runtime = ClientRuntime(cfg)
    w = worker(runtime.cfg_json)
    head, _ = _head_split(w, torch.arange(w.spec.dim))
    body = torch.ones(w.spec.dim, dtype=torch.bool)
    body[head] = False
    c_global = torch.randn(w.spec.dim, generator=torch.Generator().manual_seed(0)) * body  # c is 0 on the head
    state = {}
    for server_round in (1, 2):
        content = RecordDict({"arrays": ArrayRecord(w.model.state_dict()), "scaffold-control": encode_vector(c_global)[0],
                              "config": ConfigRecord({"server-round": server_round})})
        c_local = decode_vector(state["scaffold-control"]) if "scaffold-control" in state else torch.zeros(w.spec.dim)
        reply = runtime.run("train", [Member(PID, content, state)])[0].reply
        sent, delta = _decode(runtime, reply), decode_vector(reply.records["scaffold-delta"])
        assert torch.count_nonzero(_head_split(w, sent)[0]) == 0
        assert torch.count_nonzero(_head_split(w, delta)[0]) == 0  # the trained head moves no control variate
        torch.testing.assert_close(delta, control_variate_update(c_local, c_global, sent, STEPS, LR) - c_local)


def test_a_personal_run_keeps_its_own_stateful_loss_state_between_rounds(small_config):
    """ALDR-KL's per-sample duals: the personal run's live on under their own key, and the
    global run's stay exactly those of a run without a personal model."""
    loss = ("loss.name=aldr_kl",)
    states = {}
    for method in ("none", "ditto"):
        cfg = small_config(*CLIENT, *loss, *(("personalization.method=ditto",) if method == "ditto" else ()))
        runtime, state = ClientRuntime(cfg), {}
        w = worker(runtime.cfg_json)
        initial = {k: v.clone() for k, v in w.model.state_dict().items()}
        for server_round in (1, 2):
            content = RecordDict({"arrays": ArrayRecord(initial),
                                  "config": ConfigRecord({"server-round": server_round})})
            assert runtime.run("train", [Member(PID, content, state)])[0].error is None
            if server_round == 1 and method == "ditto":
                after_one = to_state_dict(state["loss-state-ditto"])["lambdas"].clone()
        states[method] = state
    torch.testing.assert_close(to_state_dict(states["ditto"]["loss-state"])["lambdas"],
                               to_state_dict(states["none"]["loss-state"])["lambdas"], rtol=0, atol=0)
    personal = to_state_dict(states["ditto"]["loss-state-ditto"])["lambdas"]
    assert not torch.equal(after_one, torch.ones_like(after_one))  # moved off lam0 in round 1
    assert not torch.equal(personal, after_one)  # and on from there in round 2


@pytest.mark.parametrize("method", ["fedper", "ditto"])
def test_a_new_client_personalises_from_the_global_model_for_one_round_and_forgets_it(small_config, method):
    runtime = ClientRuntime(small_config(*CLIENT, f"personalization.method={method}"))
    w = worker(runtime.cfg_json)
    global_state = {k: v.clone() for k, v in w.model.state_dict().items()}
    state = {}
    content = RecordDict({"arrays": ArrayRecord(global_state),
                          "config": ConfigRecord({"server-round": 3, NEW_CLIENT: True})})
    reply = runtime.run("evaluate", [Member(PID, content, state)])[0].reply
    assert state == {}  # a new client keeps nothing
    trained = _sgd(w, global_state, STEPS, server_round=3)
    if method == "fedper":
        personal = {**global_state, **{k: v for k, v in trained.items() if in_layers(k, _layers(w))}}
    else:
        pull = {k: t.clone() for k, t in global_state.items()}
        personal = _sgd(w, global_state, STEPS, server_round=3,
                        extra=lambda params: 0.5 * 0.1 * sum(((p - pull[n]) ** 2).sum() for n, p in params.items()))
    assert reply["metrics"]["personal_accuracy"] == pytest.approx(_accuracy(w, personal), abs=1e-6)


def test_held_out_clients_never_train_and_are_reported_apart(small_config):
    cfg = small_config(*RUN[:2], "rounds=2", "output.plots=false", "client.local_steps=2",
                       "personalization.method=fedper", "eval.new_clients=0.25")
    held_out = held_out_clients(4, 0.25, cfg.seed)
    assert len(held_out) == 1 and held_out == held_out_clients(4, 0.25, cfg.seed)
    rows = RunDir.open(run_experiment(cfg)[0]).rows()
    assert [r["num_sampled"] for r in rows] == [3, 3]
    assert {"new_federated_accuracy", "new_personal_accuracy_mean", "personal_accuracy_mean"} <= rows[-1].keys()
    assert rows[-1]["new_personal_accuracy_p10"] == rows[-1]["new_personal_accuracy_mean"]  # one new client


@pytest.mark.parametrize(("sets", "line"), [
    (("eval.new_clients=0.1",), "eval.new_clients: 0.1 of partition.num_clients 4 holds out no client"),
    (("eval.new_clients=0.25", "eval.federated=false"),
     "eval.new_clients: held-out clients are evaluated on their test splits; eval.federated is false"),
    (("eval.new_clients=0.25", "strategy.name=fedbuff"),
     "eval.new_clients: held-out clients are evaluated by the synchronous strategies"),
])
def test_eval_new_clients_refuses_what_cannot_hold_out_or_evaluate_a_client_in_one_line(small_config, sets, line):
    with pytest.raises(ConfigError) as err:
        small_config("partition.num_clients=4", *sets)
    assert len(str(err.value).splitlines()) == 1
    assert str(err.value).startswith(line)


@pytest.mark.parametrize("method", ["ditto", "finetune", "apfl"])
def test_personal_runs_train_as_one_stack_equal_to_one_at_a_time(small_config, method):
    cfg = small_config(*CLIENT, f"personalization.method={method}")
    results = {}
    # one worker per process and config: its model is the runtimes' scratch, read the start once
    global_state = {k: v.clone() for k, v in worker(ClientRuntime(cfg).cfg_json).model.state_dict().items()}
    for vectorise in (True, False):
        runtime = ClientRuntime(cfg, vectorise=vectorise)
        if vectorise:
            def alone(*args):
                raise AssertionError("a personal run trained alone")
            runtime._run_alone = alone  # every personal run must go through the stack
        states = [{} for _ in range(4)]
        content = RecordDict({"arrays": ArrayRecord(global_state), "config": ConfigRecord({"server-round": 1})})
        assert all(o.error is None for o in runtime.run("train", [Member(p, content, states[p]) for p in range(4)]))
        evaluated = runtime.run("evaluate", [Member(p, content, states[p]) for p in range(4)])
        results[vectorise] = ([o.reply["metrics"]["personal_loss"] for o in evaluated],
                              [to_state_dict(s[PERSONAL_KEY]) if PERSONAL_KEY in s else None for s in states])
    (stacked_losses, stacked_states), (alone_losses, alone_states) = results[True], results[False]
    assert stacked_losses == pytest.approx(alone_losses, rel=1e-4)
    for stacked, alone in zip(stacked_states, alone_states, strict=True):
        if method == "finetune":
            assert stacked is None and alone is None
            continue
        assert stacked.keys() == alone.keys()
        for name, value in alone.items():
            torch.testing.assert_close(stacked[name], value, atol=1e-5, rtol=1e-4)

"""The Flower ClientApp of a fedsim run.

One ClientApp serves every simulated client: Flower tells it which partition it plays
(``node_config["partition-id"]``), it loads that client's data from the per-process
cache, rebuilds the model from the global arrays, trains with ``train_local`` and
replies with the flat update ``w_local - w_global``. Deterministic: the client's random
generator is seeded from (run seed, round, partition id), never from the host.

Gossip nodes (``train.gossip`` and ``train.mix`` messages) train and mix the model they
keep in their Context instead (``fedsim.clients.gossip_node``).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedsim.attacks import build_attack, choose_byzantine
from fedsim.clients import gossip_node
from fedsim.clients.fedld import FedLDRegulariser
from fedsim.clients.fedlex import GuidanceMask
from fedsim.clients.hooks import ClientHook, ProximalTerm
from fedsim.clients.objective import ClientObjective
from fedsim.clients.quantization import Uplink, prepare_training_model
from fedsim.clients.scaffold import DELTA_RECORD, ScaffoldControl
from fedsim.clients.train import evaluate, train_local
from fedsim.config import ExperimentConfig
from fedsim.data import ArrayDataset
from fedsim.params import ParamSpec, get_flat
from fedsim.seeding import derive_seed
from fedsim.sim.components import (
    FederatedData,
    build_objective,
    device_speeds,
    federated_data,
    make_model,
    resolve_device,
)
from fedsim.sim.faults import inject_fault
from fedsim.sim.sync import predict_fn


LOSS_STATE_KEY = "loss-state"


def partition_of(context: Context, message: Message) -> int:
    """The partition this node plays: from the node config, else from the message."""
    if "partition-id" in context.node_config:
        return int(context.node_config["partition-id"])
    return int(message.content["config"]["partition-id"])


@dataclasses.dataclass(frozen=True)
class Worker:
    """What a worker process builds once and every client call it serves reuses: the
    partitioned data, the device speeds, the loss's decision rule, and one model whose whole
    state each call overwrites with the global arrays (building and seeding a model per call
    is waste)."""

    data: FederatedData
    speeds: np.ndarray
    model: torch.nn.Module
    predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None


@dataclasses.dataclass(frozen=True)
class TrainReply:
    """A training call's reply, and what a gossip node needs to keep its model: the flat
    model it started from and the update as the server decodes it."""

    message: Message
    spec: ParamSpec
    start: torch.Tensor
    sent_update: torch.Tensor


@functools.lru_cache(maxsize=2)
def worker(cfg_json: str) -> Worker:
    """The worker state of the config serialised as ``cfg_json`` (cached per process)."""
    cfg = ExperimentConfig.model_validate_json(cfg_json)
    data = federated_data(cfg)
    return Worker(data, device_speeds(cfg), make_model(cfg.model, data.train, cfg.seed), predict_fn(cfg))


def _load(w: Worker, state_dict: dict[str, torch.Tensor], device: torch.device) -> torch.nn.Module:
    w.model.load_state_dict(state_dict)
    return w.model.to(device)


def _hooks(message: Message, model: torch.nn.Module) -> tuple[ClientHook, ...]:
    """The client hooks the strategy switched on through the message."""
    config = message.content["config"]
    hooks: list[ClientHook] = []
    mu = float(config.get("proximal-mu", 0.0))
    if mu > 0:
        hooks.append(ProximalTerm(mu, [p.detach().clone() for p in model.parameters()]))
    if "fedld-beta" in config:
        hooks.append(FedLDRegulariser(float(config["fedld-beta"])))
    if "guidance" in message.content.array_records:
        hooks.append(GuidanceMask(message.content["guidance"].to_torch_state_dict()))
    return tuple(hooks)


def restore_loss_state(objective: ClientObjective, state: RecordDict) -> None:
    """Load the per-sample state of stateful losses (ALDR-KL, SogCLR, iSogCLR) kept in the
    node's Context between rounds."""
    if LOSS_STATE_KEY in state:
        objective.main.load_state_dict(state[LOSS_STATE_KEY].to_torch_state_dict())


def save_loss_state(objective: ClientObjective, state: RecordDict) -> None:
    """Keep the main loss's buffers (if it has any) in the node's Context."""
    buffers = objective.main.state_dict()
    if buffers:
        state[LOSS_STATE_KEY] = ArrayRecord({k: v.contiguous() for k, v in buffers.items()})


def _poisoned(cfg: ExperimentConfig, train_set: ArrayDataset, pid: int) -> ArrayDataset:
    """A Byzantine client's training data under a data attack (label flip), else as is."""
    if cfg.attack.name != "label_flip" or pid not in choose_byzantine(
            cfg.partition.num_clients, cfg.attack.fraction, cfg.seed):
        return train_set
    flip = build_attack("label_flip", num_classes=train_set.num_classes)
    labels = flip(torch.from_numpy(train_set.y)).numpy()
    return dataclasses.replace(train_set, y=labels)


def build_client_app(cfg: ExperimentConfig) -> ClientApp:
    """A ClientApp that trains and evaluates the config's model on its partition."""
    app = ClientApp()
    cfg_json = cfg.model_dump_json()  # once: the key of the per-process worker state
    uplink = Uplink(cfg.quant.uplink)

    def train_from(message: Message, context: Context, start_state: dict[str, torch.Tensor]) -> TrainReply:
        start = time.perf_counter()
        pid = partition_of(context, message)
        server_round = int(message.content["config"]["server-round"])
        torch.set_num_threads(max(1, int(cfg.sim.num_cpus_per_client)))
        device = resolve_device(cfg)
        w = worker(cfg_json)
        model = _load(w, start_state, device)
        train_set = _poisoned(cfg, w.data.client(pid)[0], pid)
        spec = ParamSpec.of(model)
        global_flat = get_flat(model, spec)
        hooks = _hooks(message, model)
        control = ScaffoldControl.from_message(message, context.state, spec, pid)  # SCAFFOLD only
        if control is not None:
            hooks += (control.hook(model),)
        model = prepare_training_model(model, cfg.quant, server_round, cfg.rounds)
        generator = torch.Generator().manual_seed(derive_seed(cfg.seed, "train", server_round, pid))
        objective = build_objective(cfg, len(train_set.y), hooks)
        restore_loss_state(objective, context.state)
        result = train_local(model, train_set, cfg.client, objective, generator, device)
        save_loss_state(objective, context.state)
        update = spec.flatten(model.cpu().state_dict()) - global_flat
        delta = None if control is None else control.finish(model, update, result.steps, cfg.client, context.state)
        update = torch.from_numpy(inject_fault(cfg.faults, pid, server_round, update.numpy()))
        codec_rng = torch.Generator().manual_seed(derive_seed(cfg.seed, "uplink", server_round, pid))
        payload = uplink.encode(update, context.state, codec_rng)
        metrics = MetricRecord({
            "num-examples": result.num_examples,
            "train_loss": result.loss,
            "train_accuracy": result.accuracy,
            "steps": result.steps,
            "duration_s": time.perf_counter() - start,
            "virtual_duration": result.steps / float(w.speeds[pid]),
            "bytes_up": payload.nbytes,
        })
        arrays = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in payload.to_arrays().items()})
        content = RecordDict({"update": arrays, "metrics": metrics})
        if delta is not None:
            content[DELTA_RECORD] = delta
        reply = Message(content=content, reply_to=message)
        return TrainReply(reply, spec, global_flat, uplink.codec.decode(payload))

    @app.train()
    def train(message: Message, context: Context) -> Message:
        return train_from(message, context, message.content["arrays"].to_torch_state_dict()).message

    @app.train("gossip")
    def train_gossip(message: Message, context: Context) -> Message:
        """A gossip node trains the model it holds and keeps what the server will see."""
        start_state = gossip_node.held_model(message, context)
        result = train_from(message, context, start_state)
        held = result.spec.unflatten(result.start + result.sent_update)
        server_round = int(message.content["config"]["server-round"])
        gossip_node.keep_model(context, {**start_state, **held}, gossip_node.version(server_round, "train"))
        return result.message

    @app.train("mix")
    def mix(message: Message, context: Context) -> Message:
        spec = ParamSpec.of(worker(cfg_json).model)
        return gossip_node.mix_reply(message, context, spec, cfg.strategy.variance_correction, cfg.strategy.eps)

    @app.evaluate()
    def evaluate_client(message: Message, context: Context) -> Message:
        pid = partition_of(context, message)
        device = resolve_device(cfg)
        w = worker(cfg_json)
        model = _load(w, message.content["arrays"].to_torch_state_dict(), device)
        _, test_set = w.data.client(pid)
        result = evaluate(model, test_set, device, cfg.eval.batch_size, w.predict)
        metrics = MetricRecord({"num-examples": result.num_examples,
                                "eval_loss": result.loss if result.num_examples else 0.0,
                                "eval_accuracy": result.accuracy if result.num_examples else 0.0})
        return Message(content=RecordDict({"metrics": metrics}), reply_to=message)

    @app.query()
    def query(message: Message, context: Context) -> Message:
        metrics = MetricRecord({"partition-id": partition_of(context, message)})
        return Message(content=RecordDict({"metrics": metrics}), reply_to=message)

    return app

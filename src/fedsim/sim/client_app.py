"""The client side of a fedsim run: what a client does with each message, and the
Flower ClientApp around it.

:class:`ClientRuntime` serves every simulated client. It receives *members*, each one
client's share of a delivery (its partition id, its message content and its Context state:
its slice of a deployed node's Context, in simulation the state the server's grid keeps),
and answers each with a reply content or an error:

- ``train``: rebuild the model from the message's arrays, train on the partition
  (:func:`fedsim.clients.train.train_local`, or all members at once with
  :func:`fedsim.clients.batched.train_stacked`), reply with the flat update
  ``w_local - w_start`` through the uplink codec;
- ``train.gossip`` / ``train.mix``: a gossip node trains or mixes the model it keeps in its
  state (:mod:`fedsim.clients.gossip_node`);
- ``evaluate``: loss and accuracy on the partition's test split (all members sharing a
  model in one pass);
- ``query``: the partition id (deployment: the server learns who plays which partition).

Deterministic: a client's generators are seeded from (run seed, round, partition id),
never from the host. The runtime is used three ways: the in-process grids call it directly
(:mod:`fedsim.sim.inprocess`); under Ray the ClientApp's ``group`` actions unpack a group
message (:mod:`fedsim.sim.group_messages`) into members, each with the state the server's
grid sent along, and send each member's state back with its reply; in deployment each SuperNode's plain
messages are one member each, for the partition its node config names.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Iterator, MutableMapping, Sequence

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from fedsim.algorithms import registry
from fedsim.clients import gossip_node, secagg_steps
from fedsim.clients.batched import stack_size, train_stacked, vectorisable_reason
from fedsim.clients.features import ClientContext, ClientFeature, PersonalRun
from fedsim.clients.hooks import ClientHook, vectorises
from fedsim.clients.objective import ClientObjective
from fedsim.clients.quantization import (
    Uplink,
    keep_local_parameters,
    prepare_training_model,
    restore_local_parameters,
    trained_state,
)
from fedsim.clients.secagg_steps import ADVERTISE_KEYS, SECAGG
from fedsim.clients.train import (
    TrainResult,
    build_optimizer,
    evaluate_many,
    local_steps,
    train_local,
)
from fedsim.clients.training_features import LOSS_STATE_KEY, client_features
from fedsim.config import ExperimentConfig
from fedsim.data import ArrayDataset
from fedsim.data import cache as partition_cache
from fedsim.params import ParamSpec
from fedsim.records import to_state_dict
from fedsim.seeding import derive_seed
from fedsim.sim import group_messages
from fedsim.sim.components import (
    Federation,
    build_objective,
    device_speeds,
    federated_data,
    make_model,
    predict_fn,
    resolve_device,
)
from fedsim.sim.faults import inject_fault, stall_seconds
from fedsim.sim.ray_node import ray_node_metric
from fedsim.strategies.new_clients import NEW_CLIENT
from fedsim.strategies.replies import EF_RESET, TIMEOUT_CODE, TrainReply, reply_content


class PartitionState(MutableMapping):
    """One partition's slice of a node's ``Context.state``: its keys carry the partition id,
    so a node serving several partitions keeps each one's state apart."""

    def __init__(self, state: RecordDict, partition_id: int) -> None:
        self._state = state
        self._prefix = f"partition-{partition_id}/"

    def __getitem__(self, key: str):
        return self._state[self._prefix + key]

    def __setitem__(self, key: str, value) -> None:
        self._state[self._prefix + key] = value

    def __delitem__(self, key: str) -> None:
        del self._state[self._prefix + key]

    def __iter__(self) -> Iterator[str]:
        return (k.removeprefix(self._prefix) for k in list(self._state) if k.startswith(self._prefix))

    def __len__(self) -> int:
        return sum(1 for _ in self)


@dataclasses.dataclass(frozen=True)
class Member:
    """One client's share of a delivery."""

    partition_id: int
    content: RecordDict
    state: MutableMapping


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What a member got: its reply content or the exception it raised, and the seconds the
    node spent on it (its own work plus its share of work done for a group at once)."""

    reply: RecordDict | TrainReply | None
    error: BaseException | None
    seconds: float

    def member_reply(self, partition_id: int, timeout_s: float) -> group_messages.MemberReply:
        """The reply a simulated node sends for this member: a client slower than
        ``client.timeout_s`` counts as timed out, whatever else happened."""
        if self.seconds > timeout_s:
            return group_messages.MemberReply(partition_id, None, TIMEOUT_CODE, f"took {self.seconds:.1f} s")
        if self.error is not None:
            return group_messages.MemberReply(partition_id, None, ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                      f"{type(self.error).__name__}: {self.error}")
        return group_messages.MemberReply(partition_id, self.reply)


@dataclasses.dataclass(frozen=True)
class Worker:
    """What a worker process builds once and every client call it serves reuses: the
    partitioned data, the device speeds, the loss's decision rule, one model whose whole
    state each call overwrites (building and seeding a model per call is waste), its flat
    layout, and why its clients cannot train vectorised (None when they can)."""

    data: Federation
    speeds: np.ndarray
    model: torch.nn.Module
    spec: ParamSpec
    predict: object
    not_vectorised: str | None
    features: tuple[ClientFeature, ...]


@functools.lru_cache(maxsize=2)
def worker(cfg_json: str) -> Worker:
    """The worker state of the config serialised as ``cfg_json`` (cached per process)."""
    cfg = ExperimentConfig.model_validate_json(cfg_json)
    data = federated_data(cfg)
    model = make_model(cfg.model, data, cfg.seed)
    # torch's first optimizer imports torch._dynamo (seconds): a start-up cost of the worker,
    # not time of the first client it serves
    build_optimizer(model.parameters(), cfg.client)
    return Worker(data, device_speeds(cfg), model, ParamSpec.of(model), predict_fn(cfg),
                  vectorisable_reason(cfg, model), client_features(cfg))


@dataclasses.dataclass
class TrainJob:
    """A training member, prepared: where it starts and what it trains on."""

    index: int
    member: Member
    context: ClientContext
    start: dict[str, torch.Tensor]
    start_flat: torch.Tensor
    train_set: ArrayDataset
    generator: torch.Generator
    seconds: float = 0.0

    @property
    def server_round(self) -> int:
        return self.context.server_round

    @property
    def config(self):
        return self.member.content["config"]


def restore_loss_state(objective: ClientObjective, state: MutableMapping, key: str = LOSS_STATE_KEY) -> None:
    """Load the per-sample state of stateful losses (ALDR-KL, SogCLR, iSogCLR) kept in the
    node's Context between rounds under ``key``."""
    if key in state:
        objective.main.load_state_dict(to_state_dict(state[key]))


def save_loss_state(objective: ClientObjective, state: MutableMapping, key: str = LOSS_STATE_KEY) -> None:
    """Keep the main loss's buffers (if it has any) in the node's Context under ``key``."""
    buffers = objective.main.state_dict()
    if buffers:
        state[key] = ArrayRecord({k: v.contiguous() for k, v in buffers.items()})


def _stacked(rows: list[torch.Tensor]) -> torch.Tensor:
    """``torch.stack(rows)``, read-only: one tensor that every row is (clients of a synchronous
    round start from the same model) expanded, not copied K times."""
    if all(row is rows[0] for row in rows):
        return rows[0].expand(len(rows), *rows[0].shape)
    return torch.stack(rows)


def _hooks(features: tuple[ClientFeature, ...], ctx: ClientContext, start: dict[str, torch.Tensor]
           ) -> tuple[ClientHook, ...]:
    """Every feature's hooks for one client."""
    return tuple(hook for feature in features for hook in feature.hooks(ctx, start))


def _stacked_hooks(features: tuple[ClientFeature, ...], ctxs: list[ClientContext],
                   start: dict[str, torch.Tensor]) -> tuple[ClientHook, ...]:
    """Every feature's hooks for clients trained as one stack."""
    return tuple(hook for feature in features for hook in feature.stacked_hooks(ctxs, start))


class ClientRuntime:
    """Answers the members of deliveries for the experiment ``cfg``.

    Parameters
    ----------
    cfg : ExperimentConfig
        The experiment.
    vectorise : bool, default False
        Train the members of one delivery together (:mod:`fedsim.clients.batched`) where the
        experiment allows it; otherwise one after another.
    sleep_stalls : bool, default False
        A stalled client (``faults.slow``) sleeps (deployment, where the server's clock
        judges it); otherwise the stall is added to the client's time, which a simulated
        node reports (a stall then costs no wall time and blocks no other client).
    cache_dir : str, optional
        Read the partitioned data through a disk cache there (:mod:`fedsim.data.cache`):
        Ray's worker processes map the partitions the driver wrote instead of each loading
        and partitioning the data again.
    """

    def __init__(self, cfg: ExperimentConfig, vectorise: bool = False, sleep_stalls: bool = False,
                 cache_dir: str | None = None) -> None:
        self.cfg = cfg
        self.cfg_json = cfg.model_dump_json()  # once: the key of the per-process worker state
        self.uplink = Uplink(cfg.quant.uplink)
        self.vectorise = vectorise
        self.sleep_stalls = sleep_stalls
        self.cache_dir = cache_dir

    def run(self, message_type: str, members: Sequence[Member]) -> list[Outcome]:
        """Each member's outcome, in order."""
        handler = {"train": self._train, "train.gossip": self._train, "train.mix": self._mix,
                   "evaluate": self._evaluate, "query": self._query, secagg_steps.SHARE: self._secagg,
                   secagg_steps.INPUT: self._secagg, secagg_steps.UNMASK: self._secagg}.get(message_type)
        if handler is None:
            error = ValueError(f"fedsim clients do not handle {message_type!r} messages")
            return [Outcome(None, error, 0.0) for _ in members]
        if self.cache_dir is not None and partition_cache.active() is None:
            partition_cache.enable(self.cache_dir)  # before this process first builds the data
        return handler(message_type, members)

    # ------------------------------------------------------------------ train
    def _train(self, message_type: str, members: Sequence[Member]) -> list[Outcome]:
        w = worker(self.cfg_json)
        device = resolve_device(self.cfg)
        outcomes: list[Outcome | None] = [None] * len(members)
        jobs = []
        starts: dict[int, tuple[dict[str, torch.Tensor], torch.Tensor]] = {}  # a shared model is read once
        for i, member in enumerate(members):
            started = time.perf_counter()
            try:
                jobs.append(self._prepare(i, member, message_type, w, starts))
            except Exception as exc:  # one client's failure is its own
                outcomes[i] = Outcome(None, exc, time.perf_counter() - started)
            else:
                jobs[-1].seconds = time.perf_counter() - started
        finished: list[tuple[TrainJob, TrainReply | BaseException]] = []
        for job, trained in self._trained(jobs, w, device):
            started = time.perf_counter()
            try:
                if isinstance(trained, BaseException):
                    raise trained
                reply = self._finish(job, *trained, w, message_type)
            except Exception as exc:
                reply = exc
            job.seconds += time.perf_counter() - started
            finished.append((job, reply))
        for job, reply in self._after_training(finished, w, device):
            outcomes[job.index] = (Outcome(None, reply, job.seconds) if isinstance(reply, BaseException)
                                   else Outcome(reply, None, job.seconds))
        return outcomes

    def _after_training(self, finished: list[tuple[TrainJob, TrainReply | BaseException]], w: Worker,
                        device: torch.device) -> list[tuple[TrainJob, TrainReply | BaseException]]:
        """The features' personal runs of the clients that replied (stacked where they can
        be), each kept in its client's state; a failed run fails its client's reply."""
        started = time.perf_counter()
        runs = [(job, run) for job, reply in finished if not isinstance(reply, BaseException)
                for feature in w.features if (run := feature.personal_run(job.context)) is not None]
        failed: dict[int, BaseException] = {}
        trained_runs = self._personal_training([(job.context, run) for job, run in runs], w, device)
        for (job, run), trained in zip(runs, trained_runs, strict=True):
            if isinstance(trained, BaseException):
                failed[id(job)] = trained
            elif run.keep is not None:
                run.keep(trained)
        share = (time.perf_counter() - started) / max(len(finished), 1)
        for job, _ in finished:
            job.seconds += share
        return [(job, failed.get(id(job), reply)) for job, reply in finished]

    def _prepare(self, index: int, member: Member, message_type: str, w: Worker,
                 starts: dict[int, tuple[dict[str, torch.Tensor], torch.Tensor]]) -> TrainJob:
        pid = member.partition_id
        server_round = int(member.content["config"]["server-round"])
        if message_type == "train.gossip":
            start = gossip_node.held_model(member.content, member.state)
            start_flat = w.spec.flatten(start)
        else:
            record = member.content["arrays"]
            if id(record) not in starts:
                state = to_state_dict(record)
                starts[id(record)] = (state, w.spec.flatten(state))
            start, start_flat = starts[id(record)]
        context = ClientContext(self.cfg, pid, server_round, member.content, member.state, w.spec)
        context.train_loss = self._train_loss(context, w)
        shared = start
        for feature in w.features:
            start = feature.start(context, start)
        if start is not shared:
            start_flat = w.spec.flatten(start)
        train_set = self._train_set(context, w)
        generator = torch.Generator().manual_seed(derive_seed(self.cfg.seed, "train", server_round, pid))
        return TrainJob(index, member, context, start, start_flat, train_set, generator)

    @staticmethod
    def _train_set(context: ClientContext, w: Worker) -> ArrayDataset:
        """The client's train split of the round, as its features have it."""
        train_set = w.data.client(context.partition_id, context.server_round)[0]
        for feature in w.features:
            train_set = feature.train_set(context, train_set)
        if len(train_set.y) == 0:
            raise ValueError("client has no training examples")
        return train_set

    def _train_loss(self, context: ClientContext, w: Worker):
        """``train_loss(state)``: a model's mean cross-entropy on the client's train split."""
        def train_loss(state: dict[str, torch.Tensor]) -> float:
            device = resolve_device(self.cfg)
            w.model.load_state_dict(state)
            result = evaluate_many(w.model.to(device), [self._train_set(context, w)], device, self.cfg.eval.batch_size)
            w.model.cpu()
            return result[0].loss
        return train_loss

    def _personal_training(self, runs: list[tuple[ClientContext, PersonalRun]], w: Worker, device: torch.device
                           ) -> list[dict[str, torch.Tensor] | BaseException]:
        """The trained state dict (or the exception) of each client's personal run: runs of
        equal purpose, steps and hook types whose hooks stack train as one stack in the
        batched backend, at most :func:`~fedsim.clients.batched.stack_size` at a time; the
        others one at a time."""
        results: list[dict[str, torch.Tensor] | BaseException | None] = [None] * len(runs)
        if self.vectorise and w.not_vectorised is None:
            groups: dict[tuple, list[int]] = {}
            for i, (_, run) in enumerate(runs):
                groups.setdefault((run.purpose, run.steps, tuple(type(h) for h in run.hooks)), []).append(i)
            size = stack_size(w.spec.dim)
            for group in groups.values():
                for chunk in (group[i : i + size] for i in range(0, len(group), size)):
                    stacked = self._run_stacked([runs[i] for i in chunk], w, device) if len(chunk) > 1 else None
                    for i, trained in zip(chunk, stacked or [None] * len(chunk), strict=True):
                        results[i] = trained
        for i, (context, run) in enumerate(runs):
            if results[i] is None:
                try:
                    results[i] = self._run_alone(context, run, w, device)
                except Exception as exc:
                    results[i] = exc
        return results

    def _run_setup(self, context: ClientContext, run: PersonalRun, w: Worker):
        """A run's train split, client settings and generator."""
        train_set = self._train_set(context, w)
        client = self.cfg.client if run.steps is None else self.cfg.client.model_copy(update={"local_steps": run.steps})
        generator = torch.Generator().manual_seed(
            derive_seed(self.cfg.seed, run.purpose, context.server_round, context.partition_id))
        return train_set, client, generator

    def _run_alone(self, context: ClientContext, run: PersonalRun, w: Worker, device: torch.device
                   ) -> dict[str, torch.Tensor]:
        """One personal run on w.model. A stateful loss keeps one state per ``purpose``
        (``loss-state-ditto``, ...) between the runs: the personal model's per-sample state is
        its own, not the global run's."""
        train_set, client, generator = self._run_setup(context, run, w)
        model = w.model
        model.load_state_dict(run.start)
        model = model.to(device)
        objective = build_objective(self.cfg, len(train_set.y), run.hooks)
        restore_loss_state(objective, context.state, f"{LOSS_STATE_KEY}-{run.purpose}")
        train_local(model, train_set, client, objective, generator, device)
        save_loss_state(objective, context.state, f"{LOSS_STATE_KEY}-{run.purpose}")
        return {name: value.detach().cpu().clone() for name, value in model.cpu().state_dict().items()}

    def _run_stacked(self, runs: list[tuple[ClientContext, PersonalRun]], w: Worker, device: torch.device
                     ) -> list[dict[str, torch.Tensor] | BaseException] | None:
        """Personal runs trained as one stack (the batched backend: no buffers, no loss state),
        or None when their hooks have no stacked form."""
        setups = [self._run_setup(context, run, w) for context, run in runs]
        client = setups[0][1]
        order = sorted(range(len(runs)), key=lambda i: -local_steps(len(setups[i][0].y), client))
        hooks = tuple(type(hook).stack([runs[i][1].hooks[k] for i in order]) for k, hook in enumerate(runs[0][1].hooks))
        if not all(hook is not None and vectorises(hook) for hook in hooks):
            return None
        names = [name for name, _ in w.model.named_parameters()]
        start = {name: torch.stack([runs[i][1].start[name] for i in order]).to(device) for name in names}
        try:
            final, _ = train_stacked(w.model, start, [setups[i][0] for i in order], [setups[i][2] for i in order],
                                     client, build_objective(self.cfg, 1, hooks, per_sample=True), device)
        except Exception as exc:
            return [exc] * len(runs)
        trained: list[dict[str, torch.Tensor] | BaseException] = [{} for _ in runs]
        for row, i in enumerate(order):
            trained[i] = {**runs[i][1].start, **{name: final[name][row].clone() for name in names}}
        return trained

    def _trained(self, jobs: list[TrainJob], w: Worker, device: torch.device):
        """(job, (final flat model, TrainResult) or the exception) for every job."""
        stacks = self._stacks(jobs, w) if self.vectorise and w.not_vectorised is None else []
        stacked = {id(job) for stack in stacks for job in stack}
        for stack in stacks:
            yield from self._train_batch(stack, w, device)
        for job in jobs:
            if id(job) not in stacked:
                yield job, self._train_alone(job, w, device)

    def _train_alone(self, job: TrainJob, w: Worker, device: torch.device):
        """(final flat model, TrainResult) of one job trained by itself, or its exception."""
        started = time.perf_counter()
        try:
            return self._train_one(job, w, device)
        except Exception as exc:
            return exc
        finally:
            job.seconds += time.perf_counter() - started

    @staticmethod
    def _stacks(jobs: list[TrainJob], w: Worker) -> list[list[TrainJob]]:
        """The jobs that train together: those whose features give equal keys, at most
        :func:`~fedsim.clients.batched.stack_size` at a time. A job alone in its group trains
        alone."""
        by_key: dict[tuple, list[TrainJob]] = {}
        for job in jobs:
            by_key.setdefault(tuple(feature.key(job.context) for feature in w.features), []).append(job)
        size = stack_size(w.spec.dim)
        alone = any(feature.stacked_only for feature in w.features)
        return [group[i : i + size] for group in by_key.values() if len(group) > 1 or alone
                for i in range(0, len(group), size)]

    def _train_one(self, job: TrainJob, w: Worker, device: torch.device) -> tuple[torch.Tensor, TrainResult]:
        model = w.model
        model.load_state_dict(job.start)
        model = model.to(device)
        hooks = _hooks(w.features, job.context, {n: p.detach().clone() for n, p in model.named_parameters()})
        pid = job.member.partition_id
        rounding = torch.Generator(device=device).manual_seed(derive_seed(self.cfg.seed, "lowbit", job.server_round, pid))
        model = prepare_training_model(model, self.cfg.quant, job.server_round, self.cfg.rounds, rounding)
        restore_local_parameters(model, w.spec.names, job.member.state)
        objective = build_objective(self.cfg, len(job.train_set.y), hooks)
        restore_loss_state(objective, job.member.state)
        result = train_local(model, job.train_set, self.cfg.client, objective, job.generator, device)
        save_loss_state(objective, job.member.state)
        keep_local_parameters(model, w.spec.names, job.member.state)
        return w.spec.flatten(trained_state(model.cpu(), self.cfg.quant, job.server_round, self.cfg.rounds)), result

    def _train_batch(self, jobs: list[TrainJob], w: Worker, device: torch.device):
        """Train ``jobs`` stacked (same hooks), rows in decreasing order of local steps."""
        started = time.perf_counter()
        jobs = sorted(jobs, key=lambda j: -local_steps(len(j.train_set.y), self.cfg.client))
        names = [name for name, _ in w.model.named_parameters()]
        start = {name: _stacked([job.start[name] for job in jobs]).to(device) for name in names}
        hooks = _stacked_hooks(w.features, [job.context for job in jobs], start)
        if not all(vectorises(hook) for hook in hooks):  # a hook without its stacked form
            for job in jobs:
                yield job, self._train_alone(job, w, device)
            return
        try:
            final, results = train_stacked(w.model, start, [j.train_set for j in jobs], [j.generator for j in jobs],
                                           self.cfg.client, build_objective(self.cfg, 1, hooks, per_sample=True),
                                           device)
        except Exception as exc:
            trained = [exc] * len(jobs)
        else:
            flat = w.spec.flatten_rows(final)
            trained = [(flat[row], results[row]) for row in range(len(jobs))]
        share = (time.perf_counter() - started) / len(jobs)
        for job, outcome in zip(jobs, trained, strict=True):
            job.seconds += share
            yield job, outcome

    def _finish(self, job: TrainJob, final_flat: torch.Tensor, result: TrainResult, w: Worker,
                message_type: str) -> TrainReply | RecordDict:
        """The update through faults and the uplink codec, as a reply (its keys' records under
        deployed secure aggregation, the update kept here); a gossip node keeps what the
        server will see."""
        pid, cfg = job.member.partition_id, self.cfg
        update = final_flat - job.start_flat
        for feature in w.features:
            update = feature.sent_update(job.context, update)
        records = {name: record for feature in w.features
                   for name, record in feature.finish(job.context, update, result.steps).items()}
        update = torch.from_numpy(inject_fault(cfg.faults, pid, job.server_round, update.numpy()))
        stall = stall_seconds(cfg.faults, pid, job.server_round)
        if self.sleep_stalls:
            time.sleep(stall)
        else:
            job.seconds += stall
        if job.config.get(ADVERTISE_KEYS, False):  # deployed secure aggregation: the update stays here
            keys = secagg_steps.advertise(job.member.state, update, job.server_round)
            return RecordDict({SECAGG: keys, "metrics": MetricRecord(self._train_metrics(job, result, w, 0)),
                               **records})
        codec_rng = (torch.Generator().manual_seed(derive_seed(cfg.seed, "uplink", job.server_round, pid))
                     if self.uplink.codec.stochastic else None)  # a deterministic codec draws nothing
        payload = self.uplink.encode(update, job.member.state, codec_rng, reset=bool(job.config.get(EF_RESET, False)))
        if message_type == "train.gossip":
            held = w.spec.unflatten(job.start_flat + self.uplink.codec.decode(payload))
            gossip_node.keep_model(job.member.state, {**job.start, **held},
                                   gossip_node.version(job.server_round, "train"))
        return TrainReply(payload, self._train_metrics(job, result, w, payload.nbytes), records)

    def _train_metrics(self, job: TrainJob, result: TrainResult, w: Worker, bytes_up: int) -> dict[str, int | float]:
        metrics = {
            "num-examples": result.num_examples,
            "train_loss": result.loss,
            "train_accuracy": result.accuracy,
            "steps": result.steps,
            "duration_s": job.seconds,
            "virtual_duration": result.steps / float(w.speeds[job.member.partition_id]),
            "bytes_up": bytes_up,
            **ray_node_metric(),
        }
        if self.cfg.model.name == "causal_lm":
            metrics["train_tokens_per_s"] = result.rows / max(job.seconds, 1e-9)
        return metrics

    # --------------------------------------------------------- other messages
    def _mix(self, message_type: str, members: Sequence[Member]) -> list[Outcome]:
        spec = worker(self.cfg_json).spec
        node = registry.get(self.cfg.strategy.name).client
        return [_timed(lambda m=m: node.mix(m.content, m.state, spec, self.cfg)) for m in members]

    def _evaluate(self, message_type: str, members: Sequence[Member]) -> list[Outcome]:
        """Members that share a model are evaluated in one pass over their test splits."""
        w = worker(self.cfg_json)
        device = resolve_device(self.cfg)
        outcomes: list[Outcome | None] = [None] * len(members)
        evaluated: dict[int, tuple[MetricRecord, ArrayDataset, float]] = {}  # member -> metrics, test split, seconds
        by_model: dict[int, list[int]] = {}
        for i, member in enumerate(members):
            by_model.setdefault(id(member.content["arrays"]), []).append(i)
        for indices in by_model.values():
            started = time.perf_counter()
            try:
                model = w.model
                model.load_state_dict(to_state_dict(members[indices[0]].content["arrays"]))
                test_sets = [w.data.client(m.partition_id, int(m.content["config"]["server-round"]))[1]
                             for m in (members[i] for i in indices)]
                results = evaluate_many(model.to(device), test_sets, device, self.cfg.eval.batch_size, w.predict)
                model.cpu()
            except Exception as exc:
                share = (time.perf_counter() - started) / len(indices)
                for i in indices:
                    outcomes[i] = Outcome(None, exc, share)
                continue
            share = (time.perf_counter() - started) / len(indices)
            for i, res, test_set in zip(indices, results, test_sets, strict=True):
                metrics = MetricRecord({"num-examples": res.num_examples,
                                        "eval_loss": res.loss if res.num_examples else 0.0,
                                        "eval_accuracy": res.accuracy if res.num_examples else 0.0})
                if self.cfg.model.name == "causal_lm" and res.num_examples:
                    metrics["eval_perplexity"] = math.exp(res.loss)
                evaluated[i] = (metrics, test_set, share)
        started = time.perf_counter()
        personal = self._personal_metrics({i: (members[i], test_set) for i, (_, test_set, _) in evaluated.items()},
                                          w, device)
        share = (time.perf_counter() - started) / max(len(evaluated), 1)
        for i, (metrics, _, seconds) in evaluated.items():
            if isinstance(personal.get(i), BaseException):
                outcomes[i] = Outcome(None, personal[i], seconds + share)
                continue
            metrics.update(personal.get(i, {}))
            outcomes[i] = Outcome(RecordDict({"metrics": metrics}), None, seconds + share)
        return outcomes

    def _personal_metrics(self, members: dict[int, tuple[Member, ArrayDataset]], w: Worker, device: torch.device
                          ) -> dict[int, dict[str, float] | BaseException]:
        """``personal_loss`` and ``personal_accuracy`` of each member (by index) that has test
        examples: its personalised model (the first feature that has one, its runs trained
        stacked where they can be) on its test split; none when no feature has one. Held-out
        clients (``eval.new_clients``) first run one training round of their own from the
        global model, with a state they then forget."""
        if all(type(f).personal_model is ClientFeature.personal_model for f in w.features):
            return {}
        members = {i: (member, test_set) for i, (member, test_set) in members.items() if len(test_set.y)}
        states = {i: member.state for i, (member, _) in members.items()}
        new = [i for i, (member, _) in members.items() if member.content["config"].get(NEW_CLIENT, False)]
        for i in new:
            states[i] = {}
        adapted = self._train("train", [Member(members[i][0].partition_id, members[i][0].content, states[i])
                                        for i in new]) if new else []
        results: dict[int, dict[str, float] | BaseException] = {
            i: outcome.error for i, outcome in zip(new, adapted, strict=True) if outcome.error is not None}
        models: dict[int, dict[str, torch.Tensor] | PersonalRun | BaseException] = {}
        contexts: dict[int, ClientContext] = {}
        for i, (member, _) in members.items():
            if i in results:
                continue
            context = ClientContext(self.cfg, member.partition_id, int(member.content["config"]["server-round"]),
                                    member.content, states[i], w.spec)
            context.train_loss = self._train_loss(context, w)
            contexts[i] = context
            global_state = to_state_dict(member.content["arrays"])
            try:
                model = next((model for feature in w.features
                              if (model := feature.personal_model(context, global_state)) is not None), None)
            except Exception as exc:
                model = exc
            if model is not None:
                models[i] = model
        runs = [i for i, model in models.items() if isinstance(model, PersonalRun)]
        for i, trained in zip(runs, self._personal_training([(contexts[i], models[i]) for i in runs], w, device),
                              strict=True):
            models[i] = trained
        for i, model in models.items():
            if isinstance(model, BaseException):
                results[i] = model
                continue
            w.model.load_state_dict(model)
            result = evaluate_many(w.model.to(device), [members[i][1]], device, self.cfg.eval.batch_size, w.predict)[0]
            w.model.cpu()
            results[i] = {"personal_loss": result.loss, "personal_accuracy": result.accuracy}
        return results

    def _secagg(self, message_type: str, members: Sequence[Member]) -> list[Outcome]:
        """A step of deployed secure aggregation (:mod:`fedsim.clients.secagg_steps`)."""
        steps = {secagg_steps.SHARE: lambda m: secagg_steps.share(m.state, m.content[SECAGG], m.partition_id),
                 secagg_steps.INPUT: lambda m: secagg_steps.masked_input(m.state, m.content[SECAGG],
                                                                               m.partition_id, self.cfg),
                 secagg_steps.UNMASK: lambda m: secagg_steps.unmask(m.state, m.content[SECAGG])}
        return [_timed(lambda m=m: steps[message_type](m)) for m in members]

    def _query(self, message_type: str, members: Sequence[Member]) -> list[Outcome]:
        return [Outcome(RecordDict({"metrics": MetricRecord({"partition-id": m.partition_id})}), None, 0.0)
                for m in members]


def _timed(work) -> Outcome:
    started = time.perf_counter()
    try:
        return Outcome(work(), None, time.perf_counter() - started)
    except Exception as exc:
        return Outcome(None, exc, time.perf_counter() - started)


def partition_of(context: Context, message: Message) -> int:
    """The partition a deployed node plays: its node config's ``partition-id``, else the
    one the message names."""
    if "partition-id" in context.node_config:
        return int(context.node_config["partition-id"])
    return int(message.content["config"]["partition-id"])


def build_client_app(cfg: ExperimentConfig, vectorise: bool = False, sleep_stalls: bool = False,
                     cache_dir: str | None = None) -> ClientApp:
    """A ClientApp that answers fedsim's messages for the experiment ``cfg``: plain
    messages (deployment: one client per SuperNode) and group messages (simulation under
    Ray: the clients a node serves, trained together when ``vectorise``). See
    :class:`ClientRuntime` for ``sleep_stalls`` and ``cache_dir``."""
    app = ClientApp()
    runtime = ClientRuntime(cfg, vectorise, sleep_stalls, cache_dir)
    # A ClientApp runs in a worker process (Ray actor, ClientApp process), which owns its
    # threads; the in-process backends call the runtime in the driver, whose threads are its own
    threads = max(1, int(cfg.sim.num_cpus_per_client))

    def plain(message: Message, context: Context) -> Message:
        torch.set_num_threads(threads)
        pid = partition_of(context, message)
        member = Member(pid, message.content, PartitionState(context.state, pid))
        outcome = runtime.run(message.metadata.message_type, [member])[0]
        if outcome.error is not None:
            raise outcome.error
        return Message(content=reply_content(outcome.reply), reply_to=message)

    def group(message: Message, context: Context) -> Message:
        torch.set_num_threads(threads)
        message_type, contents = group_messages.unpack_members(message.content)
        members = [Member(pid, content, PartitionState(state, pid)) for pid, content, state in contents]
        outcomes = runtime.run(message_type, members)
        replies = [dataclasses.replace(o.member_reply(pid, cfg.client.timeout_s), state=state)
                   for (pid, _, state), o in zip(contents, outcomes, strict=True)]
        return Message(content=group_messages.pack_replies(replies), reply_to=message)

    protocol_steps = [app.train(t.removeprefix("train.")) for t in (secagg_steps.SHARE, secagg_steps.INPUT,
                                                                    secagg_steps.UNMASK)]
    for register in (app.train(), app.train("gossip"), app.train("mix"), app.evaluate(), app.query(), *protocol_steps):
        register(plain)
    action = group_messages.GROUP_ACTION
    for register in (app.train(action), app.evaluate(action), app.query(action)):
        register(group)
    return app

"""fedsim's asynchronous server loop: FedFix, FedAsync and FedBuff on a virtual clock.

Flower's Strategy loop is synchronous, so the asynchronous algorithms run in this loop over
``grid.push_messages`` / ``grid.pull_messages``. Clients train from whatever global model
is newest when they start; the server applies their results in order of arrival:

- FedFix (Fraboni et al., "A General Theory for Federated Optimization with Asynchronous
  and Heterogeneous Clients Updates", JMLR 2023, arXiv 2206.10189): every ``window`` of
  time, the arrivals of that window are aggregated with weights ceil(tau_i / window) * p_i;
  those clients then restart from the new model.
- FedAsync (Xie, Koyejo, Gupta, "Asynchronous Federated Optimization", arXiv 1903.03934):
  each arrival is mixed in at once with alpha * (1 + staleness)^-a.
- FedBuff (Nguyen et al., "Federated Learning with Buffered Asynchronous Aggregation",
  AISTATS 2022, arXiv 2106.06639): every ``buffer_size`` arrivals, a staleness-scaled mean;
  under ``privacy.mechanism: central``, of clipped arrivals with noise on each buffer
  (:mod:`fedsim.privacy.buffered`), and every row has the ``epsilon`` spent so far.

At most ``sim.concurrency`` clients train at once (all by default); a client that finishes
goes back to the idle pool and free slots are refilled from it (FedAsync, FedBuff: at once;
FedFix: at the window's end). Where arrivals come from, and what time is, is the arrival
source's business (:mod:`fedsim.loops.arrivals`): simulated devices on a virtual clock, or
the wall clock in deployment. Each run writes one metrics row per evaluation time
(``strategy.eval_every``), with the virtual time beside the wall time.

Synchronous FedAvg that waits for the slowest client is FedFix with ``window`` at least the
slowest client's time (1.0 without network delay): every client then lands in every window
with weight ceil(tau_i / window) * p_i = p_i, the FedAvg weights, and all restart together.
That is how the asynchronous comparison puts FedAvg on the same virtual time axis.

Determinism: a job's finish time and dropout are computed by the server at dispatch from
the seed, the client and its dispatch count; events are processed in time order with seeded
ties; a client's training is seeded by (seed, its dispatch count, client) and starts from a
model fixed by the events before it. Replies are pulled per event, so the host's load
changes only how long the server waits. Only a reply later than ``client.timeout_s`` of wall
time (a failure by definition) depends on the host.
"""

from __future__ import annotations

import bisect
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from torch import Tensor

from fedsim.algorithms import registry
from fedsim.algorithms.api import AsyncStrategyBase
from fedsim.clients.quantization import build_codec
from fedsim.config import ExperimentConfig
from fedsim.loops.arrivals import (
    LOST,
    Arrival,
    Job,
    SimulatedDevices,
    VirtualArrivals,
    WallArrivals,
)
from fedsim.loops.clock import Clock, WallClock
from fedsim.loops.skeleton import (
    LoopSetup,
    Steps,
    evaluate_global,
    fmt_metric,
    run_steps,
)
from fedsim.outputs.results import RunDir
from fedsim.params import ParamSpec
from fedsim.privacy.buffered import BufferPrivacy
from fedsim.seeding import derive_seed
from fedsim.sim.components import Federation
from fedsim.strategies.asynchronous import AsyncRule
from fedsim.strategies.evaluation import (
    client_evaluations,
    federated_metrics,
    mean_train_metrics,
)
from fedsim.strategies.participation import evaluation_sample
from fedsim.strategies.replies import ClientUpdate, Failure

log = logging.getLogger(__name__)


def build_rule(strategy: AsyncStrategyBase, shares: np.ndarray) -> AsyncRule:
    """The server rule of the algorithm ``strategy.name`` registers."""
    return registry.get(strategy.name)(strategy, shares)


# ------------------------------------------------------------------------ client pool
class ClientPool:
    """Which clients train: at most ``concurrency`` at once.

    Free slots are filled from the idle clients: all of them when there is room, else a
    uniform draw without replacement from a seeded generator.

    Parameters
    ----------
    num_clients : int
        N.
    concurrency : int or None
        Clients training at once (``sim.concurrency``); None means all.
    seed : int
        Seed of the draws.
    """

    def __init__(self, num_clients: int, concurrency: int | None, seed: int) -> None:
        self.concurrency = min(concurrency or num_clients, num_clients)
        self.idle = list(range(num_clients))
        self.in_flight: dict[int, Job] = {}
        self.dispatches = np.zeros(num_clients, dtype=np.int64)
        self._rng = np.random.default_rng(derive_seed(seed, "async-pool"))

    def take(self) -> list[tuple[int, int]]:
        """Clients to start now, as (client, its dispatch count), in client order."""
        free = self.concurrency - len(self.in_flight)
        if free >= len(self.idle):
            chosen = self.idle
        else:
            chosen = sorted(self._rng.choice(self.idle, size=free, replace=False).tolist())
        self.idle = [c for c in self.idle if c not in chosen]
        self.dispatches[chosen] += 1
        return [(c, int(self.dispatches[c])) for c in chosen]

    def start(self, job: Job) -> None:
        """The job of a client returned by :meth:`take` is under way."""
        self.in_flight[job.partition_id] = job

    def finish(self, client: int) -> None:
        """The client's job is over (arrived or failed): it is idle again."""
        del self.in_flight[client]
        bisect.insort(self.idle, client)


# ------------------------------------------------------------------------------ server
@dataclass
class IntervalStats:
    """What happened between two metrics rows."""

    sent: int = 0
    accepted: list[ClientUpdate] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    staleness: list[int] = field(default_factory=list)

    def row(self, model_bytes: int) -> dict[str, Any]:
        """The interval's columns of a metrics row (byte counts of this interval only)."""
        return {
            "num_success": len(self.accepted),
            "num_failed": len(self.failures),
            "failures": [{"client": f.partition_id, "reason": f.reason} for f in self.failures],
            "train_loss": mean_train_metrics(self.accepted).get("train_loss"),
            "staleness_mean": float(np.mean(self.staleness)) if self.staleness else None,
            "staleness_max": max(self.staleness, default=None),
            "bytes_up": sum(u.nbytes for u in self.accepted),
            "bytes_down": model_bytes * self.sent,
        }


class AsyncServer:
    """The state of an asynchronous run and the events that change it.

    Parameters
    ----------
    rule : AsyncRule
        The server algorithm.
    pool : ClientPool
        Who trains.
    source : VirtualArrivals or WallArrivals
        Where arrivals come from; owns the clock.
    spec : ParamSpec
        The model's flat layout.
    template : dict
        A state dict of the model (integer buffers are sent as they are here).
    node_of : dict[int, int]
        Client (partition id) -> Flower node id.
    """

    def __init__(self, rule: AsyncRule, pool: ClientPool, source: VirtualArrivals | WallArrivals,
                 spec: ParamSpec, template: dict[str, Tensor], node_of: dict[int, int]) -> None:
        self.rule = rule
        self.pool = pool
        self.source = source
        self.spec = spec
        self.template = template
        self.node_of = node_of
        self.model = spec.flatten(template)
        self.updates_per_client = np.zeros(len(node_of), dtype=np.int64)
        self.stats = IntervalStats()
        self._arrays: tuple[int, ArrayRecord] | None = None

    def arrays(self, model: Tensor, version: int) -> ArrayRecord:
        """The model of ``version`` as Flower arrays (the current version's is cached)."""
        if self._arrays is not None and self._arrays[0] == version:
            return self._arrays[1]
        record = ArrayRecord({**self.template, **self.spec.unflatten(model)})
        if version == self.rule.version:
            self._arrays = (version, record)
        return record

    def message(self, job: Job) -> Message:
        config = ConfigRecord({"server-round": job.count, "partition-id": job.partition_id})
        content = RecordDict({"arrays": self.arrays(job.base, job.base_version), "config": config})
        return Message(content=content, message_type=MessageType.TRAIN, dst_node_id=self.node_of[job.partition_id])

    def dispatch_free(self) -> None:
        """Start idle clients from the current model until the pool is full (their messages
        go out together)."""
        batch = []
        for client, count in self.pool.take():
            job = Job(client, count, self.model, self.rule.version, self.source.clock.now())
            self.pool.start(job)
            batch.append((job, self.message(job)))
        self.source.dispatch(batch)
        self.stats.sent += len(batch)

    def handle(self, arrival: Arrival) -> None:
        """Apply one arrival (an update or a failure) and free its client."""
        client = arrival.job.partition_id
        self.pool.finish(client)
        if isinstance(arrival.result, Failure):
            level = logging.DEBUG if arrival.result.reason == LOST else logging.WARNING
            log.log(level, "client %d failed at t=%.3f: %s", client, arrival.time, arrival.result.reason)
            self.stats.failures.append(arrival.result)
        else:
            self.stats.accepted.append(arrival.result)
            self.stats.staleness.append(self.rule.version - arrival.job.base_version)
            self.updates_per_client[client] += 1
            self.model = self.rule.receive(self.model, arrival.result, arrival)
        if self.rule.restarts_on_arrival:
            self.dispatch_free()

    def advance_to(self, t: float) -> None:
        """Process every arrival and window end up to time ``t``, in time order (arrivals
        at a window's end belong to that window)."""
        while True:
            boundary = self.rule.next_boundary()
            until = t if boundary is None else min(boundary, t)
            while (arrival := self.source.next_until(until)) is not None:
                self.handle(arrival)
            if boundary is None or boundary > t:
                break
            self.source.clock.advance_to(boundary)
            self.model = self.rule.close_window(self.model)
            self.dispatch_free()
        self.source.clock.advance_to(t)

    def take_stats(self) -> IntervalStats:
        stats, self.stats = self.stats, IntervalStats()
        return stats

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs; jobs are shared between the pool and the queue."""
        return {"model": self.model, "rule": self.rule, "pool": self.pool,
                "updates_per_client": self.updates_per_client, "source": self.source.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a checkpointed run and send the in-flight jobs' messages again (their
        training is seeded, so the replies are the ones the first attempt would have got)."""
        self.model, self.rule, self.pool = state["model"], state["rule"], state["pool"]
        self.updates_per_client = state["updates_per_client"]
        self.source.load_state_dict(state["source"])
        jobs = [self.pool.in_flight[client] for client in sorted(self.pool.in_flight)]
        self.source.resend([(job, self.message(job)) for job in jobs])


# -------------------------------------------------------------------------- evaluation
class EveryClientEvaluation:
    """Federated evaluation in the asynchronous loop: every client, or the clients
    ``eval.federated_fraction`` draws for the step, evaluates the global model on its test
    split (a Flower Strategy's evaluation half, for :func:`fedsim.loops.skeleton.evaluate_global`).

    Parameters
    ----------
    node_of : dict[int, int]
        Client (partition id) -> Flower node id.
    fraction : float or None, default None
        ``eval.federated_fraction`` (:func:`fedsim.strategies.participation.evaluation_sample`); None: every client.
    seed : int, default 0
        The run's seed, of the draws.
    """

    def __init__(self, node_of: dict[int, int], fraction: float | None = None, seed: int = 0) -> None:
        self.node_of = node_of
        self.fraction, self.seed = fraction, seed
        self.evaluated: dict[int, int] = {}  # node id -> client of the latest evaluation messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                           ) -> list[Message]:
        messages = []
        pids = (sorted(self.node_of) if self.fraction is None
                else evaluation_sample(len(self.node_of), self.fraction, self.seed, server_round))
        self.evaluated = {self.node_of[pid]: pid for pid in pids}
        for node, pid in self.evaluated.items():
            client_config = ConfigRecord({**config, "server-round": server_round, "partition-id": pid})
            messages.append(Message(content=RecordDict({"arrays": arrays, "config": client_config}),
                                    message_type=MessageType.EVALUATE, dst_node_id=node))
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> dict[str, float] | None:
        return federated_metrics(client_evaluations(replies, self.evaluated)) or None


class EvalTimes:
    """The times of the metrics rows: every ``eval_every`` up to ``horizon`` (included),
    computed when asked (validation bounds their number: fedsim.config_checks)."""

    def __init__(self, horizon: float, eval_every: float) -> None:
        self.horizon, self.eval_every = horizon, eval_every
        self.count = evaluation_count(horizon, eval_every)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> float:
        if not -self.count <= index < self.count:
            raise IndexError(f"evaluation {index} of {self.count}")
        k = index % self.count + 1
        return min(k * self.eval_every, self.horizon)


def evaluation_count(horizon: float, eval_every: float) -> int:
    """How many evaluations a run of ``horizon`` makes, one every ``eval_every``."""
    return math.ceil(horizon / eval_every - 1e-9)


def time_to_target(rows: list[dict[str, Any]], target: float) -> float | None:
    """Virtual time of the first row whose centralised accuracy reaches ``target``."""
    return next((r["virtual_time"] for r in rows if (r.get("centralised_accuracy") or 0.0) >= target), None)


def data_shares(data: Federation) -> np.ndarray:
    """p_i = n_i / sum_j n_j over the clients' training sets."""
    sizes = data.train_sizes().astype(np.float64)
    return sizes / sizes.sum()


# -------------------------------------------------------------------------------- loop
def arrival_source(grid: Grid, cfg: ExperimentConfig, data: Federation, dim: int,
                   clock: Clock | None) -> VirtualArrivals | WallArrivals:
    """Simulated devices on a virtual clock, or the wall clock when one is given."""
    codec = build_codec(cfg.quant.uplink)
    if isinstance(clock, WallClock):
        return WallArrivals(grid, dim, codec, cfg.client.timeout_s, clock)
    return VirtualArrivals(grid, SimulatedDevices.from_config(cfg, data), dim, codec, cfg.client.timeout_s,
                           derive_seed(cfg.seed, "event-ties"))


class AsyncSteps(Steps):
    """The asynchronous family's step: the arrivals and window ends up to the next
    evaluation time (``strategy.eval_every``), then an evaluation of the global model."""

    x_key = "virtual_time"

    def __init__(self, grid: Grid, cfg: ExperimentConfig, clock: Clock | None) -> None:
        self.cfg = cfg
        self.setup = setup = LoopSetup.build(grid, cfg)
        self.spec, self.template = setup.spec, setup.template
        if clock is None and cfg.sim.clock == "wall":
            clock = WallClock()  # time 0 is when the nodes are ready, not when the ServerApp started
        source = arrival_source(grid, cfg, setup.data, self.spec.dim, clock)
        self.resumable = source.resumable
        rule = build_rule(cfg.strategy, data_shares(setup.data))
        if cfg.privacy.mechanism == "central":
            rule.privacy = BufferPrivacy(cfg)
        self.server = AsyncServer(rule, ClientPool(cfg.partition.num_clients, cfg.sim.concurrency, cfg.seed),
                                  source, self.spec, self.template, setup.node_of)
        self.grid = grid
        self.evaluation = EveryClientEvaluation(setup.node_of, cfg.eval.federated_fraction, cfg.seed)
        self.times = EvalTimes(cfg.strategy.horizon, cfg.strategy.eval_every)
        self.total = len(self.times)

    def begin(self, resumed: bool) -> None:
        if not resumed:
            self.server.dispatch_free()

    def step(self, tick: int) -> dict[str, Any]:
        server = self.server
        server.advance_to(self.times[tick - 1])
        row: dict[str, Any] = {"virtual_time": self.times[tick - 1], "model_version": server.rule.version,
                               **server.take_stats().row(4 * self.spec.dim)}
        if server.rule.privacy is not None:
            row.update(server.rule.privacy.row())
        row.update(evaluate_global(self.cfg, self.grid, self.setup, self.evaluation, tick,
                                   server.arrays(server.model, server.rule.version)))
        return row

    def stop_reason(self, index: int) -> str | None:
        return self.server.rule.privacy.stopped if self.server.rule.privacy is not None else None

    def model_state(self) -> dict[str, Tensor]:
        return {**self.template, **self.spec.unflatten(self.server.model.clone())}

    def state_dict(self) -> dict[str, Any]:
        return self.server.state_dict()

    def load_state_dict(self, model: dict[str, Tensor], state: dict[str, Any]) -> None:
        self.server.load_state_dict(state)
        log.info("resuming at t=%.3f", self.server.source.clock.now())

    def summary(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        privacy = self.server.rule.privacy
        return {"virtual_time": rows[-1]["virtual_time"] if rows else 0.0,
                "virtual_time_to_target": time_to_target(rows, self.cfg.output.target_accuracy),
                "model_updates": self.server.rule.version,
                "updates_per_client": self.server.updates_per_client.tolist(),
                **(privacy.summary() if privacy is not None else {})}

    def log_row(self, row: dict[str, Any]) -> None:
        log.info("t %.2f/%.2f  acc %s  version %d  updates %d  failed %d", row["virtual_time"], self.times[-1],
                 fmt_metric(row.get("centralised_accuracy")), row["model_version"], row["num_success"], row["num_failed"])


def run_async(grid: Grid, cfg: ExperimentConfig, run: RunDir, resume: bool, show_progress: bool,
              clock: Clock | None = None) -> dict[str, Any]:
    """Run (or continue) the configured asynchronous experiment; return its summary.

    ``clock``: None takes ``sim.clock``; a ``VirtualClock`` simulates devices on virtual
    time; a ``WallClock`` runs on real time (deployment; times in seconds, no checkpoints).
    """
    return run_steps(AsyncSteps(grid, cfg, clock), grid, cfg, run, resume, show_progress)


__all__ = ["AsyncServer", "AsyncSteps", "ClientPool", "build_rule", "run_async"]

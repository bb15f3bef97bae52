"""The one Flower strategy every synchronous fedsim algorithm is: in fedsim's engine and in
any Flower app.

:class:`FedsimStrategy` is a subclass of Flower's own ``flwr.serverapp.strategy.FedAvg``:
it takes all of FedAvg's arguments (``fraction_train``, ``fraction_evaluate``,
``min_train_nodes``, ``min_evaluate_nodes``, ``min_available_nodes``, ``weighted_by_key``,
``arrayrecord_key``, ``configrecord_key``, ``train_metrics_aggr_fn``,
``evaluate_metrics_aggr_fn``) plus the keys of its algorithm's config section
(``Config``), checked by that section (one place for their ranges), and runs under
``strategy.start(grid, initial_arrays, num_rounds)``. An algorithm subclass writes its
math once, on client updates:

- :meth:`FedsimStrategy.aggregate_updates` turns the round's accepted updates (one
  :class:`~fedsim.strategies.replies.ClientUpdate` per client, ``Delta_i = w_i - w``) into
  one ``(D,)`` update, with a pure function on tensors; the server optimizer
  (:mod:`fedsim.strategies.server_opt`, ``server_opt``) applies it;
- :meth:`private_aggregate` (``privacy.mechanism: central``) and :meth:`secure_aggregate`
  (``secagg.enabled``) are its forms under differential privacy and secure aggregation;
- :meth:`participants`, :meth:`extra_content`, :meth:`prepare_messages`, :meth:`screen`,
  :meth:`observe`, :meth:`bound` and :meth:`state_dict` / :meth:`load_state_dict` are the
  hooks an algorithm with more state overrides; its client half is its ``client``
  declaration (:mod:`fedsim.algorithms.api`).

Two ways to drive the same class:

- **in a Flower app** (``Flag(fraction_train=0.5, r=8)``): clients are Flower node ids,
  sampled as Flower's FedAvg samples them; replies hold the trained arrays (one
  ArrayRecord) and a MetricRecord with ``weighted_by_key``; the update is the float arrays
  minus the global ones (float64 when the model has float64 arrays); integer arrays keep
  the global value. Evaluation is Flower's.
- **in fedsim's engine** (:meth:`FedsimStrategy.from_experiment`): clients are partition
  ids, sampled by a seeded participation model, so runs are reproducible; replies carry
  the update through the uplink codec; downlink codec, Byzantine update attacks,
  EF21-PP estimates, byte counts and checkpoints (:meth:`state_dict`) are the engine's.

In both, every reply is screened on its own: one with an error, NaN/Inf, arrays of the
wrong keys or shapes or no usable weight is dropped with a warning naming the client and the
reason, and the round goes on; fewer than ``min_successful`` valid replies skip the round
(the global model stays as it is).
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes
from flwr.supercore import log as flower_log
from pydantic import ValidationError

from fedsim.algorithms.api import Algorithm, SyncStrategyBase
from fedsim.attacks import ATTACKS, build_attack, choose_byzantine
from fedsim.clients.quantization import build_codec
from fedsim.clients.secagg_steps import ADVERTISE_KEYS
from fedsim.params import ParamSpec
from fedsim.quant.error_feedback import ServerEstimate
from fedsim.records import from_numpy, to_state_dict
from fedsim.secagg.engine import SecureAggregation
from fedsim.seeding import derive_seed
from fedsim.strategies.aggregate import weighted_mean
from fedsim.strategies.evaluation import (
    client_evaluations,
    federated_metrics,
    mean_train_metrics,
)
from fedsim.strategies.new_clients import NEW_CLIENT, held_out_clients, new_client_metrics
from fedsim.strategies.participation import evaluation_sample
from fedsim.strategies.replies import (
    EF_RESET,
    ClientUpdate,
    Failure,
    scalar_metrics,
    screen_train_replies,
)
from fedsim.strategies.screening import screen_evaluate_replies
from fedsim.strategies.screening import screen_train_replies as screen_flower_replies
from fedsim.strategies.server_opt import ServerOptimizer

if TYPE_CHECKING:
    from fedsim.config import ExperimentConfig
    from fedsim.privacy.server import ServerPrivacy

log = logging.getLogger(__name__)

__all__ = ["FedsimStrategy", "RoundReport", "float_layout"]

# the arguments of Flower's FedAvg that are also keys of every synchronous config section
_SHARED = ("fraction_train", "fraction_evaluate")


@dataclass
class RoundReport:
    """What happened to the clients of the last training round."""

    sampled: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    skipped: bool = False
    bytes_up: int = 0
    bytes_down: int = 0
    row: dict[str, Any] = field(default_factory=dict)  # the algorithm's own values for the round's metrics row
    secagg: dict[str, int] = field(default_factory=dict)  # secure aggregation's costs (fedsim.secagg.engine)


def float_layout(arrays: ArrayRecord) -> tuple[ParamSpec, torch.dtype]:
    """Names and shapes of the floating-point arrays of ``arrays`` in their order, and the
    dtype to aggregate them in: float64 if one of them is float64, else float32."""
    floats = [(name, tuple(array.shape)) for name, array in arrays.items() if np.dtype(array.dtype).kind == "f"]
    wide = any(np.dtype(arrays[name].dtype) == np.float64 for name, _ in floats)
    spec = ParamSpec(tuple(name for name, _ in floats), tuple(shape for _, shape in floats))
    return spec, torch.float64 if wide else torch.float32


@dataclass
class _Engine:
    """What fedsim's engine adds to a strategy (see :meth:`FedsimStrategy.from_experiment`)."""

    exp: ExperimentConfig
    node_of: dict[int, int]
    sampler: Any
    uplink: Any
    downlink: Any
    attack: Any
    byzantine: set[int]
    estimates: ServerEstimate | None
    secagg: SecureAggregation | None
    resync: set[int] = field(default_factory=set)  # clients whose dropped reply reset both copies of h_i
    held_out: frozenset[int] = frozenset()  # eval.new_clients: never sampled for training


class FedsimStrategy(Algorithm, FedAvg):
    """Base of fedsim's synchronous algorithms: FedAvg's example-weighted mean of updates
    (:func:`fedsim.strategies.aggregate.weighted_mean`) unless a subclass overrides
    :meth:`aggregate_updates`. See the module docstring.

    Parameters
    ----------
    *args, **kwargs
        Flower FedAvg's arguments, and the keys of ``Config`` (the algorithm's section of a
        fedsim config: ``min_successful``, ``server_opt`` and its own).
    """

    Config: ClassVar[type[SyncStrategyBase]]
    privacy: ServerPrivacy | None = None
    """The run's differential privacy (fedsim's engine, ``privacy:``): under ``central``
    :meth:`private_aggregate` replaces :meth:`aggregate_updates`; every round is spent in its
    accountant."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Give each algorithm the signature it accepts: Flower FedAvg's arguments, then its
        config section's keys, keyword-only, with their defaults (for ``help`` and IDEs)."""
        super().__init_subclass__(**kwargs)
        if "Config" not in cls.__dict__:
            return
        flower = list(inspect.signature(FedAvg.__init__).parameters.values())[1:]
        own = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=field.get_default(call_default_factory=True))
               for name, field in cls.Config.model_fields.items() if name != "name" and name not in _SHARED]
        cls.__signature__ = inspect.Signature(flower + own)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        fields = type(self).Config.model_fields
        own = {key: kwargs.pop(key) for key in list(kwargs) if key in fields and key not in _SHARED}
        super().__init__(*args, **kwargs)
        self.cfg = self._settings(own)
        self.server_opt = ServerOptimizer(self.cfg.server_opt)
        self.engine: _Engine | None = None
        self.spec: ParamSpec | None = None
        self.report = RoundReport()
        self._parameters: torch.Tensor | None = None  # engine: buffers skip the server optimizer
        self._dtype = torch.float32
        self._sent: dict[int, int] = {}  # node id -> client of this round's training messages
        self._evaluated: dict[int, int] = {}  # node id -> client of the latest evaluation messages
        self._template: ArrayRecord | None = None
        self._global: torch.Tensor | None = None
        self._nodes: list[int] = []
        self._flower_contents: list[RecordDict] = []  # a Flower app's accepted replies, for its metric aggregation

    def _settings(self, own: dict[str, Any]) -> SyncStrategyBase:
        """The algorithm's config section of these arguments, or one ``ValueError`` naming them."""
        from fedsim.config import format_validation_error

        values = {"name": self.name, **own, **{key: getattr(self, key) for key in _SHARED}}
        try:
            return type(self).Config.model_validate(values)
        except ValidationError as exc:
            lines = format_validation_error(exc, root=type(self).Config).splitlines()
            raise ValueError(f"{type(self).__name__}: {'; '.join(lines)}") from None

    @classmethod
    def from_experiment(cls, exp: ExperimentConfig, spec: ParamSpec, node_of: dict[int, int],
                        sampler) -> FedsimStrategy:
        """The strategy of ``exp.strategy``, driven by fedsim's engine.

        Parameters
        ----------
        exp : ExperimentConfig
            ``exp.strategy`` is this algorithm's section; ``exp.quant`` gives the uplink codec
            and error feedback (decoding replies) and the downlink codec; ``exp.attack`` the
            Byzantine clients and their update attack.
        spec : ParamSpec
            The model's flat-vector layout.
        node_of : dict[int, int]
            partition id -> Flower node id.
        sampler : object with ``sample(round) -> list[int]`` (and ``probabilities()``)
            Participation model over partition ids.
        """
        section = exp.strategy
        strategy = cls(**{key: getattr(section, key) for key in type(section).model_fields if key != "name"})
        acts_on_updates = ATTACKS[exp.attack.name].acts_on == "updates"
        feedback = exp.quant.uplink.error_feedback in ("ef21", "econtrol")
        strategy.engine = _Engine(
            exp=exp, node_of=dict(node_of), sampler=sampler, uplink=build_codec(exp.quant.uplink),
            downlink=build_codec(exp.quant.downlink),
            attack=build_attack(exp.attack.name, **exp.attack.kwargs()) if acts_on_updates else None,
            byzantine=set(choose_byzantine(len(node_of), exp.attack.fraction, exp.seed)),
            estimates=ServerEstimate() if feedback else None,
            held_out=held_out_clients(len(node_of), exp.eval.new_clients, exp.seed),
            secagg=SecureAggregation(exp.secagg, exp.seed, exp.faults) if exp.secagg.enabled else None)
        strategy.spec = spec
        strategy._parameters = spec.parameter_mask()
        strategy.bound()
        return strategy

    def log(self, level: int, message: str, *args: Any) -> None:
        """Log to fedsim's logger in fedsim's engine, to Flower's beside its own lines in a
        Flower app."""
        if self.engine:
            log.log(level, message, *args)
        else:
            flower_log(level, message, *args)

    def bound(self) -> None:
        """Called once the engine is attached (:meth:`from_experiment`): set up state that
        needs ``self.engine`` (the clients, the seed)."""

    # ------------------------------------------------------------------ clients
    @property
    def num_clients(self) -> int:
        """N: every client (engine: every partition but the held-out ones of ``eval.new_clients``;
        Flower app: the nodes connected this round); counted, not listed: a per-round call at a
        million clients must not sort them (the held-out clients are partitions of ``node_of``)."""
        if self.engine:
            return len(self.engine.node_of) - len(self.engine.held_out)
        return len(self._nodes)

    def clients(self) -> list[int]:
        """Every client, sorted: partition ids but the held-out ones (engine) or this round's
        connected node ids."""
        if self.engine:
            return sorted(pid for pid in self.engine.node_of if pid not in self.engine.held_out)
        return list(self._nodes)

    @property
    def seed(self) -> int:
        return self.engine.exp.seed if self.engine else 0

    def rejoin(self, node_of: dict[int, int]) -> None:
        """Partitions whose node (re)joined under a new node id: their messages go there from
        now on (replies from the old id are still attributed to the partition)."""
        self.engine.node_of.update(node_of)

    # -------------------------------------------------------------------- hooks
    def participants(self, server_round: int, grid: Grid) -> list[int]:
        """Clients asked to train this round: the participation model (engine) or Flower's
        FedAvg sampling (``fraction_train``, ``min_train_nodes``, ``min_available_nodes``), its
        size taken once ``min_available_nodes`` have connected (Flower's FedAvg counts the nodes
        before it waits, so a first round that starts while nodes connect trains fewer)."""
        if self.engine:  # the held-out clients of eval.new_clients drop out of the draw
            return [pid for pid in self.engine.sampler.sample(server_round) if pid not in self.engine.held_out]
        _, connected = sample_nodes(grid, self.min_available_nodes, 0)
        sample_size = max(int(len(connected) * self.fraction_train), self.min_train_nodes)
        sampled, connected = sample_nodes(grid, self.min_available_nodes, sample_size)
        self._nodes = sorted(connected)
        return list(sampled)

    def extra_content(self, server_round: int) -> dict[str, ArrayRecord]:
        """Records added to every training message of the round (e.g. FedLEx's guidance)."""
        return {}

    def prepare_messages(self, server_round: int, messages: list[Message], clients: list[int]) -> None:
        """Change the round's training messages (one per client, in order) before they go."""

    def screen(self, replies: list[Message]) -> tuple[list[ClientUpdate], list[Failure]]:
        """Decode and check the round's training replies into updates."""
        if self.engine and self.engine.secagg is not None and self.engine.secagg.on_clients:
            return self.engine.secagg.screen(replies, self._sent)  # keys, not updates
        if self.engine:
            return screen_train_replies(replies, self._sent, self.spec.dim, self.engine.uplink)
        return self._screen_flower(replies)

    def observe(self, server_round: int, accepted: list[ClientUpdate]) -> None:
        """Called every round with the accepted updates, before a possible skip."""

    def aggregate_updates(self, server_round: int, updates: list[ClientUpdate]) -> torch.Tensor | None:
        """Combine the accepted updates into one ``(D,)`` update: FedAvg's weighted mean here.
        A subclass returns ``None`` (after logging why) when it cannot aggregate this round's
        replies; the global model then stays as it is."""
        stacked = torch.stack([u.update for u in updates])
        weights = torch.tensor([u.num_examples for u in updates], dtype=torch.float64)
        return weighted_mean(stacked, weights)

    def sum_coefficients(self, server_round: int, updates: list[ClientUpdate]) -> torch.Tensor:
        """The ``c_i`` (float64) with ``aggregate_updates(updates) == sum_i c_i u_i`` when the
        aggregate is a weighted sum of the updates, which secure aggregation computes without
        seeing any one of them; here FedAvg's ``n_i / sum_j n_j``. An algorithm whose own
        :meth:`aggregate_updates` or :meth:`observe` reads individual updates overrides this
        too to take part (:meth:`sums_updates`)."""
        weights = torch.tensor([u.num_examples for u in updates], dtype=torch.float64)
        return weights / weights.sum()

    def private_aggregate(self, server_round: int, updates: list[ClientUpdate]) -> torch.Tensor | None:
        """:meth:`aggregate_updates` under ``privacy.mechanism: central``: what the server
        releases is a noisy function of clipped client vectors, of bounded sensitivity
        (:meth:`fedsim.privacy.server.ServerPrivacy.noisy_sum`); here DP-FedAvg's
        fixed-denominator mean (:meth:`fedsim.privacy.server.ServerPrivacy.aggregate`). An
        algorithm whose :meth:`aggregate_updates`, :meth:`observe` or client records differ
        overrides this too to take part (:meth:`privatises_aggregate`)."""
        return self.privacy.aggregate(server_round, updates)

    @classmethod
    def privatises_aggregate(cls) -> bool:
        """Whether :meth:`private_aggregate` covers what the server reads: it is defined where
        (or below where) :meth:`aggregate_updates` and :meth:`observe` are, and, for an
        algorithm whose clients send records of their own, by the algorithm itself."""
        return cls._covers("private_aggregate", "private_aggregate")

    @classmethod
    def _covers(cls, method: str, records: str) -> bool:
        """``method`` is defined where (or below where) :meth:`aggregate_updates` and
        :meth:`observe` are, and ``records`` by the algorithm itself if its clients send
        records of their own (SCAFFOLD's ``dc_i``)."""
        if cls.sends_client_records() and cls.defined_by(records) is FedsimStrategy:
            return False
        own = cls.defined_by(method)
        return issubclass(own, cls.defined_by("aggregate_updates")) and issubclass(own, cls.defined_by("observe"))

    def secure_aggregate(self, server_round: int, updates: list[ClientUpdate],
                         privacy: ServerPrivacy | None) -> torch.Tensor | None:
        """:meth:`aggregate_updates` under ``secagg.enabled``: ``sum_i c_i u_i``
        (:meth:`sum_coefficients`) from the masked modular sum of secure aggregation
        (:class:`fedsim.secagg.engine.SecureAggregation`), with its costs in the round's
        report; with ``privacy`` (central), distributed DP's noisy mean."""
        dropped = sorted(set(self.report.sampled) - set(self.report.accepted))
        delta, self.report.secagg, self.report.bytes_up, relayed = self.engine.secagg.aggregate(
            server_round, updates, dropped, functools.partial(self.sum_coefficients, server_round), privacy)
        self.report.bytes_down += relayed
        return delta

    @classmethod
    def defined_by(cls, name: str) -> type:
        """The class of ``cls``'s MRO that defines ``name``."""
        return next(k for k in cls.__mro__ if name in k.__dict__)

    @classmethod
    def sums_updates(cls) -> bool:
        """Whether the server needs only the weighted sum of the updates: its
        :meth:`sum_coefficients` is defined where (or below where) its
        :meth:`aggregate_updates` and :meth:`observe` are, and its :meth:`secure_aggregate`
        by itself if its clients send records of their own."""
        return cls._covers("sum_coefficients", "secure_aggregate")

    # --------------------------------------------------------------- training
    def summary(self) -> None:
        log.info("%s: %s", type(self).__name__, self.cfg)
        if not self.engine:
            super().summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._template = arrays
        if not self.engine:
            self.spec, self._dtype = float_layout(arrays)
            self._nodes = sorted(grid.get_node_ids())
        self._global = self._flatten(to_state_dict(arrays))
        if self.fraction_train == 0.0 and not self.engine:
            return []
        clients = self.participants(server_round, grid)
        config = ConfigRecord({**config, "server-round": server_round})
        extra = self.extra_content(server_round)
        if self.engine:
            sent, model_bytes = self._downlink_arrays(arrays)
            self.report = RoundReport(sampled=list(clients), bytes_down=model_bytes * len(clients))
            nodes = [self.engine.node_of[c] for c in clients]
            messages = [self._message(sent, ConfigRecord({**config, "partition-id": c}), extra, node, MessageType.TRAIN)
                        for c, node in zip(clients, nodes, strict=True)]
            for client, message in zip(clients, messages, strict=True):
                if client in self.engine.resync:
                    message.content["config"][EF_RESET] = True
                if self.engine.secagg is not None and self.engine.secagg.on_clients:
                    message.content["config"][ADVERTISE_KEYS] = True
            self.engine.resync -= set(clients)
        else:
            self.report = RoundReport(sampled=list(clients))
            nodes = clients
            messages = [self._message(arrays, config, extra, node, MessageType.TRAIN) for node in nodes]
            self.log(logging.INFO, "configure_train: %d of %d nodes", len(nodes), len(self._nodes))
        self._sent = dict(zip(nodes, clients, strict=True))
        self.prepare_messages(server_round, messages, clients)
        return messages

    def _message(self, arrays: ArrayRecord, config: ConfigRecord, extra: dict[str, ArrayRecord], node: int,
                 message_type: str) -> Message:
        content = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config, **extra})
        return Message(content=content, message_type=message_type, dst_node_id=node)

    def _flatten(self, arrays: dict[str, np.ndarray]) -> torch.Tensor:
        return torch.cat([torch.as_tensor(np.asarray(arrays[name])).reshape(-1).to(self._dtype)
                          for name in self.spec.names])

    def _downlink_arrays(self, arrays: ArrayRecord) -> tuple[ArrayRecord, int]:
        """The model as the engine's clients receive it, and its size on the wire.

        The server keeps the float master copy; clients train from the decoded broadcast.
        In simulation the decoded float arrays travel, and the bytes counted are those of
        the encoded payload.
        """
        payload = self.engine.downlink.encode(self._global)
        if self.engine.downlink.name == "identity":
            return arrays, payload.nbytes
        state = to_state_dict(arrays)
        state.update(self.spec.unflatten(self.engine.downlink.decode(payload)))
        return ArrayRecord(state), payload.nbytes

    def _screen_flower(self, replies: list[Message]) -> tuple[list[ClientUpdate], list[Failure]]:
        """A Flower app's replies: trained arrays minus the global ones, by node id."""
        accepted, rejected = screen_flower_replies(replies, self._template, self.weighted_by_key)
        updates = [ClientUpdate(reply.node_id, reply.weight, self._flatten(reply.arrays) - self._global,
                                sum(a.nbytes for a in reply.arrays.values()), scalar_metrics(reply.content))
                   for reply in accepted]
        self._flower_contents = [reply.content for reply in accepted]
        return sorted(updates, key=lambda u: u.partition_id), [Failure(r.node_id, r.reason) for r in rejected]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self._global is None:
            raise RuntimeError(f"{type(self).__name__}.aggregate_train: no global arrays; "
                               "configure_train sends them, call it first (strategy.start does)")
        accepted, failures = self.screen(list(replies))
        for u in accepted:
            if "ray-node" in u.metrics:
                log.debug("round %d: client %d trained on Ray node %012x", server_round, u.partition_id,
                          int(u.metrics["ray-node"]))
        self.report.accepted = [u.partition_id for u in accepted]
        self.report.failures = failures
        self.report.bytes_up = sum(u.nbytes for u in accepted)
        if self.engine:
            self._apply_attack(server_round, accepted)
            self._track_estimates(accepted)
            metrics = MetricRecord({"num-accepted": len(accepted), "num-failed": len(failures),
                                    **mean_train_metrics(accepted)})
        else:
            self.log(logging.INFO, "aggregate_train: %d replies accepted, %d dropped", len(accepted), len(failures))
            metrics = (self.train_metrics_aggr_fn(self._flower_contents, self.weighted_by_key)
                       if accepted else None)
        self.observe(server_round, accepted)
        if self.privacy is not None:
            self.privacy.spend(self.report.accepted)
        if len(accepted) < self.cfg.min_successful:
            self.report.skipped = True
            self.log(logging.WARNING, "round %d skipped: %d valid replies, %d required", server_round,
                     len(accepted), self.cfg.min_successful)
            return None, metrics
        central = self.privacy is not None and self.privacy.settings.mechanism == "central"
        if self.engine and self.engine.secagg:
            delta = self.secure_aggregate(server_round, accepted, self.privacy if central else None)
        elif central:
            delta = self.private_aggregate(server_round, accepted)
        elif self._estimates is not None:
            delta = self._ef21_pp(server_round)
        else:
            delta = self.aggregate_updates(server_round, accepted)
        if delta is None:
            self.report.skipped = True
            return None, metrics
        self._global = self.server_opt.step(self._global, delta.to(self._global.dtype), self._parameters)
        return self._pack(self._global), metrics

    def _pack(self, vector: torch.Tensor) -> ArrayRecord:
        """The global arrays with their floating-point entries replaced from ``vector``."""
        values = self.spec.unflatten(vector)
        packed = {}
        for name, array in self._template.items():
            if name in values:
                packed[name] = from_numpy(values[name].numpy().astype(np.dtype(array.dtype)))
            else:
                packed[name] = array
        return ArrayRecord(packed)

    @property
    def _estimates(self) -> ServerEstimate | None:
        return self.engine.estimates if self.engine else None

    def _track_estimates(self, accepted: list[ClientUpdate]) -> None:
        """EF21 / EControl: each accepted payload is an increment of the client's estimate
        h_i; a client whose reply was dropped may have moved its h_i: both copies reset."""
        engine = self.engine
        if engine.estimates is None:
            return
        for u in accepted:
            engine.estimates.update(u.partition_id, u.update, u.num_examples)
        dropped = set(self.report.sampled) - set(self.report.accepted)
        for pid in dropped:
            engine.estimates.reset(pid)
        engine.resync |= dropped

    def _ef21_pp(self, server_round: int) -> torch.Tensor | None:
        """EF21-PP: every client seen so far enters with its latest estimate h_i, the clients
        skipped this round included (Fatkhullin et al. 2021, arXiv 2110.03294). FedAvg's
        example-weighted mean is the estimates' running weighted sum (O(model), however many
        clients were seen); a rule of its own (the robust ones) reads every h_i, streamed from
        the estimates' store by client id."""
        estimates = self.engine.estimates
        if type(self).aggregate_updates is FedsimStrategy.aggregate_updates:
            return estimates.mean()
        return self.aggregate_updates(server_round, [ClientUpdate(pid, int(weight), h, 0)
                                                     for pid, weight, h in estimates.items()])

    def keep_server_state_in(self, spill_dir: Path, checkpoint_dir: Path, max_bytes: int) -> None:
        """fedsim's engine, with the run directory: the server's per-client model-sized state
        (EF21/EControl's h_i) is held up to ``max_bytes`` in memory, the rest spilled under
        ``spill_dir``; checkpoints write what changed under ``checkpoint_dir``."""
        if self.engine.estimates is not None:
            self.engine.estimates = ServerEstimate(max_bytes, spill_dir, checkpoint_dir)

    def _apply_attack(self, server_round: int, accepted: list[ClientUpdate]) -> None:
        """Replace the Byzantine clients' updates with the configured attack's output.

        The attacker is omniscient: it sees the round's honest updates (ALIE and IPM need them).
        """
        rows = [i for i, u in enumerate(accepted) if u.partition_id in self.engine.byzantine]
        if self.engine.attack is None or not rows:
            return
        stacked = torch.stack([u.update for u in accepted])
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "attack", server_round))
        attacked = self.engine.attack(stacked, rows, generator=generator)
        for i in rows:
            accepted[i].update = attacked[i]

    # ------------------------------------------------------------- evaluation
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        if not self.engine:
            return super().configure_evaluate(server_round, arrays, config, grid)
        if self.cfg.fraction_evaluate == 0:
            return []
        clients = self.clients()
        if (fraction := self.engine.exp.eval.federated_fraction) is not None:
            pids = [clients[i] for i in evaluation_sample(len(clients), fraction, self.seed, server_round)]
        else:
            pids = clients[: max(1, round(self.cfg.fraction_evaluate * len(clients)))]
        config = ConfigRecord({**config, "server-round": server_round})
        targets = [(pid, False) for pid in pids] + [(pid, True) for pid in sorted(self.engine.held_out)]
        self._evaluated = {self.engine.node_of[pid]: pid for pid, _ in targets}
        return [self._message(arrays, ConfigRecord({**config, "partition-id": pid, NEW_CLIENT: new}), {},
                              self.engine.node_of[pid], MessageType.EVALUATE) for pid, new in targets]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        if not self.engine:
            accepted, rejected = screen_evaluate_replies(list(replies), self.weighted_by_key)
            self.log(logging.INFO, "aggregate_evaluate: %d replies accepted, %d dropped", len(accepted), len(rejected))
            if not accepted:
                return None
            return self.evaluate_metrics_aggr_fn([reply.content for reply in accepted], self.weighted_by_key)
        evaluated, held_out = self._evaluated, self.engine.held_out
        replies = list(replies)
        new = [evaluated.get(reply.metadata.src_node_id) in held_out for reply in replies]
        metrics = {**federated_metrics(client_evaluations([r for r, n in zip(replies, new, strict=True) if not n],
                                                          evaluated)),
                   **new_client_metrics(client_evaluations([r for r, n in zip(replies, new, strict=True) if n],
                                                           evaluated))}
        return MetricRecord(metrics) if metrics else None

    # ------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """Everything needed to resume: server optimizer, participation and EF21 state."""
        state = {"server_opt": self.server_opt.state_dict()}
        engine = self.engine
        if engine.estimates is not None:
            state["uplink_estimates"] = engine.estimates.state_dict()
            state["uplink_resync"] = sorted(engine.resync)
        if hasattr(engine.sampler, "state_dict"):
            state["sampler"] = engine.sampler.state_dict()
        if self.privacy is not None:
            state["privacy"] = self.privacy.state_dict()
        return state

    def clients_lost_state(self) -> None:
        """Resuming without the clients' states of the checkpoint (deployment: a SuperNode
        keeps its own, possibly from a later round): state the server shares with a client
        is reset or resent. EF21/EControl: both copies of every estimate start again from 0."""
        engine = self.engine
        if engine.estimates is not None:
            engine.resync |= set(engine.node_of)
            engine.estimates.clear()

    def load_state_dict(self, state: dict) -> None:
        engine = self.engine
        self.server_opt.load_state_dict(state.get("server_opt", {}))
        if engine.estimates is not None and "uplink_examples" in state:
            # a checkpoint of fedsim before the running sum: every h_i itself, and each client's examples
            engine.estimates.clear()
            for key, estimate in state["uplink_estimates"].items():
                engine.estimates.update(int(key), estimate, state["uplink_examples"][int(key)])
        elif engine.estimates is not None and "uplink_estimates" in state:
            engine.estimates.load_state_dict(state["uplink_estimates"])
        if engine.estimates is not None:
            engine.resync = set(state.get("uplink_resync", ()))
        if "sampler" in state:
            engine.sampler.load_state_dict(state["sampler"])
        if self.privacy is not None and "privacy" in state:
            self.privacy.load_state_dict(state["privacy"])

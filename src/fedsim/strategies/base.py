"""The Flower adapter every synchronous fedsim strategy shares.

A fedsim strategy is a Flower ``Strategy`` (configure/aggregate for train and evaluate),
so Flower's orchestration drives it, with three differences from Flower's built-ins:

- clients are addressed by *partition id*, sampled by a seeded participation model, so a
  run is reproducible although Flower's node ids are random;
- every reply is screened (:mod:`fedsim.strategies.replies`) and a bad one is dropped
  and logged, never fatal; fewer than ``min_successful`` valid replies skip the round;
- the math lives in :meth:`FedsimStrategy.aggregate_updates`, which subclasses implement
  by calling a pure function on an (N, D) tensor of updates. The result is applied by
  the server optimizer (:mod:`fedsim.strategies.server_opt`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedsim.attacks import ATTACKS, build_attack, choose_byzantine
from fedsim.clients.quantization import build_codec
from fedsim.config import ExperimentConfig, SyncStrategyBase
from fedsim.params import ParamSpec
from fedsim.quant.error_feedback import ServerEstimate
from fedsim.records import to_state_dict
from fedsim.seeding import derive_seed
from fedsim.strategies.aggregate import weighted_mean
from fedsim.strategies.evaluation import client_accuracy_percentiles
from fedsim.strategies.replies import EF_RESET, ClientUpdate, Failure, screen_train_replies
from fedsim.strategies.server_opt import ServerOptimizer

log = logging.getLogger(__name__)


@dataclass
class RoundReport:
    """What happened to the clients of the last training round."""

    sampled: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    skipped: bool = False
    bytes_up: int = 0
    bytes_down: int = 0


class FedsimStrategy(Strategy):
    """Base adapter: sampling, messaging, reply screening, server optimizer, state.

    Parameters
    ----------
    exp : ExperimentConfig
        The experiment: ``exp.strategy`` is this strategy's section; ``exp.quant`` gives the
        uplink codec and error feedback (decoding replies) and the downlink codec;
        ``exp.attack`` the Byzantine clients and their update attack.
    spec : ParamSpec
        The model's flat-vector layout.
    node_of : dict[int, int]
        partition id -> Flower node id.
    sampler : object with ``sample(round) -> list[int]`` and ``probabilities()``
        Participation model over partition ids.
    client_config : dict
        Extra entries every training message carries (e.g. ``proximal-mu``).
    """

    def __init__(self, exp: ExperimentConfig, spec: ParamSpec, node_of: dict[int, int], sampler,
                 client_config: dict | None = None) -> None:
        self.exp = exp
        self.cfg: SyncStrategyBase = exp.strategy
        quant = exp.quant
        self.spec = spec
        self.sampler = sampler
        self.node_of = dict(node_of)
        self.pid_of = {n: p for p, n in self.node_of.items()}
        self.client_config = dict(client_config or {})
        self.server_opt = ServerOptimizer(self.cfg.server_opt)
        self._parameters = spec.parameter_mask()  # buffers skip the server optimizer
        # update attacks act here; data attacks (label flip) act on the Byzantine clients
        acts_on_updates = ATTACKS[exp.attack.name].acts_on == "updates"
        self.attack = build_attack(exp.attack.name, **exp.attack.kwargs()) if acts_on_updates else None
        self.byzantine = set(choose_byzantine(self.num_clients, exp.attack.fraction, exp.seed))
        self.uplink = build_codec(quant.uplink)
        self.downlink = build_codec(quant.downlink)
        # EF21 / EControl: the server keeps each client's running estimate h_i
        self.estimates = ServerEstimate() if quant.uplink.error_feedback in ("ef21", "econtrol") else None
        self._examples: dict[int, int] = {}
        self._resync: set[int] = set()  # clients whose dropped reply reset both copies of h_i
        self.report = RoundReport()
        self._sent: dict[int, int] = {}
        self._template: dict[str, torch.Tensor] = {}
        self._global: torch.Tensor | None = None

    @property
    def num_clients(self) -> int:
        return len(self.node_of)

    def rejoin(self, node_of: dict[int, int]) -> None:
        """Partitions whose node (re)joined under a new node id: their messages go there from
        now on (replies from the old id are still attributed to the partition)."""
        self.node_of.update(node_of)
        self.pid_of.update({n: p for p, n in node_of.items()})

    # ---------------------------------------------------------------- hooks
    def participants(self, server_round: int) -> list[int]:
        """Partition ids asked to train this round (the participation model by default)."""
        return self.sampler.sample(server_round)

    def extra_content(self, server_round: int) -> dict[str, ArrayRecord]:
        """Records added to every training message of the round (e.g. FedLEx's guidance)."""
        return {}

    def observe(self, server_round: int, accepted: list[ClientUpdate]) -> None:
        """Called every round with the accepted updates, before a possible skip."""

    def screen(self, replies: list[Message]) -> tuple[list[ClientUpdate], list[Failure]]:
        """Decode and check the round's training replies (the update through the uplink codec)."""
        return screen_train_replies(replies, self._sent, self.spec.dim, self.uplink)

    def aggregate_updates(self, server_round: int, updates: list[ClientUpdate]) -> torch.Tensor:
        """Combine the accepted updates into one (D,) update. FedAvg by default."""
        stacked = torch.stack([u.update for u in updates])
        weights = torch.tensor([u.num_examples for u in updates], dtype=torch.float32)
        return weighted_mean(stacked, weights)

    # -------------------------------------------------------------- Flower API
    def summary(self) -> None:
        log.info("%s: %d clients, %s", type(self).__name__, self.num_clients, self.cfg)

    def _messages(self, pids: Iterable[int], arrays: ArrayRecord, config: ConfigRecord,
                  message_type: str, extra: dict[str, ArrayRecord] | None = None) -> list[Message]:
        msgs = []
        for pid in pids:
            cfg = ConfigRecord({**config, "partition-id": pid})
            content = RecordDict({"arrays": arrays, "config": cfg, **(extra or {})})
            msgs.append(Message(content=content, message_type=message_type, dst_node_id=self.node_of[pid]))
        return msgs

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._template = to_state_dict(arrays)
        self._global = self.spec.flatten(self._template)
        pids = self.participants(server_round)
        self._sent = {self.node_of[p]: p for p in pids}
        sent_arrays, model_bytes = self._downlink_arrays(arrays)
        self.report = RoundReport(sampled=list(pids), bytes_down=model_bytes * len(pids))
        config = ConfigRecord({**config, **self.client_config, "server-round": server_round})
        messages = self._messages(pids, sent_arrays, config, MessageType.TRAIN, self.extra_content(server_round))
        for pid, message in zip(pids, messages, strict=True):
            if pid in self._resync:
                message.content["config"][EF_RESET] = True
        self._resync -= set(pids)
        return messages

    def _downlink_arrays(self, arrays: ArrayRecord) -> tuple[ArrayRecord, int]:
        """The model as the clients receive it, and its size on the wire.

        The server keeps the float master copy; clients train from the decoded broadcast.
        In simulation the decoded float arrays travel, and the bytes counted are those of
        the encoded payload.
        """
        payload = self.downlink.encode(self._global)
        if self.downlink.name == "identity":
            return arrays, payload.nbytes
        state = dict(self._template)
        state.update(self.spec.unflatten(self.downlink.decode(payload)))
        return ArrayRecord(state), payload.nbytes

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        accepted, failures = self.screen(list(replies))
        for u in accepted:
            if "ray-node" in u.metrics:
                log.debug("round %d: client %d trained on Ray node %012x", server_round, u.partition_id,
                          int(u.metrics["ray-node"]))
        self.report.accepted = [u.partition_id for u in accepted]
        self.report.failures = failures
        self.report.bytes_up = sum(u.nbytes for u in accepted)
        self._apply_attack(server_round, accepted)
        if self.estimates is not None:
            for u in accepted:  # the payload is an increment of the client's estimate h_i
                self.estimates.update(u.partition_id, u.update)
                self._examples[u.partition_id] = u.num_examples
            dropped = set(self.report.sampled) - set(self.report.accepted)
            for pid in dropped:  # the client may have moved its h_i: reset both copies
                self.estimates.reset(pid)
                self._examples.pop(pid, None)
            self._resync |= dropped
        self.observe(server_round, accepted)
        metrics = MetricRecord({"num-accepted": len(accepted), "num-failed": len(failures)})
        if accepted:
            total = sum(u.num_examples for u in accepted)
            for key in ("train_loss", "train_accuracy"):
                values = [u.metrics[key] * u.num_examples for u in accepted if key in u.metrics]
                if values:
                    metrics[key] = sum(values) / total
        if len(accepted) < self.cfg.min_successful:
            self.report.skipped = True
            log.warning("round %d skipped: %d valid replies, %d required",
                        server_round, len(accepted), self.cfg.min_successful)
            return None, metrics
        delta = self.aggregate_updates(server_round, self._ef21_pp() if self.estimates else accepted)
        new_global = self.server_opt.step(self._global, delta, self._parameters)
        self._global = new_global
        state = dict(self._template)
        state.update(self.spec.unflatten(new_global))
        return ArrayRecord(state), metrics

    def _ef21_pp(self) -> list[ClientUpdate]:
        """EF21-PP: every client seen so far enters with its latest estimate h_i, the clients
        skipped this round included (Richtarik et al. 2021, partial participation)."""
        return [ClientUpdate(pid, self._examples[pid], h, 0) for pid, h in sorted(
            (int(k), v) for k, v in self.estimates.items())]

    def _apply_attack(self, server_round: int, accepted: list[ClientUpdate]) -> None:
        """Replace the Byzantine clients' updates with the configured attack's output.

        The attacker is omniscient: it sees the round's honest updates (ALIE and IPM need them).
        """
        rows = [i for i, u in enumerate(accepted) if u.partition_id in self.byzantine]
        if self.attack is None or not rows:
            return
        stacked = torch.stack([u.update for u in accepted])
        generator = torch.Generator().manual_seed(derive_seed(self.exp.seed, "attack", server_round))
        attacked = self.attack(stacked, rows, generator=generator)
        for i in rows:
            accepted[i].update = attacked[i]

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        if self.cfg.fraction_evaluate == 0:
            return []
        count = max(1, round(self.cfg.fraction_evaluate * self.num_clients))
        pids = sorted(self.node_of)[:count] if count < self.num_clients else sorted(self.node_of)
        config = ConfigRecord({**config, "server-round": server_round})
        return self._messages(pids, arrays, config, MessageType.EVALUATE)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        total, loss, correct, accuracies = 0, 0.0, 0.0, []
        for msg in replies:
            if msg.has_error():
                log.warning("evaluation failed on client %s: %s",
                            self.pid_of.get(msg.metadata.src_node_id), msg.error.reason)
                continue
            rec = next(iter(msg.content.metric_records.values()))
            n = int(rec["num-examples"])
            total += n
            loss += float(rec["eval_loss"]) * n
            correct += float(rec["eval_accuracy"]) * n
            if n > 0:
                accuracies.append(float(rec["eval_accuracy"]))
        if total == 0:
            return None
        return MetricRecord({"federated_loss": loss / total, "federated_accuracy": correct / total,
                             **client_accuracy_percentiles(accuracies)})

    # ------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """Everything needed to resume: server optimizer and participation state."""
        state = {"server_opt": self.server_opt.state_dict()}
        if self.estimates is not None:
            state["uplink_estimates"] = self.estimates.state_dict()
            state["uplink_examples"] = dict(self._examples)
            state["uplink_resync"] = sorted(self._resync)
        if hasattr(self.sampler, "state_dict"):
            state["sampler"] = self.sampler.state_dict()
        return state

    def clients_lost_state(self) -> None:
        """Resuming without the clients' states of the checkpoint (deployment: a SuperNode
        keeps its own, possibly from a later round): state the server shares with a client
        is reset or resent. EF21/EControl: both copies of every estimate start again from 0."""
        if self.estimates is not None:
            self._resync |= set(self.node_of)
            self.estimates.load_state_dict({})
            self._examples.clear()

    def load_state_dict(self, state: dict) -> None:
        self.server_opt.load_state_dict(state.get("server_opt", {}))
        if self.estimates is not None and "uplink_estimates" in state:
            self.estimates.load_state_dict(state["uplink_estimates"])
            self._examples = dict(state["uplink_examples"])
            self._resync = set(state.get("uplink_resync", ()))
        if "sampler" in state:
            self.sampler.load_state_dict(state["sampler"])

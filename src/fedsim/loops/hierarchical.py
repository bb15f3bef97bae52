"""Hierarchical FL's round loop: clients aggregate at gateways (edge servers), gateways at the cloud.

One step (one metrics row) is a cloud round r of ``hierarchy.edge_rounds`` = E edge rounds.
Every gateway starts the round from the cloud model. Edge round e (virtual time
``t = (r - 1) E + e - 1``, one unit per edge round; it is also the clients' ``server-round``,
which seeds their training) samples clients with the run's participation model; each sampled
client in contact with a gateway at time t (:mod:`fedsim.strategies.hierarchy`) trains from
that gateway's model, and each gateway runs one round of the configured synchronous strategy
(its own instance: screening, attacks, codecs, server optimizer) on its clients' replies,
their weights scaled by ``hierarchy.weighting``. After E edge rounds the cloud combines the
gateways' updates ``w_g - w`` with the aggregation of the algorithm ``hierarchy.cloud``,
each weighted by :func:`~fedsim.strategies.hierarchy.cloud_weights`, and evaluates the new
cloud model (SemSpaceFL, arXiv 2505.00966; see :mod:`fedsim.strategies.hierarchy`).

A row adds ``edge_weights`` (each gateway's weight at the cloud) to the synchronous row; its
counts and bytes are the clients' links summed over the edge rounds (the gateway-cloud links
are not counted). The summary adds :func:`accuracy_oscillation`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid

from fedsim.algorithms import registry
from fedsim.config import ExperimentConfig
from fedsim.loops.skeleton import LoopSetup, Steps, evaluate_global, fmt_metric, run_steps
from fedsim.loops.sync import build_strategy, label_mix
from fedsim.outputs.results import RunDir
from fedsim.records import to_state_dict
from fedsim.seeding import derive_seed
from fedsim.sim.messaging import send_and_collect
from fedsim.strategies.base import FedsimStrategy
from fedsim.strategies.hierarchy import (
    association_shares,
    cloud_weights,
    edge_scale,
    orbit_contacts,
    static_contacts,
)
from fedsim.strategies.participation import build_sampler
from fedsim.strategies.replies import ClientUpdate

log = logging.getLogger(__name__)


class _GatewayClients:
    """A gateway strategy's participation: the clients the loop assigns it this edge round;
    each client's probability of taking part (FedAU's known weights) is the run's."""

    def __init__(self, run_sampler) -> None:
        self.run_sampler = run_sampler
        self.assigned: list[int] = []

    def sample(self, server_round: int) -> list[int]:
        return list(self.assigned)

    def probabilities(self) -> np.ndarray:
        return self.run_sampler.probabilities()


class HierarchySteps(Steps):
    """Cloud rounds of gateways running the configured strategy (see the module docstring)."""

    def __init__(self, grid: Grid, cfg: ExperimentConfig) -> None:
        self.grid, self.cfg, self.h = grid, cfg, cfg.hierarchy
        self.total = cfg.rounds
        self.setup = setup = LoopSetup.build(grid, cfg)
        mix = label_mix(setup.data)
        self.sampler = build_sampler(cfg, mix)
        self.gateways = [build_strategy(cfg, setup.spec, setup.node_of, mix) for _ in range(self.h.num_edges)]
        for gateway in self.gateways:
            gateway.engine.sampler = _GatewayClients(self.sampler)
        cloud_algorithm = registry.get(self.h.cloud)
        cloud_cfg = cfg.model_copy(update={"strategy": cloud_algorithm.Config(name=self.h.cloud)})
        # the cloud's clients are the gateways
        gateways = {g: g for g in range(self.h.num_edges)}
        self.cloud = cloud_algorithm.from_experiment(cloud_cfg, setup.spec, gateways, _GatewayClients(self.sampler))
        self.phases = np.random.default_rng(derive_seed(cfg.seed, "orbits")).random(cfg.partition.num_clients)
        self.arrays = ArrayRecord(setup.net.state_dict())

    def contacts(self, times: np.ndarray) -> np.ndarray:
        """The gateway of every client at each of ``times`` (``(T, num_clients)``)."""
        h, n = self.h, self.cfg.partition.num_clients
        if h.association == "static":
            return static_contacts(n, h.num_edges, times)
        return orbit_contacts(self.phases, h.orbit_period, h.num_edges, h.contact_width, times)

    def step(self, rnd: int) -> dict[str, Any]:
        cfg, h, spec = self.cfg, self.h, self.setup.spec
        times = np.arange((rnd - 1) * h.edge_rounds, rnd * h.edge_rounds)
        contacts = self.contacts(times)
        shares = association_shares(contacts, h.num_edges)
        n = cfg.partition.num_clients
        num_examples = np.zeros(n)
        aggregated = np.zeros((n, h.num_edges), dtype=bool)
        edge_arrays = [self.arrays] * h.num_edges
        row: dict[str, Any] = {"num_sampled": 0, "num_success": 0, "num_failed": 0, "failures": [], "bytes_up": 0,
                               "bytes_down": 0}
        losses: list[tuple[float, float]] = []
        for t, where in zip(times.tolist(), contacts, strict=True):
            sampled = self.sampler.sample(t + 1)
            for g, gateway in enumerate(self.gateways):
                clients = [k for k in sampled if where[k] == g]
                if not clients:
                    continue
                gateway.engine.sampler.assigned = clients
                messages = list(gateway.configure_train(t + 1, edge_arrays[g], ConfigRecord(), self.grid))
                replies = send_and_collect(self.grid, messages, cfg.client.timeout_s)
                with _weighing(gateway, edge_scale(h.weighting, shares, g), num_examples, aggregated[:, g], losses):
                    new_arrays, _ = gateway.aggregate_train(t + 1, replies)
                if new_arrays is not None:
                    edge_arrays[g] = new_arrays
                report = gateway.report
                row["num_sampled"] += len(report.sampled)
                row["num_success"] += len(report.accepted)
                row["num_failed"] += len(report.failures)
                row["failures"] += [{"client": f.partition_id, "reason": f.reason} for f in report.failures]
                row["bytes_up"] += report.bytes_up
                row["bytes_down"] += report.bytes_down
        weights = cloud_weights(h.weighting, num_examples, shares, aggregated)
        global_flat = spec.flatten(to_state_dict(self.arrays))
        updates = [ClientUpdate(g, float(weights[g]), spec.flatten(to_state_dict(edge_arrays[g])) - global_flat, 0)
                   for g in range(h.num_edges) if weights[g] > 0]
        self.cloud.observe(rnd, updates)
        delta = self.cloud.aggregate_updates(rnd, updates) if updates else None
        row["skipped"] = delta is None
        if delta is not None:
            state = to_state_dict(self.arrays)
            state.update(spec.unflatten(global_flat + delta.to(global_flat.dtype)))
            self.arrays = ArrayRecord(state)
        total = sum(count for _, count in losses)
        row["train_loss"] = sum(loss * count for loss, count in losses) / total if total else None
        row["edge_weights"] = [float(w) for w in weights]
        if rnd % cfg.eval.every == 0 or rnd == cfg.rounds:
            row.update(evaluate_global(cfg, self.grid, self.setup, self.gateways[0], rnd, self.arrays))
        return row

    def model_state(self) -> dict[str, torch.Tensor]:
        return to_state_dict(self.arrays)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"gateways": [gateway.state_dict() for gateway in self.gateways],
                                 "cloud": self.cloud.state_dict()}
        if hasattr(self.sampler, "state_dict"):
            state["sampler"] = self.sampler.state_dict()
        return state

    def load_state_dict(self, model: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        self.arrays = ArrayRecord(model)
        for gateway, saved in zip(self.gateways, state["gateways"], strict=True):
            gateway.load_state_dict(saved)
        self.cloud.load_state_dict(state["cloud"])
        if "sampler" in state:
            self.sampler.load_state_dict(state["sampler"])

    def summary(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        return {"accuracy_oscillation": accuracy_oscillation(rows)}

    def log_row(self, row: dict[str, Any]) -> None:
        log.info("round %d/%d  acc %s  loss %s  ok %d  failed %d%s", row["round"], self.total,
                 fmt_metric(row.get("centralised_accuracy")), fmt_metric(row.get("centralised_loss")),
                 row["num_success"], row["num_failed"], "  SKIPPED" if row["skipped"] else "")


def accuracy_oscillation(rows: list[dict[str, Any]]) -> float | None:
    """How unstably a run converges: the mean absolute change of the centralised accuracy
    between consecutive evaluations over the second half of the run's rows (None with fewer
    than two evaluations there)."""
    late = [r["centralised_accuracy"] for r in rows[len(rows) // 2:] if r.get("centralised_accuracy") is not None]
    if len(late) < 2:
        return None
    return float(np.abs(np.diff(late)).mean())


@contextlib.contextmanager
def _weighing(gateway: FedsimStrategy, scale: np.ndarray, num_examples: np.ndarray, aggregated: np.ndarray,
              losses: list[tuple[float, float]]):
    """While open, ``gateway`` screens its replies into updates whose weight ``n_k`` is scaled
    by ``scale[k]`` (its aggregation reads the weights it is given), and records each
    accepted client's ``n_k``, that the gateway aggregated it, and its training loss with
    ``n_k``."""
    screen = gateway.screen

    def weighed(replies):
        accepted, failures = screen(replies)
        for u in accepted:
            num_examples[u.partition_id] = u.num_examples
            aggregated[u.partition_id] = True
            if "train_loss" in u.metrics:
                losses.append((u.metrics["train_loss"], u.num_examples))
        return [dataclasses.replace(u, num_examples=u.num_examples * float(scale[u.partition_id]))
                for u in accepted], failures

    gateway.screen = weighed
    try:
        yield
    finally:
        del gateway.screen


def run_hierarchical(grid: Grid, cfg: ExperimentConfig, run: RunDir, resume: bool, show_progress: bool
                     ) -> dict[str, Any]:
    """Run (or continue) the configured hierarchical experiment; return its summary."""
    return run_steps(HierarchySteps(grid, cfg), grid, cfg, run, resume, show_progress)


__all__ = ["HierarchySteps", "run_hierarchical"]

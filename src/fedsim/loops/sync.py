"""fedsim's synchronous round loop over a Flower Grid.

It drives a Flower ``Strategy`` exactly as ``Strategy.start`` does (configure_train ->
send -> collect replies -> aggregate_train -> configure_evaluate -> aggregate_evaluate ->
centralised evaluation), and adds what ``start`` lacks through the shared skeleton
(:mod:`fedsim.loops.skeleton`): starting from a checkpointed round, a metrics row per round
written as it completes, checkpoints, a progress bar, the summary; and failure accounting.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid

from fedsim.algorithms import registry
from fedsim.config import ExperimentConfig
from fedsim.loops.secagg_messages import DeployedSecureAggregation
from fedsim.loops.skeleton import (
    LoopSetup,
    Steps,
    evaluate_global,
    fmt_metric,
    run_steps,
)
from fedsim.outputs.results import RunDir
from fedsim.params import ParamSpec
from fedsim.privacy.server import ServerPrivacy
from fedsim.records import to_state_dict
from fedsim.sim.components import Federation
from fedsim.sim.messaging import PartitionGrid, send_and_collect
from fedsim.sim.rejoin import NodeWatch
from fedsim.strategies.base import FedsimStrategy
from fedsim.strategies.participation import build_sampler

log = logging.getLogger(__name__)


def label_mix(data: Federation) -> np.ndarray:
    """Each client's label proportions in its training split (clients x classes)."""
    counts = data.label_counts().astype(np.float64)
    return counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)


def build_strategy(exp: ExperimentConfig, spec: ParamSpec, node_of: dict[int, int],
                   label_mix: np.ndarray | None = None) -> FedsimStrategy:
    """The configured synchronous strategy, driven by fedsim's engine."""
    return registry.get(exp.strategy.name).from_experiment(exp, spec, node_of, build_sampler(exp, label_mix))


class SyncSteps(Steps):
    """The synchronous family's step: one round of the configured Flower strategy (see the
    module docstring), evaluated every ``eval.every`` rounds and after the last."""

    def __init__(self, grid: Grid, cfg: ExperimentConfig) -> None:
        self.grid, self.cfg = grid, cfg
        self.total = cfg.rounds
        self.setup = setup = LoopSetup.build(grid, cfg)
        # the label mix costs a pass over every client's labels: only for the participation model that reads it
        mix = label_mix(setup.data) if cfg.participation.tied_to_labels else None
        self.strategy = build_strategy(cfg, setup.spec, setup.node_of, mix)
        if cfg.secagg.enabled and not isinstance(grid, PartitionGrid):  # real clients run their own steps
            engine = self.strategy.engine
            engine.secagg = DeployedSecureAggregation(cfg, grid, engine.node_of, setup.spec.dim)
        if cfg.privacy.mechanism != "none":
            self.strategy.privacy = ServerPrivacy(cfg, setup.data.train_sizes().tolist())
        self.joins = NodeWatch(setup.node_of)
        self.arrays = ArrayRecord(setup.net.state_dict())

    def step(self, rnd: int) -> dict[str, Any]:
        cfg, strategy = self.cfg, self.strategy
        strategy.rejoin(self.joins.joined(self.grid, cfg.client.timeout_s))
        private = strategy.privacy.client_config() if strategy.privacy is not None else {}
        messages = list(strategy.configure_train(rnd, self.arrays, ConfigRecord(private), self.grid))
        replies = send_and_collect(self.grid, messages, cfg.client.timeout_s)
        new_arrays, train_metrics = strategy.aggregate_train(rnd, replies)
        if new_arrays is not None:
            self.arrays = new_arrays
        report = strategy.report
        row: dict[str, Any] = {
            "num_sampled": len(report.sampled),
            "num_success": len(report.accepted),
            "num_failed": len(report.failures),
            "failures": [{"client": f.partition_id, "reason": f.reason} for f in report.failures],
            "skipped": report.skipped,
            "train_loss": (train_metrics or {}).get("train_loss"),
            "bytes_up": report.bytes_up,
            "bytes_down": report.bytes_down,
            **report.row,
        }
        row.update(report.secagg)
        if strategy.privacy is not None:
            row.update(strategy.privacy.row())
        if "train_tokens_per_s" in (train_metrics or {}):  # a language model's clients
            row["train_tokens_per_s"] = train_metrics["train_tokens_per_s"]
        if rnd % cfg.eval.every == 0 or rnd == cfg.rounds:
            row.update(evaluate_global(cfg, self.grid, self.setup, strategy, rnd, self.arrays))
        return row

    def model_state(self) -> dict[str, torch.Tensor]:
        return to_state_dict(self.arrays)

    def stop_reason(self, index: int) -> str | None:
        return self.strategy.privacy.stop_reason() if self.strategy.privacy is not None else None

    def summary(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        return self.strategy.privacy.summary() if self.strategy.privacy is not None else {}

    def state_dict(self) -> dict[str, Any]:
        return self.strategy.state_dict()

    def load_state_dict(self, model: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        self.arrays = ArrayRecord(model)
        self.strategy.load_state_dict(state)
        if not isinstance(self.grid, PartitionGrid):  # the clients' states were not restored
            self.strategy.clients_lost_state()

    def log_row(self, row: dict[str, Any]) -> None:
        log.info("round %d/%d  acc %s  loss %s  ok %d  failed %d%s", row["round"], self.total,
                 fmt_metric(row.get("centralised_accuracy")), fmt_metric(row.get("centralised_loss")),
                 row["num_success"], row["num_failed"], "  SKIPPED" if row["skipped"] else "")


def run_sync(grid: Grid, cfg: ExperimentConfig, run: RunDir, resume: bool, show_progress: bool) -> dict[str, Any]:
    """Run (or continue) the configured synchronous experiment; return its summary. The
    server's per-client state is bounded as the clients' is (``sim.client_state_mb``) and
    spills to ``<run>/server_estimates/``."""
    steps = SyncSteps(grid, cfg)
    steps.strategy.keep_server_state_in(run.path / "server_estimates", run.checkpoint_dir / "estimates",
                                        int(cfg.sim.client_state_mb * 2**20))
    return run_steps(steps, grid, cfg, run, resume, show_progress)


__all__ = ["SyncSteps", "run_sync"]

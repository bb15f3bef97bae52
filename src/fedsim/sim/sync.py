"""fedsim's synchronous round loop over a Flower Grid.

It drives a Flower ``Strategy`` exactly as ``Strategy.start`` does (configure_train ->
send -> collect replies -> aggregate_train -> configure_evaluate -> aggregate_evaluate ->
centralised evaluation), and adds what ``start`` lacks: starting from a checkpointed
round, a metrics row per round written as it completes, checkpoints, a progress bar,
and failure accounting.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedsim.clients.train import evaluate
from fedsim.config import ExperimentConfig
from fedsim.params import ParamSpec
from fedsim.quant.ptq import quantize_weights_awq, quantize_weights_rtn
from fedsim.sim.components import FederatedData, build_loss, federated_data, make_model, resolve_device
from fedsim.sim.messaging import send_and_collect
from fedsim.sim.plots import plot_run
from fedsim.sim.progress import RoundProgress
from fedsim.sim.rejoin import NodeWatch
from fedsim.sim.results import Checkpoint, RunDir, bytes_so_far, summarise
from fedsim.strategies import build_strategy

log = logging.getLogger(__name__)


def discover_clients(grid: Grid, num_clients: int, wait_s: float) -> dict[int, int]:
    """Wait until ``num_clients`` nodes are registered, then map partition id -> node id.

    Round 1 must not start with part of the federation: Flower would sample from the nodes
    registered so far. Each node is asked which partition it plays (a QUERY message).
    """
    deadline = time.monotonic() + wait_s
    while len(nodes := sorted(grid.get_node_ids())) < num_clients:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(nodes)} of {num_clients} client nodes registered "
                               f"after {wait_s:.0f} s (sim.wait_for_nodes_s)")
        time.sleep(0.2)
    queries = [Message(content=RecordDict(), message_type=MessageType.QUERY, dst_node_id=n) for n in nodes]
    replies = send_and_collect(grid, queries, wait_s)
    node_of: dict[int, int] = {}
    for msg in replies:
        if msg.has_error():
            raise RuntimeError(f"node {msg.metadata.src_node_id} failed to report its partition: "
                               f"{msg.error.reason}")
        pid = int(next(iter(msg.content.metric_records.values()))["partition-id"])
        if pid in node_of:
            raise RuntimeError(f"two nodes claim partition {pid}")
        node_of[pid] = msg.metadata.src_node_id
    missing = sorted(set(range(num_clients)) - set(node_of))
    if missing:
        raise RuntimeError(f"no node plays partition(s) {missing}; check each node's partition-id")
    return node_of


def label_mix(data: FederatedData) -> np.ndarray:
    """Each client's label proportions in its training split (clients x classes)."""
    counts = np.stack([np.bincount(data.train.y[idx], minlength=data.train.num_classes)
                       for idx in data.client_train]).astype(np.float64)
    return counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)


def predict_fn(cfg: ExperimentConfig):
    """The loss's own decision rule when it has one (HarmonicLoss), else None (argmax)."""
    return getattr(build_loss(cfg, num_samples=1)[0], "predict", None)


def run_sync(grid: Grid, cfg: ExperimentConfig, run: RunDir, resume: bool, show_progress: bool) -> dict[str, Any]:
    """Run (or continue) the configured synchronous experiment; return its summary."""
    data = federated_data(cfg)
    device = resolve_device(cfg)
    model = make_model(cfg.model, data.train, cfg.seed)
    spec = ParamSpec.of(model)
    node_of = discover_clients(grid, cfg.partition.num_clients, cfg.sim.wait_for_nodes_s)
    strategy = build_strategy(cfg, spec, node_of, label_mix(data))
    joins = NodeWatch(node_of)
    predict = predict_fn(cfg)

    start_round, elapsed_before = 1, 0.0
    if resume and (ckpt := run.latest_checkpoint()) is not None:
        model.load_state_dict(ckpt.model)
        strategy.load_state_dict(ckpt.strategy)
        start_round, elapsed_before = ckpt.round + 1, ckpt.elapsed_s
        run.truncate_after(ckpt.round)
        log.info("resuming %s after round %d", run.path, ckpt.round)
    elif resume:
        run.truncate_after(0)
    bytes_up_total, bytes_down_total = bytes_so_far(run.rows())

    arrays = ArrayRecord(model.state_dict())
    t0 = time.perf_counter() - elapsed_before
    status = "interrupted"
    try:
        with RoundProgress(cfg.rounds, enabled=show_progress) as progress:
            progress.advance_to(start_round - 1, None, None)
            for rnd in range(start_round, cfg.rounds + 1):
                strategy.rejoin(joins.joined(grid, cfg.client.timeout_s))
                messages = list(strategy.configure_train(rnd, arrays, ConfigRecord(), grid))
                replies = send_and_collect(grid, messages, cfg.client.timeout_s)
                new_arrays, train_metrics = strategy.aggregate_train(rnd, replies)
                if new_arrays is not None:
                    arrays = new_arrays
                report = strategy.report
                bytes_down_total += report.bytes_down
                bytes_up_total += report.bytes_up
                row: dict[str, Any] = {
                    "round": rnd,
                    "num_sampled": len(report.sampled),
                    "num_success": len(report.accepted),
                    "num_failed": len(report.failures),
                    "failures": [{"client": f.partition_id, "reason": f.reason} for f in report.failures],
                    "skipped": report.skipped,
                    "train_loss": (train_metrics or {}).get("train_loss"),
                    "bytes_up": report.bytes_up,
                    "bytes_down": report.bytes_down,
                    "bytes_up_total": bytes_up_total,
                    "bytes_down_total": bytes_down_total,
                }
                if rnd % cfg.eval.every == 0 or rnd == cfg.rounds:
                    model.load_state_dict(arrays.to_torch_state_dict())
                    row.update(evaluate_round(cfg, grid, strategy, rnd, arrays, model, data, device, predict))
                row["wall_time_s"] = time.perf_counter() - t0
                run.append(row)
                log.info("round %d/%d  acc %s  loss %s  ok %d  failed %d%s", rnd, cfg.rounds,
                         _fmt(row.get("centralised_accuracy")), _fmt(row.get("centralised_loss")),
                         row["num_success"], row["num_failed"], "  SKIPPED" if row["skipped"] else "")
                progress.advance_to(rnd, row.get("centralised_accuracy"), row.get("centralised_loss"))
                if rnd % cfg.output.checkpoint_every == 0 or rnd == cfg.rounds:
                    model.load_state_dict(arrays.to_torch_state_dict())
                    run.save_checkpoint(Checkpoint(rnd, {k: v.clone() for k, v in model.state_dict().items()},
                                                   strategy.state_dict(), row["wall_time_s"]))
        status = "completed"
    finally:
        rows = run.rows()
        summary = summarise(rows, cfg.output.target_accuracy, status)
        if status == "completed" and cfg.quant.ptq is not None:
            model.load_state_dict(arrays.to_torch_state_dict())
            summary.update(post_training_quantization(cfg, model, data, device, predict))
        run.write_summary(summary)
        if cfg.output.plots and rows:
            plot_run(rows, run.plot_dir)
    return summary


def evaluate_round(cfg: ExperimentConfig, grid: Grid, strategy, rnd: int, arrays: ArrayRecord, model,
                   data: FederatedData, device, predict) -> dict[str, float]:
    """Centralised accuracy/loss of ``model`` on the server's test set and federated
    accuracy/loss on the clients' test splits, as configured in ``eval:``."""
    metrics: dict[str, float] = {}
    if cfg.eval.centralised:
        res = evaluate(model.to(device), data.test, device, cfg.eval.batch_size, predict)
        model.cpu()
        metrics.update(centralised_accuracy=res.accuracy, centralised_loss=res.loss)
    if cfg.eval.federated:
        messages = list(strategy.configure_evaluate(rnd, arrays, ConfigRecord(), grid))
        fed = strategy.aggregate_evaluate(rnd, send_and_collect(grid, messages, cfg.client.timeout_s))
        if fed is not None:
            metrics.update(fed)
    return metrics


def post_training_quantization(cfg: ExperimentConfig, model, data, device, predict) -> dict[str, Any]:
    """Quantize the final global model's weights (``quant.ptq``) and evaluate it beside float."""
    ptq = cfg.quant.ptq
    if ptq.method == "awq":
        calibration = torch.from_numpy(data.train.x[: ptq.calibration_samples])
        quantized = quantize_weights_awq(model, calibration, ptq.bits)
    else:
        quantized = quantize_weights_rtn(model, ptq.bits)
    res = evaluate(quantized.to(device), data.test, device, cfg.eval.batch_size, predict)
    log.info("post-training %s int%d: accuracy %.4f", ptq.method, ptq.bits, res.accuracy)
    return {"ptq_method": ptq.method, "ptq_bits": ptq.bits, "ptq_accuracy": res.accuracy}


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


__all__ = ["discover_clients", "run_sync"]

"""One server-loop skeleton for the synchronous, asynchronous and gossip loops.

The three loops differ in what one step is (a round of a Flower strategy; the events up to
the next evaluation time of the virtual clock; a gossip round of training and mixing). All
the rest is written once, here: what a loop builds before its first step
(:class:`LoopSetup`), the evaluation of a global model (:func:`evaluate_global`), and in
:func:`run_steps`:

- start or resume: the last checkpoint restores the server's state (:meth:`Steps.load_state_dict`)
  and, under fedsim's simulation grids, every client's state (error-feedback memories,
  per-sample loss state, LSQ step sizes, SCAFFOLD control variates, gossip models), so a
  resumed run ends exactly where an uninterrupted one would; rows after the checkpoint are
  dropped and redone;
- one metrics row per step, appended as it completes (fsynced with the next checkpoint), with
  byte totals and the wall time; the progress bar and one log line per row;
- checkpoints every ``output.checkpoint_every`` steps and after the last;
- the summary: :func:`fedsim.outputs.results.summarise` of the rows, the family's own entries,
  and post-training quantization of the final model (``quant.ptq``), written even when the
  run is interrupted; the plots.

A global model that turns non-finite ends the run with a one-line error naming the step
(rows written so far stay).
"""

from __future__ import annotations

import logging
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from torch import nn

from fedsim.clients.adversarial import robust_accuracy
from fedsim.clients.train import EvalResult, evaluate
from fedsim.config import ExperimentConfig
from fedsim.outputs.plots import plot_run
from fedsim.outputs.progress import RoundProgress
from fedsim.outputs.results import Checkpoint, RunDir, bytes_so_far, summarise
from fedsim.params import ParamSpec
from fedsim.quant.ptq import quantize_weights_awq, quantize_weights_rtn
from fedsim.records import to_state_dict
from fedsim.seeding import derive_seed
from fedsim.sim.components import (
    Federation,
    federated_data,
    make_model,
    predict_fn,
    resolve_device,
)
from fedsim.sim.messaging import PartitionGrid, client_nodes, send_and_collect

log = logging.getLogger(__name__)


class DivergedError(RuntimeError):
    """The global model holds NaN or Inf: training diverged. ``run_path`` names the run
    directory, whose summary says ``diverged`` (set where the run's loop stops it)."""

    run_path: Path | None = None


@dataclass
class LoopSetup:
    """What every server loop builds before its first step.

    Attributes
    ----------
    data : Federation
        The run's partitioned data; ``data.test`` is the server's test set.
    net : torch.nn.Module
        A model of the run's architecture, initialised from the run's seed: the initial
        global model, loaded with each model the server evaluates.
    spec : ParamSpec
        The model's flat layout.
    template : dict
        A copy of ``net``'s initial state dict (integer buffers are sent as they are here).
    node_of : dict[int, int]
        Client (partition id) -> Flower node id, once every client is ready.
    device : torch.device
        Where the server evaluates.
    predict : callable or None
        The loss's decision rule (None: argmax).
    """

    data: Federation
    net: nn.Module
    spec: ParamSpec
    template: dict[str, torch.Tensor]
    node_of: dict[int, int]
    device: torch.device
    predict: Callable | None

    @classmethod
    def build(cls, grid: Grid, cfg: ExperimentConfig) -> LoopSetup:
        """The set-up of ``cfg``'s run on ``grid`` (waits up to ``sim.wait_for_nodes_s`` for its clients)."""
        data = federated_data(cfg)
        net = make_model(cfg.model, data, cfg.seed)
        node_of = client_nodes(grid, cfg.partition.num_clients, cfg.sim.wait_for_nodes_s)
        return cls(data, net, ParamSpec.of(net), {k: v.clone() for k, v in net.state_dict().items()}, node_of,
                   resolve_device(cfg), predict_fn(cfg))

    def server_test(self, model: nn.Module, batch_size: int) -> EvalResult:
        """Loss and accuracy of ``model`` on the server's test set, on the server's device."""
        result = evaluate(model.to(self.device), self.data.test, self.device, batch_size, self.predict)
        model.cpu()
        return result


class FederatedEvaluation(Protocol):
    """Who evaluates a global model on their test splits, and how their replies combine: a
    Flower Strategy's evaluation half (the synchronous loop's strategy; every client, in
    the asynchronous loop)."""

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                           ) -> Iterable[Message]: ...

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> Mapping[str, float] | None: ...


def evaluate_global(cfg: ExperimentConfig, grid: Grid, setup: LoopSetup, evaluation: FederatedEvaluation, step: int,
                    arrays: ArrayRecord) -> dict[str, float]:
    """The global model ``arrays`` at ``step``, as configured in ``eval:``: its centralised
    loss and accuracy on the server's test set (and its accuracy there under PGD,
    ``eval.robust``), and its federated ones on the clients' test
    splits, sent and combined by ``evaluation``."""
    metrics: dict[str, float] = {}
    if cfg.eval.centralised:
        setup.net.load_state_dict(to_state_dict(arrays))
        res = setup.server_test(setup.net, cfg.eval.batch_size)
        metrics.update(centralised_accuracy=res.accuracy, centralised_loss=res.loss)
        if cfg.eval.robust is not None:
            generator = torch.Generator().manual_seed(derive_seed(cfg.seed, "robust-eval", step))
            metrics["robust_accuracy"] = robust_accuracy(setup.net.to(setup.device), setup.data.test, cfg.eval.robust,
                                                         generator, setup.device, cfg.eval.batch_size, setup.predict)
            setup.net.cpu()
        if cfg.model.name == "causal_lm":  # the mean token negative log-likelihood's exp
            metrics["perplexity"] = math.exp(res.loss)
    if cfg.eval.federated:
        messages = list(evaluation.configure_evaluate(step, arrays, ConfigRecord(), grid))
        fed = evaluation.aggregate_evaluate(step, send_and_collect(grid, messages, cfg.client.timeout_s))
        if fed is not None:
            metrics.update(fed)
    return metrics


class Steps(ABC):
    """One loop family's steps and state; :func:`run_steps` drives them.

    Attributes
    ----------
    setup : LoopSetup
        What the loop built before its first step.
    total : int
        Steps (metrics rows) of the whole run.
    x_key : str
        The row key the plots put on their x axis.
    resumable : bool
        Whether checkpoints are written and a run can continue from them (a wall-clock
        run cannot: its arrivals are not reproducible).
    """

    setup: LoopSetup
    total: int
    x_key = "round"
    resumable = True

    @abstractmethod
    def step(self, index: int) -> dict[str, Any]:
        """Run step ``index`` (1-based) and return its row: at least ``bytes_up`` and
        ``bytes_down`` of this step, and the evaluation when the step evaluates."""

    @abstractmethod
    def model_state(self) -> dict[str, torch.Tensor]:
        """The model of the run as it stands (a state dict): checkpointed, and quantized by
        ``quant.ptq`` at the end."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything of the server's side a resumed run needs."""

    @abstractmethod
    def load_state_dict(self, model: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        """Continue from a checkpoint: its ``model`` (:meth:`model_state`) and its ``state``
        (:meth:`state_dict`)."""

    def stop_reason(self, index: int) -> str | None:
        """Why step ``index`` must not run (the run then ends cleanly, status ``stopped``), or None."""
        return None

    def begin(self, resumed: bool) -> None:
        """Called once before the first step of this process (``resumed``: after a checkpoint)."""

    def summary(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """The family's own entries of summary.json."""
        return {}

    def plots(self, rows: list[dict[str, Any]], run: RunDir) -> None:
        """Figures beyond accuracy.png and loss.png."""

    def log_row(self, row: dict[str, Any]) -> None:
        """The step's INFO log line."""
        log.info("step %d/%d  acc %s  loss %s", row["round"], self.total, fmt_metric(row.get("centralised_accuracy")),
                 fmt_metric(row.get("centralised_loss")))


def run_steps(steps: Steps, grid: Grid, cfg: ExperimentConfig, run: RunDir, resume: bool, show_progress: bool
              ) -> dict[str, Any]:
    """Run (or continue) ``steps`` to the end; write rows, checkpoints, summary and plots."""
    start, elapsed_before = _restore(steps, grid, cfg, run, resume)
    steps.begin(resumed=start > 0)
    bytes_up, bytes_down = bytes_so_far(run.rows())
    t0 = time.perf_counter() - elapsed_before
    status = "interrupted"
    divergence = DivergenceWatch(run.rows())
    reason = None
    try:
        with RoundProgress(steps.total, enabled=show_progress) as progress:
            progress.advance_to(start, None, None)
            for index in range(start + 1, steps.total + 1):
                if (reason := steps.stop_reason(index)) is not None:
                    log.warning("step %d not run: %s", index, reason)
                    break
                row: dict[str, Any] = {"round": index, **steps.step(index)}
                bytes_up, bytes_down = bytes_up + row["bytes_up"], bytes_down + row["bytes_down"]
                row.update(bytes_up_total=bytes_up, bytes_down_total=bytes_down,
                           wall_time_s=time.perf_counter() - t0)
                run.append(row)
                steps.log_row(row)
                progress.advance_to(index, row.get("centralised_accuracy"), row.get("centralised_loss"))
                _check_finite(steps.model_state(), index)
                divergence.check(row)
                if steps.resumable and (index % cfg.output.checkpoint_every == 0 or index == steps.total):
                    run.save_checkpoint(Checkpoint(index, {k: v.clone() for k, v in steps.model_state().items()},
                                                   steps.state_dict(), row["wall_time_s"],
                                                   _client_states(grid, cfg, run, index)))
        status = "completed" if reason is None else "stopped"
    except DivergedError as exc:
        status, exc.run_path = "diverged", run.path
        raise
    finally:
        run.sync_rows()
        rows = run.rows()
        summary = summarise(rows, cfg.output.target_accuracy, status)
        summary.update(steps.summary(rows))
        if status == "completed" and cfg.quant.ptq is not None:
            steps.setup.net.load_state_dict(steps.model_state())
            summary.update(post_training_quantization(cfg, steps.setup))
        run.write_summary(summary)
        if cfg.output.plots and rows:
            plot_run(rows, run.plot_dir, x_key=steps.x_key)
            steps.plots(rows, run)
    return summary


def _restore(steps: Steps, grid: Grid, cfg: ExperimentConfig, run: RunDir, resume: bool) -> tuple[int, float]:
    """Continue from the last checkpoint (its step and wall time), or start at step 0."""
    if resume and (ckpt := run.latest_checkpoint()) is not None:
        if not steps.resumable:
            raise ValueError("a run on the wall clock cannot be resumed; start it again")
        if isinstance(grid, PartitionGrid):  # first: restoring the server may message clients
            grid.resume_client_states(ckpt.clients, run.checkpoint_dir / "clients", cfg.client.timeout_s)
        steps.load_state_dict(ckpt.model, ckpt.strategy)
        run.truncate_after(ckpt.round)
        log.info("resuming %s after step %d", run.path, ckpt.round)
        return ckpt.round, ckpt.elapsed_s
    if resume:
        run.truncate_after(0)
    return 0, 0.0


class DivergenceWatch:
    """Warns once when the server's test loss grows to ``FACTOR`` times the first one the run
    recorded: a learning rate so large that training diverges; stops the run
    (:class:`DivergedError`) when that loss is NaN or infinite (weights so large that the
    model computes NaN, though each is still finite)."""

    FACTOR = 100.0

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.first = next((r["centralised_loss"] for r in rows if _finite(r.get("centralised_loss"))), None)
        self.warned = False

    def check(self, row: dict[str, Any]) -> None:
        loss = row.get("centralised_loss")
        if loss is not None and not _finite(loss):
            raise DivergedError(f"step {row['round']}: the test loss is {loss}; training diverged "
                                "(lower client.lr or strategy.server_opt.lr)")
        if self.warned or loss is None:
            return
        if self.first is None:
            self.first = loss
        elif loss > self.FACTOR * max(self.first, 1e-12):
            self.warned = True
            log.warning("step %d: the test loss grew from %.3g to %.3g; training is diverging "
                        "(lower client.lr or strategy.server_opt.lr)", row["round"], self.first, loss)


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _client_states(grid: Grid, cfg: ExperimentConfig, run: RunDir, step: int) -> dict[int, Any]:
    """The clients' states, where the grid can collect them (fedsim's simulation grids)."""
    if not isinstance(grid, PartitionGrid):
        return {}
    return grid.checkpoint_client_states(run.checkpoint_dir / "clients", step, cfg.client.timeout_s)


def _check_finite(state: dict[str, torch.Tensor], index: int) -> None:
    bad = sorted(name for name, value in state.items() if value.is_floating_point() and not torch.isfinite(value).all())
    if bad:
        raise DivergedError(f"step {index}: the model holds NaN or Inf in {', '.join(bad)}; training diverged "
                            f"(lower client.lr or strategy.server_opt.lr)")


def post_training_quantization(cfg: ExperimentConfig, setup: LoopSetup) -> dict[str, Any]:
    """Quantize the weights of the final model, loaded in ``setup.net`` (``quant.ptq``), and
    evaluate it beside float."""
    ptq = cfg.quant.ptq
    if ptq.method == "awq":
        calibration = torch.from_numpy(setup.data.calibration_inputs(ptq.calibration_samples))
        quantized = quantize_weights_awq(setup.net, calibration, ptq.bits)
    else:
        quantized = quantize_weights_rtn(setup.net, ptq.bits)
    res = setup.server_test(quantized, cfg.eval.batch_size)
    log.info("post-training %s int%d: accuracy %.4f", ptq.method, ptq.bits, res.accuracy)
    return {"ptq_method": ptq.method, "ptq_bits": ptq.bits, "ptq_accuracy": res.accuracy}


def fmt_metric(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"

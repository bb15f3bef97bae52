"""Sequential gradient coding: distributed gradient descent over ``n`` straggling workers.

Krishnan, Ebrahimi & Khisti, "Sequential Gradient Coding For Straggler Mitigation" (ICLR
2023, arXiv 2211.13802), with its baseline, Tandon et al.'s gradient coding ("Gradient
Coding: Avoiding Stragglers in Distributed Learning", ICML 2017, arXiv 1612.03301).

A data-centre setting: the ``n`` workers (``partition.num_clients``) may be given any part
of the training set, so data assignment is free and the codes place it; no client trains.
Every round ``t`` is a job: the full-batch gradient ``g(t) = 1^T G`` of the model ``w_t``,
``G`` the gradients of the training set's chunks (``loss = sum of per-sample cross-entropies
/ N``). The workers' tasks, the straggler pattern and the virtual clock are
:mod:`fedsim.coding.schedule`'s; the master decodes ``g(t) = a^T C G`` from the coded
results ``C G`` it received (exact up to float rounding), and takes the step
``w_{t+1} = w_t - client.lr * g(t)``.

Every scheme decodes every job exactly, so every scheme follows the same trajectory; they
differ in when each gradient is ready (``virtual_time`` of a row: the clock at the end of the
round that decoded job ``t``) and in the work they spend. With ``delay`` ``T > 0`` job ``t``
may decode ``T`` rounds late; the paper's experiments train several models concurrently, so
consecutive jobs belong to different models and no gradient is stale. fedsim trains one
model and computes job ``t + 1`` at the model job ``t`` produced, as if each gradient were
ready at once, and stamps each row with the time its gradient was decoded: the schemes'
runtimes compare as the paper's do, while the trajectory is that of plain gradient descent.

Straggler models (:mod:`fedsim.coding.stragglers`): ``iid`` (``p``), ``gilbert_elliott``
(bursty: ``p_gb``, ``p_bg``), ``trace`` (a 0/1 file, rounds x workers). A straggler takes
``slow_factor`` times as long as the others for the same work.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from flwr.app import ArrayRecord
from flwr.serverapp import Grid
from pydantic import Field, model_validator
from torch import nn
from torch.nn import functional as F

from fedsim.algorithms.api import Algorithm, Family, StrategySection
from fedsim.coding.schedule import Timeline, make_scheme, simulate
from fedsim.coding.stragglers import gilbert_elliott, iid, read_trace, repeat_trace
from fedsim.config import ExperimentConfig
from fedsim.config_checks import unread
from fedsim.loops.skeleton import LoopSetup, Steps, evaluate_global, fmt_metric, run_steps
from fedsim.outputs.results import RunDir
from fedsim.seeding import derive_seed

log = logging.getLogger(__name__)

__all__ = ["SequentialGradientCoding", "SgcConfig", "SgcSteps", "chunk_gradients", "run_sgc", "straggler_pattern"]

SEQUENTIAL = ("sr_sgc", "m_sgc")
STRAGGLER_READS = {"iid": ("p",), "gilbert_elliott": ("p_gb", "p_bg"), "trace": ("trace",)}


class SgcConfig(StrategySection):
    """``strategy: {name: sgc, scheme: ...}``: sequential gradient coding over
    ``partition.num_clients`` workers for ``rounds`` jobs; see the module docstring.

    Parameters
    ----------
    scheme : {"uncoded", "gc", "sr_sgc", "m_sgc"}, default "gc"
        Uncoded; Tandon et al.'s gradient coding; GC with selective repetition; multiplexed
        coded and repeated tasks (:mod:`fedsim.coding.schedule`).
    code : {"cyclic", "fractional_repetition"}, default "cyclic"
        The gradient code of gc, sr_sgc and m_sgc (fractional repetition: ``s + 1`` divides ``n``).
    s : int or None, default None (1)
        Stragglers per round the code tolerates; not read by uncoded.
    delay : int or None, default None (0 for uncoded and gc, 1 for sr_sgc and m_sgc)
        ``T``: job ``t`` must be decoded by the end of round ``t + T``.
    stragglers : {"iid", "gilbert_elliott", "trace"}, default "iid"
    p : float, default 0.1
        iid: probability a worker straggles in a round.
    p_gb, p_bg : float, default 0.05, 0.5
        gilbert_elliott: good -> bad and bad -> good transition probabilities.
    trace : str or None
        trace: the 0/1 file (rounds x workers).
    slow_factor : float, default 5
        A straggler's time for some work, over a non-straggler's.
    target_loss : float, default 0.5
        The test loss whose virtual time the summary reports (``virtual_time_to_target_loss``).
    """

    family: ClassVar[Family] = "custom"
    name: Literal["sgc"] = "sgc"
    scheme: Literal["uncoded", "gc", "sr_sgc", "m_sgc"] = "gc"
    code: Literal["cyclic", "fractional_repetition"] = "cyclic"
    s: int | None = Field(None, ge=0, description="stragglers per round the code tolerates (unset: 1)")
    delay: int | None = Field(None, ge=0, description="T (unset: 0 for uncoded and gc, 1 for sr_sgc and m_sgc)")
    stragglers: Literal["iid", "gilbert_elliott", "trace"] = "iid"
    p: float = Field(0.1, ge=0, le=1, description="iid: straggling probability")
    p_gb: float = Field(0.05, gt=0, le=1, description="gilbert_elliott: good -> bad")
    p_bg: float = Field(0.5, gt=0, le=1, description="gilbert_elliott: bad -> good")
    trace: str | None = Field(None, description="trace: 0/1 file, rounds x workers")
    slow_factor: float = Field(5.0, gt=1, description="a straggler's time over a non-straggler's")
    target_loss: float = Field(0.5, gt=0, description="for virtual_time_to_target_loss")

    @model_validator(mode="after")
    def _what_the_scheme_reads(self) -> SgcConfig:
        fields = type(self).model_fields
        if self.scheme == "uncoded":
            for key in ("s", "code"):
                if getattr(self, key) != fields[key].default:
                    raise ValueError(f"{key}: {getattr(self, key)!r} is not read by scheme 'uncoded'; leave it unset")
        if self.delay is not None:
            if self.scheme in SEQUENTIAL and self.delay == 0:
                raise ValueError(f"delay: 0 leaves scheme {self.scheme!r} no later round to finish a job in; "
                                 "at least 1 (or scheme gc)")
            if self.scheme not in SEQUENTIAL and self.delay > 0:
                raise ValueError(f"delay: {self.delay}; scheme {self.scheme!r} finishes each job in its own round "
                                 "(T = 0); use sr_sgc or m_sgc")
        for key in ("p", "p_gb", "p_bg", "trace"):
            if key not in STRAGGLER_READS[self.stragglers] and getattr(self, key) != fields[key].default:
                raise ValueError(f"{key}: {getattr(self, key)!r} is not read by stragglers {self.stragglers!r}; "
                                 "leave it unset")
        if self.stragglers == "trace" and self.trace is None:
            raise ValueError("trace: stragglers 'trace' needs the file (0/1 rows: rounds x workers)")
        return self

    @property
    def tolerated(self) -> int:
        return 0 if self.scheme == "uncoded" else (1 if self.s is None else self.s)

    @property
    def rounds_late(self) -> int:
        return (1 if self.scheme in SEQUENTIAL else 0) if self.delay is None else self.delay


def straggler_pattern(st: SgcConfig, rounds: int, n: int, seed: int) -> np.ndarray:
    """The run's straggler pattern, ``(rounds, n)`` booleans, drawn from ``seed``."""
    seed = derive_seed(seed, "sgc-stragglers")
    if st.stragglers == "iid":
        return iid(rounds, n, st.p, seed)
    if st.stragglers == "gilbert_elliott":
        return gilbert_elliott(rounds, n, st.p_gb, st.p_bg, seed)
    return repeat_trace(read_trace(st.trace), rounds)


def chunk_gradients(net: nn.Module, x: torch.Tensor, y: torch.Tensor, chunks: list[np.ndarray]) -> torch.Tensor:
    """``G``, shape ``(len(chunks), D)``: row ``c`` the gradient of ``sum_{i in chunk c} CE_i / N``
    (``N = len(y)``), so the rows sum to the full-batch gradient of the mean cross-entropy."""
    params = [p for p in net.parameters() if p.requires_grad]
    rows = []
    for idx in chunks:
        loss = F.cross_entropy(net(x[idx]), y[idx], reduction="sum") / len(y)
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows)


class SgcSteps(Steps):
    """One job per step: the chunk gradients at the current model, the coded results the
    master received (:func:`fedsim.coding.schedule.simulate`), the decoded gradient, one step."""

    def __init__(self, grid: Grid, cfg: ExperimentConfig) -> None:
        self.grid, self.cfg, st = grid, cfg, cfg.strategy
        self.total = cfg.rounds
        self.setup = setup = LoopSetup.build(grid, cfg)
        n = cfg.partition.num_clients
        scheme = make_scheme(st.scheme, n, st.tolerated, st.rounds_late, st.code, derive_seed(cfg.seed, "sgc-code"))
        pattern = straggler_pattern(st, cfg.rounds + st.rounds_late, n, cfg.seed)
        self.timeline: Timeline = simulate(scheme, pattern, cfg.rounds, st.slow_factor)
        order = np.random.default_rng(derive_seed(cfg.seed, "sgc-chunks")).permutation(len(setup.data.train.y))
        self.chunks = np.array_split(order, self.timeline.chunks)
        self.x = torch.from_numpy(setup.data.train.x)
        self.y = torch.from_numpy(setup.data.train.y)
        self.params = [p for p in setup.net.parameters() if p.requires_grad]

    def step(self, index: int) -> dict[str, Any]:
        job, rnd = self.timeline.jobs[index], self.timeline.rounds[index - 1]
        G = chunk_gradients(self.setup.net, self.x, self.y, self.chunks).double()
        results = torch.from_numpy(job.rows) @ G  # what the workers sent
        gradient = torch.from_numpy(job.weights) @ results
        with torch.no_grad():
            offset = 0
            for p in self.params:
                p -= self.cfg.client.lr * gradient[offset:offset + p.numel()].view_as(p).to(p.dtype)
                offset += p.numel()
        width = 4 * G.shape[1]
        row: dict[str, Any] = {
            "virtual_time": job.time, "decoded_in_round": job.round, "round_time": rnd.duration,
            "load_mean": float(rnd.loads.mean()), "load_max": float(rnd.loads.max()),
            "stragglers": int(rnd.stragglers.sum()), "waited_for": len(rnd.waited),
            "bytes_up": width * len(job.rows), "bytes_down": width * self.cfg.partition.num_clients,
        }
        if index % self.cfg.eval.every == 0 or index == self.total:
            row.update(evaluate_global(self.cfg, self.grid, self.setup, None, index,
                                       ArrayRecord(self.setup.net.state_dict())))
        return row

    def model_state(self) -> dict[str, torch.Tensor]:
        return self.setup.net.state_dict()

    def state_dict(self) -> dict[str, Any]:
        return {}  # the schedule is drawn again from the seed

    def load_state_dict(self, model: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        self.setup.net.load_state_dict(model)

    def summary(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        target = self.cfg.strategy.target_loss
        reached = next((r["virtual_time"] for r in rows if (loss := r.get("centralised_loss")) is not None
                        and loss <= target), None)
        timeline = self.timeline
        return {"virtual_time": timeline.rounds[-1].end, "virtual_time_to_target_loss": reached,
                "work_per_job": timeline.work_per_job, "peak_load": timeline.peak_load,
                "rounds_waiting": sum(1 for r in timeline.rounds if r.waited)}

    def log_row(self, row: dict[str, Any]) -> None:
        log.info("job %d/%d  time %.2f  load %.3f  waited %d  acc %s  loss %s", row["round"], self.total,
                 row["virtual_time"], row["load_max"], row["waited_for"], fmt_metric(row.get("centralised_accuracy")),
                 fmt_metric(row.get("centralised_loss")))


def run_sgc(grid: Grid, cfg: ExperimentConfig, run: RunDir, resume: bool, show_progress: bool) -> dict[str, Any]:
    """The ``sgc`` server loop: :class:`SgcSteps` under fedsim's loop skeleton."""
    return run_steps(SgcSteps(grid, cfg), grid, cfg, run, resume, show_progress)


class SequentialGradientCoding(Algorithm):
    """Sequential gradient coding (Krishnan et al., ICLR 2023) and its baselines; see the
    module docstring."""

    name = "sgc"
    Config = SgcConfig
    description = "distributed GD over straggling workers: uncoded, gradient coding, SR-SGC, M-SGC (virtual clock)"
    loop = staticmethod(run_sgc)
    requires = {"eval": {"federated": False}}

    @classmethod
    def rules(cls, cfg: ExperimentConfig) -> Iterator[str | None]:
        st, n = cfg.strategy, cfg.partition.num_clients
        where = "under strategy.name 'sgc' (its workers' data is placed by the code)"
        yield from unread(cfg.partition, "partition", ("num_clients",), where)
        yield from unread(cfg.client, "client", ("lr",), "under strategy.name 'sgc' (full-batch GD, client.lr)")
        for section in ("quant", "attack", "faults", "personalization"):
            if getattr(cfg, section) != type(cfg).model_fields[section].get_default(call_default_factory=True):
                yield f"{section}: not read under strategy.name 'sgc' (no client trains); leave the section out"
        if cfg.loss.name != "cross_entropy" or cfg.loss.kwargs or cfg.loss.aux is not None:
            yield f"loss.name: {cfg.loss.name!r}; strategy.name 'sgc' decodes the cross-entropy gradient only"
        if cfg.eval.federated:
            yield "eval.federated: the workers of strategy.name 'sgc' hold no test split; set eval.federated: false"
        if cfg.model.name == "resnet8":
            yield ("model.name: 'resnet8' has BatchNorm, whose batch statistics make chunk gradients non-additive; "
                   "strategy.name 'sgc' needs mlp, cnn, lenet5 or char_lstm")
        if st.tolerated >= n:
            yield f"strategy.s: {st.tolerated} stragglers of partition.num_clients {n} workers; at most {n - 1}"
        elif st.scheme != "uncoded" and st.code == "fractional_repetition" and n % (st.tolerated + 1):
            yield (f"strategy.code: fractional_repetition needs strategy.s + 1 ({st.tolerated + 1}) to divide "
                   f"partition.num_clients ({n})")
        if st.stragglers == "trace":
            yield from _trace_problems(Path(st.trace), n)

    @classmethod
    def backends(cls) -> tuple[str, ...]:
        return ("inprocess", "batched (no client trains: the workers are simulated in the server)", "ray (likewise)")


def _trace_problems(path: Path, n: int) -> Iterator[str]:
    try:
        width = read_trace(path).shape[1]
    except (OSError, ValueError) as exc:
        yield f"strategy.trace: {exc}"
        return
    if width != n:
        yield f"strategy.trace: {path} has {width} workers per row; partition.num_clients is {n}"



"""A run directory: resolved config, per-round metrics, summary, checkpoints, plots.

Layout of ``runs/<name>-<timestamp>/``::

    config.yaml       the resolved config the run used
    metrics.jsonl     one JSON row per round, written as it completes, fsynced with each checkpoint
    summary.json      final numbers (rewritten at the end, and when a run is interrupted)
    checkpoints/      round-<k>.pt every ``output.checkpoint_every`` rounds and at the end
    plots/            accuracy.png and loss.png per round

Rows already written are never lost: each is appended with one ``write`` (a run that dies
keeps them), and every row is on disk (fsync) before a checkpoint is written and when the
run ends, so a machine that loses power loses no row a checkpoint or the summary counts on.
An fsync per row would cost milliseconds a round, more than a round of small clients.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from fedsim.config import ExperimentConfig, load_config, validate_config


@dataclass(frozen=True)
class Checkpoint:
    """The state saved after a round: enough to continue as if never stopped.

    ``strategy`` is the server's side (strategy, optimizer, participation, async queue,
    gossip mirrors); ``clients`` the name of each stateful client's latest state file in
    ``checkpoints/clients/`` under the simulation backends (:mod:`fedsim.sim.client_states`;
    a checkpoint of an earlier fedsim holds the records themselves), empty in a deployment,
    whose SuperNodes keep their own.
    """

    round: int
    model: dict[str, torch.Tensor]
    strategy: dict[str, Any]
    elapsed_s: float
    clients: dict[int, dict[str, Any]] = field(default_factory=dict)


def strict_json(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by None: JSON has no NaN (Python's
    ``json`` would write a bare ``NaN`` that other readers reject)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(v) for v in value]
    return value


class RunDirError(ValueError):
    """A run directory whose files cannot be read (a damaged checkpoint, a garbled metrics
    row), or a resume that would not continue the same run; the message is one line."""


RESUME_MAY_CHANGE = ("rounds", "strategy.horizon", "output.plots", "output.checkpoint_every",
                     "output.target_accuracy", "sim.ray_address", "sim.wait_for_nodes_s",
                     "sim.num_cpus_per_client", "sim.num_gpus_per_client")
"""The keys ``--resume DIR --set`` may change: how long the run goes on, what it writes, and
where it runs; every other key is the run's identity (its numbers depend on it)."""


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _flat(item, f"{prefix}{key}.").items()}
    return {prefix.removesuffix("."): value}


def config_identity(cfg: ExperimentConfig, ignore: tuple[str, ...] = ()) -> str:
    """``cfg`` as one canonical string of its dotted keys and values, leaving out the keys
    starting with any of ``ignore``: two configs with the same identity make the same run."""
    flat = _flat(cfg.model_dump(mode="json"))
    return json.dumps({k: v for k, v in flat.items() if not k.startswith(ignore)}, sort_keys=True)


def resume_changes(stored: ExperimentConfig, resumed: ExperimentConfig) -> dict[str, tuple[Any, Any]]:
    """The dotted keys whose value differs between a run's stored config and the config it
    would resume with: key -> (stored, resumed)."""
    before, after = _flat(stored.model_dump(mode="json")), _flat(resumed.model_dump(mode="json"))
    return {key: (before.get(key), after.get(key)) for key in sorted(set(before) | set(after))
            if before.get(key) != after.get(key)}


class RunDir:
    """Reads and writes one run directory."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.metrics_path = self.path / "metrics.jsonl"
        self.summary_path = self.path / "summary.json"
        self.config_path = self.path / "config.yaml"
        self.checkpoint_dir = self.path / "checkpoints"
        self.plot_dir = self.path / "plots"

    @classmethod
    def create(cls, cfg: ExperimentConfig) -> RunDir:
        """A new directory ``<output.dir>/<name>-<timestamp>`` holding the resolved config."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        base = Path(cfg.output.dir) / f"{cfg.name}-{stamp}"
        base.parent.mkdir(parents=True, exist_ok=True)
        path, n = base, 1
        while True:  # mkdir claims the name: runs started in the same second (bench --jobs) get -1, -2, ...
            try:
                path.mkdir()
                break
            except FileExistsError:
                path, n = base.with_name(f"{base.name}-{n}"), n + 1
        run = cls(path)
        run.checkpoint_dir.mkdir()
        run.plot_dir.mkdir()
        run.config_path.write_text(cfg.to_yaml())
        return run

    @classmethod
    def open(cls, path: str | Path) -> RunDir:
        run = cls(Path(path))
        if not run.config_path.is_file():
            raise FileNotFoundError(f"{path}: not a run directory (no config.yaml)")
        return run

    def config(self) -> ExperimentConfig:
        return validate_config(yaml.safe_load(self.config_path.read_text()))

    def resumed_config(self, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
        """The config to continue this run with: its own, with ``overrides`` that leave the
        run's identity alone (:data:`RESUME_MAY_CHANGE`), recorded in config.yaml; any other
        change is refused (:class:`RunDirError`), and so is a damaged checkpoint or row."""
        stored = load_config(self.config_path)
        resumed = load_config(self.config_path, overrides)
        changes = resume_changes(stored, resumed)
        breaking = {k: v for k, v in changes.items() if not k.startswith(RESUME_MAY_CHANGE)}
        if breaking:
            told = ", ".join(f"{k} {new!r} (the run has {old!r})" for k, (old, new) in breaking.items())
            raise RunDirError(f"--resume {self.path}: {told} would make another run, not this one continued; "
                              f"a resumed run may change only {', '.join(RESUME_MAY_CHANGE)}")
        self.latest_checkpoint()
        self.rows()
        if changes:
            self.config_path.write_text(resumed.to_yaml())
        return resumed

    # ---------------------------------------------------------------- metrics
    def append(self, row: dict[str, Any]) -> None:
        line = json.dumps(strict_json(row), allow_nan=False) + "\n"
        with self.metrics_path.open("a") as f:
            f.write(line)

    def sync_rows(self) -> None:
        """Put the rows written so far on disk (fsync)."""
        if self.metrics_path.exists():
            with self.metrics_path.open("rb") as f:
                os.fsync(f.fileno())

    def rows(self) -> list[dict[str, Any]]:
        """The metrics rows; a torn last row (a crash while it was written) is left out, a
        garbled row before it is a :class:`RunDirError`."""
        if not self.metrics_path.exists():
            return []
        lines = self.metrics_path.read_text(errors="replace").splitlines()
        rows = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError(f"a JSON {type(row).__name__}, not an object")
            except ValueError as exc:
                if number == len(lines):
                    break  # torn by a crash: resume redoes that step
                reason = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
                raise RunDirError(f"{self.metrics_path}: line {number} is not a metrics row ({reason}); only the "
                                  "last row may be torn by a crash") from None
            rows.append(row)
        return rows

    def truncate_after(self, last_round: int) -> None:
        """Drop rows of rounds after ``last_round`` (they are redone on resume)."""
        kept = [r for r in self.rows() if r["round"] <= last_round]
        tmp = self.metrics_path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        tmp.replace(self.metrics_path)

    def write_summary(self, summary: dict[str, Any]) -> None:
        tmp = self.summary_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(strict_json(summary), indent=2, allow_nan=False))
        tmp.replace(self.summary_path)

    def summary(self) -> dict[str, Any]:
        return json.loads(self.summary_path.read_text()) if self.summary_path.exists() else {}

    # ------------------------------------------------------------ checkpoints
    def save_checkpoint(self, ckpt: Checkpoint) -> Path:
        """Write ``ckpt`` (the rows up to it synced to disk first)."""
        self.sync_rows()
        path = self.checkpoint_dir / f"round-{ckpt.round:05d}.pt"
        tmp = path.with_suffix(".tmp")
        torch.save({"round": ckpt.round, "model": ckpt.model, "strategy": ckpt.strategy,
                    "elapsed_s": ckpt.elapsed_s, "clients": ckpt.clients}, tmp)
        tmp.replace(path)
        return path

    def latest_checkpoint(self) -> Checkpoint | None:
        files = sorted(self.checkpoint_dir.glob("round-*.pt"))
        if not files:
            return None
        # our own file, holding optimizer and sampler state beside tensors
        try:
            raw = torch.load(files[-1], weights_only=False)
            return Checkpoint(raw["round"], raw["model"], raw["strategy"], raw["elapsed_s"], raw.get("clients", {}))
        except Exception as exc:  # noqa: BLE001 - whatever a damaged pickle raises, the answer is one line
            reason = " ".join(str(exc).split())[:200] or type(exc).__name__
            raise RunDirError(f"{files[-1]}: not a readable checkpoint ({type(exc).__name__}: {reason}); delete it to "
                              "resume from the one before, or start the run again") from None

    def client_state(self, checkpoint: Checkpoint, pid: int) -> dict[str, Any]:
        """Client ``pid``'s Context state as ``checkpoint`` saved it: read from its file in
        ``checkpoints/clients/`` (the grids' state store, :mod:`fedsim.sim.client_states`), or
        the records themselves (a checkpoint of an earlier fedsim)."""
        saved = checkpoint.clients[pid]
        if not isinstance(saved, str):
            return saved
        state = pickle.loads((self.checkpoint_dir / "clients" / saved).read_bytes())  # noqa: S301 - this run's own file
        prefix = f"partition-{pid}/"  # a node's Context keys of one partition (fedsim.sim.client_app.PartitionState)
        return {key.removeprefix(prefix): value for key, value in state.items()}


def rounds_to_target(rows: list[dict[str, Any]], target: float, key: str = "centralised_accuracy") -> int | None:
    """First round whose ``key`` reaches ``target``, or None."""
    for row in rows:
        value = row.get(key)
        if value is not None and value >= target:
            return int(row["round"])
    return None


def bytes_so_far(rows: list[dict[str, Any]]) -> tuple[int, int]:
    """Bytes sent up and down over the rows written so far (the totals of the last row);
    a resumed loop counts on from them."""
    last = rows[-1] if rows else {}
    return last.get("bytes_up_total", 0), last.get("bytes_down_total", 0)


PERSONAL_METRICS = ("personal_accuracy_p10", "personal_accuracy_p50", "personal_accuracy_p90", "personal_accuracy_mean",
                    "personal_accuracy_quantiles",
                    # eval.new_clients: the held-out clients (fedsim.strategies.new_clients)
                    "new_federated_accuracy", "new_personal_accuracy_p50", "new_personal_accuracy_mean")
LANGUAGE_MODEL_METRICS = ("perplexity", "federated_perplexity", "client_perplexity_p10", "client_perplexity_p50",
                          "client_perplexity_p90", "train_tokens_per_s")
"""Row keys of a causal language model's run whose last value the summary keeps."""


def skipped_from_round(rows: list[dict[str, Any]]) -> int | None:
    """The first round of the skipped rounds that end the run (every round from it to the
    last was skipped), or None when the last round aggregated."""
    first = None
    for row in reversed(rows):
        if not row.get("skipped"):
            break
        first = int(row["round"])
    return first


def summarise(rows: list[dict[str, Any]], target: float, status: str) -> dict[str, Any]:
    """summary.json content from the metrics rows."""
    evaluated = [r for r in rows if r.get("centralised_accuracy") is not None]
    last = evaluated[-1] if evaluated else {}
    return {
        "status": status,
        "rounds_completed": rows[-1]["round"] if rows else 0,
        "final_accuracy": last.get("centralised_accuracy"),
        "final_loss": last.get("centralised_loss"),
        "best_accuracy": max((r["centralised_accuracy"] for r in evaluated), default=None),
        "final_federated_accuracy": next((r["federated_accuracy"] for r in reversed(rows)
                                          if r.get("federated_accuracy") is not None), None),
        **{f"final_{key}": next((r[key] for r in reversed(rows) if r.get(key) is not None), None)
           for key in ("client_accuracy_p10", "client_accuracy_p50", "client_accuracy_p90",
                       "client_accuracy_quantiles")},
        # personalized runs: the clients' personal models (fedsim.clients.personalization)
        **{f"final_{key}": next(r[key] for r in reversed(rows) if r.get(key) is not None)
           for key in PERSONAL_METRICS if any(r.get(key) is not None for r in rows)},
        # eval.robust: the global model under PGD (fedsim.clients.adversarial)
        **{f"final_{key}": next(r[key] for r in reversed(rows) if r.get(key) is not None)
           for key in ("robust_accuracy",) if any(r.get(key) is not None for r in rows)},
        # a language model: its perplexities and training throughput (fedsim.models.causal_lm)
        **{f"final_{key}": next(r[key] for r in reversed(rows) if r.get(key) is not None)
           for key in LANGUAGE_MODEL_METRICS if any(r.get(key) is not None for r in rows)},
        "target_accuracy": target,
        "rounds_to_target": rounds_to_target(rows, target),
        "wall_time_s": rows[-1]["wall_time_s"] if rows else 0.0,
        "failed_client_calls": sum(r.get("num_failed", 0) for r in rows),
        "skipped_rounds": sum(1 for r in rows if r.get("skipped")),
        "skipped_from_round": skipped_from_round(rows),
        **dict(zip(("bytes_up_total", "bytes_down_total"), bytes_so_far(rows), strict=True)),
    }

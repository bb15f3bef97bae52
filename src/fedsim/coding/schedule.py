"""Sequential gradient coding on a virtual clock: Krishnan, Ebrahimi & Khisti, "Sequential
Gradient Coding For Straggler Mitigation" (ICLR 2023, arXiv 2211.13802).

Jobs ``g(1), ..., g(J)``: job ``t`` (a full gradient, the sum of its ``m`` chunk gradients
``G``) starts in round ``t`` and must be decoded by the end of round ``t + T``. In every
round each worker computes the tasks assigned to it; a task is a coefficient vector ``c``
over the job's chunks (its result is ``c^T G``), and its load is the fraction of the data it
reads (``nnz(c) / m``). A worker's time in a round is ``n * load`` (1 for an uncoded worker's
share) times ``slow_factor`` when the straggler pattern marks it. The master waits for every
worker that is not straggling; when a job due in this round (started ``T`` rounds ago) still
does not decode, it also waits for stragglers, quickest first, until it does: a pattern beyond
what the scheme tolerates costs time, never a wrong gradient. A straggler not waited for is
abandoned, its results lost. Jobs decode by least squares on the results received
(:func:`fedsim.coding.codes.decoding_weights`), so the decoded gradient is exactly ``1^T G``.

The schemes (``n`` workers, codes of Tandon et al. tolerating ``s`` stragglers):

- ``uncoded`` (``T = 0``): worker ``i`` computes chunk ``i`` (load ``1/n``); any straggler is waited for;
- ``gc`` (``T = 0``): worker ``i`` sends row ``i`` of the code (load ``(s+1)/n``); a round with
  more than ``s`` stragglers waits;
- ``sr_sgc``, GC with selective repetition: job ``t`` is coded as in ``gc``; in each of the
  next ``T`` rounds the master re-assigns only as many of job ``t``'s missing coded tasks as
  decoding still needs (greedily, each one raising the rank), to their own worker if it was
  not straggling in the last round, else to one that was not (round-robin);
- ``m_sgc``, multiplexing (the paper's main scheme, in fedsim's reading): each worker's
  share of job ``t`` is first computed uncoded (load ``1/n``, chunks split in ``n`` sub-chunks);
  the chunks of stragglers are repeated, uncoded, by the workers that were not straggling in
  the last round (the adaptive part: it follows past straggler patterns) in rounds
  ``t+1..t+T-1``, and whatever is still missing in round ``t + T`` is computed under the
  ``(n, s)`` code across all workers (sub-chunk ``g`` of every missing chunk forms coded part
  ``g``), so it survives ``s`` stragglers in its last round.

How the paper's M-SGC places its coded and repeated tasks within a window is more involved
(its Section 4 designs them for a worst-case bursty model); fedsim's reading keeps its two
ingredients (repetition of unfinished work following the observed pattern, GC for what must
finish now) so that the load is near ``1/n`` in rounds without stragglers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedsim.coding.codes import NotDecodable, decoding_weights, encoding_matrix

__all__ = ["SCHEMES", "Decoding", "RoundLog", "Task", "Timeline", "make_scheme", "simulate"]


@dataclass(frozen=True)
class Task:
    """One unit of work: ``worker`` computes ``coefficients^T G`` of ``job``'s chunk gradients."""

    worker: int
    job: int
    coefficients: np.ndarray
    original: int = -1  # sr_sgc: whose coded row this is


@dataclass
class JobState:
    """What the master holds of a job not yet decoded."""

    job: int
    rows: list[np.ndarray] = field(default_factory=list)
    originals: set[int] = field(default_factory=set)  # sr_sgc: coded rows received, by worker
    chunks_done: set[int] = field(default_factory=set)  # m_sgc: chunks received uncoded


@dataclass(frozen=True)
class Decoding:
    """How a job was decoded: ``weights @ rows`` is the all-ones vector over its chunks."""

    job: int
    round: int
    time: float
    rows: np.ndarray
    weights: np.ndarray


@dataclass(frozen=True)
class RoundLog:
    round: int
    duration: float
    end: float
    loads: np.ndarray
    stragglers: np.ndarray
    waited: tuple[int, ...]


@dataclass
class Timeline:
    """A whole run's schedule: every round and every job's decoding."""

    chunks: int
    rounds: list[RoundLog]
    jobs: dict[int, Decoding]

    @property
    def work_per_job(self) -> float:
        """Data read by all workers per job, in units of the dataset (uncoded: 1)."""
        return float(sum(r.loads.sum() for r in self.rounds) / max(len(self.jobs), 1))

    @property
    def peak_load(self) -> float:
        """The largest load of one worker in one round (a fraction of one job's data)."""
        return float(max(r.loads.max() for r in self.rounds))


class Scheme:
    """Which tasks each round assigns; see the module docstring."""

    name = ""

    def __init__(self, n: int, s: int, delay: int, code: str, seed: int) -> None:
        self.n, self.s, self.delay = n, s, delay
        self.B = encoding_matrix(code, n, s, seed) if self.coded else None

    coded = True
    parts_per_chunk = 1

    @property
    def chunks(self) -> int:
        return self.n * self.parts_per_chunk

    def tasks(self, t: int, new_job: bool, pending: dict[int, JobState], slow_last: np.ndarray) -> list[Task]:
        raise NotImplementedError

    def received(self, state: JobState, task: Task) -> None:
        state.rows.append(task.coefficients)


class Uncoded(Scheme):
    name, coded = "uncoded", False

    def tasks(self, t, new_job, pending, slow_last):
        return [Task(i, t, np.eye(self.n)[i]) for i in range(self.n)] if new_job else []


class GradientCoding(Scheme):
    name = "gc"

    def tasks(self, t, new_job, pending, slow_last):
        return [Task(i, t, self.B[i], original=i) for i in range(self.n)] if new_job else []


def _fast_workers(slow_last: np.ndarray) -> list[int]:
    fast = [i for i in range(len(slow_last)) if not slow_last[i]]
    return fast or list(range(len(slow_last)))


class SelectiveRepetition(GradientCoding):
    name = "sr_sgc"

    def tasks(self, t, new_job, pending, slow_last):
        tasks = super().tasks(t, new_job, pending, slow_last)
        fast, turn = _fast_workers(slow_last), 0
        for j, state in sorted(pending.items()):
            chosen = list(state.rows)
            for i in range(self.n):
                if _decodes(chosen):
                    break
                if i in state.originals or not _raises_rank(chosen, self.B[i]):
                    continue
                chosen.append(self.B[i])
                worker = i if not slow_last[i] else fast[turn % len(fast)]
                turn += worker != i
                tasks.append(Task(worker, j, self.B[i], original=i))
        return tasks

    def received(self, state, task):
        if task.original not in state.originals:
            state.originals.add(task.original)
            state.rows.append(task.coefficients)


class Multiplexed(Scheme):
    name = "m_sgc"

    @property
    def parts_per_chunk(self) -> int:
        return self.n

    def _chunk(self, c: int) -> np.ndarray:
        row = np.zeros(self.chunks)
        row[c * self.n:(c + 1) * self.n] = 1.0
        return row

    def tasks(self, t, new_job, pending, slow_last):
        tasks = [Task(i, t, self._chunk(i), original=i) for i in range(self.n)] if new_job else []
        fast, turn = _fast_workers(slow_last), 0
        for j, state in sorted(pending.items()):
            missing = [c for c in range(self.n) if c not in state.chunks_done]
            if not missing:
                continue
            if t == j + self.delay:  # the deadline: what is left, coded across all workers
                parts = np.zeros((self.n, self.chunks))
                for c in missing:
                    parts[np.arange(self.n), c * self.n + np.arange(self.n)] = 1.0
                tasks += [Task(i, j, self.B[i] @ parts) for i in range(self.n)]
            else:
                for c in missing:
                    tasks.append(Task(fast[turn % len(fast)], j, self._chunk(c), original=c))
                    turn += 1
        return tasks

    def received(self, state, task):
        if task.original >= 0:
            if task.original in state.chunks_done:
                return
            state.chunks_done.add(task.original)
        state.rows.append(task.coefficients)


SCHEMES: dict[str, type[Scheme]] = {s.name: s for s in (Uncoded, GradientCoding, SelectiveRepetition, Multiplexed)}


def make_scheme(name: str, n: int, s: int, delay: int, code: str = "cyclic", seed: int = 0) -> Scheme:
    """The scheme ``name`` (a key of :data:`SCHEMES`) for ``n`` workers."""
    if name not in SCHEMES:
        raise ValueError(f"unknown scheme {name!r}; known: {', '.join(SCHEMES)}")
    if (name in ("uncoded", "gc")) != (delay == 0):
        raise ValueError(f"scheme {name}: delay {delay}; uncoded and gc finish each job in its round (T = 0), "
                         "sr_sgc and m_sgc need T >= 1")
    return SCHEMES[name](n, s, delay, code, seed)


def _decodes(rows: list[np.ndarray]) -> bool:
    if not rows:
        return False
    try:
        decoding_weights(np.array(rows))
    except NotDecodable:
        return False
    return True


def _raises_rank(rows: list[np.ndarray], row: np.ndarray) -> bool:
    if not rows:
        return True
    return np.linalg.matrix_rank(np.array([*rows, row])) > np.linalg.matrix_rank(np.array(rows))


def simulate(scheme: Scheme, pattern: np.ndarray, jobs: int, slow_factor: float) -> Timeline:
    """Run ``jobs`` jobs under the straggler ``pattern`` (``(jobs + T, n)`` booleans); see the
    module docstring for the master's rule. Returns the rounds and every job's decoding."""
    n, delay = scheme.n, scheme.delay
    if pattern.shape != (jobs + delay, n):
        raise ValueError(f"the straggler pattern has shape {pattern.shape}; expected ({jobs + delay}, {n})")
    pending: dict[int, JobState] = {}
    decoded: dict[int, Decoding] = {}
    rounds: list[RoundLog] = []
    clock, slow_last = 0.0, np.zeros(n, dtype=bool)
    for t in range(1, jobs + delay + 1):
        new_job = t <= jobs
        tasks = scheme.tasks(t, new_job, pending, slow_last)
        if new_job:
            pending[t] = JobState(t)
        loads = np.zeros(n)
        for task in tasks:
            loads[task.worker] += np.count_nonzero(task.coefficients) / scheme.chunks
        slow = pattern[t - 1]
        times = n * loads * np.where(slow, slow_factor, 1.0)
        for task in tasks:
            if not slow[task.worker]:
                scheme.received(pending[task.job], task)
        waiting = sorted((i for i in range(n) if slow[i] and loads[i] > 0), key=lambda i: (times[i], i))
        waited: list[int] = []
        due = t - delay
        while due in pending and not _decodes(pending[due].rows):
            if not waiting:
                raise RuntimeError(f"{scheme.name}: job {due} cannot be decoded even with every result of round {t}")
            worker = waiting.pop(0)
            waited.append(worker)
            for task in tasks:
                if task.worker == worker:
                    scheme.received(pending[task.job], task)
        heard = ~slow | np.isin(np.arange(n), waited)
        duration = float(times[heard & (loads > 0)].max(initial=0.0))
        clock += duration
        for j in sorted(pending):
            rows = np.array(pending[j].rows) if pending[j].rows else np.zeros((0, scheme.chunks))
            try:
                weights = decoding_weights(rows)
            except NotDecodable:
                continue
            decoded[j] = Decoding(j, t, clock, rows, weights)
            del pending[j]
        rounds.append(RoundLog(t, duration, clock, loads, slow.copy(), tuple(waited)))
        slow_last = slow & ~heard
    return Timeline(scheme.chunks, rounds, decoded)

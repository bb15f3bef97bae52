"""Participation models: which clients take part in each round.

Every model draws over client ids ``0..N-1`` and offers

- ``sample(round) -> list[int]``: the sorted participants of that round (possibly empty for
  the random models);
- ``probabilities() -> numpy.ndarray``: each client's long-run participation probability
  (what "FedAvg with known p_i" divides by).

Determinism: ``sample(t)`` is a pure function of the constructor arguments and ``t`` for every
model. Round ``t`` uses its own generator ``numpy.random.default_rng([seed, salt, t])`` (a
per-model salt keeps models with the same seed independent), so calling rounds out of order,
twice, or after a restart gives the same participants. The Markov model's state at round ``t``
depends on all earlier rounds; it caches the chain and replays it from round 0 only when asked
for an earlier round. Its ``state_dict()`` stores the cache, so a resumed run continues
without replaying (and identically either way).

The heterogeneous models follow the participation settings of FedAU: S. Wang, M. Ji,
"A Lightweight Method for Tackling Unknown Participation Statistics in Federated Averaging",
arXiv:2306.03401.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from fedsim.config import ExperimentConfig

__all__ = [
    "BernoulliParticipation",
    "CyclicParticipation",
    "MarkovParticipation",
    "UniformSampler",
    "evaluation_sample",
]

_SALT_UNIFORM = 101
_SALT_BERNOULLI = 102
_SALT_MARKOV = 103
_SALT_CYCLIC = 104
_SALT_DRAW_PROBABILITIES = 105
_SALT_EVALUATE = 106


def _check_seed(seed: int, where: str) -> None:
    if int(seed) != seed or seed < 0:
        raise ValueError(f"{where}: seed must be a non-negative integer, got {seed!r}")


def _check_round(server_round: int, where: str) -> None:
    if int(server_round) != server_round or server_round < 0:
        raise ValueError(f"{where}: round must be a non-negative integer, got {server_round!r}")


def _round_rng(seed: int, salt: int, server_round: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), salt, int(server_round)])


def _as_probabilities(values: float | Sequence[float] | np.ndarray, n: int | None, name: str,
                      where: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim == 0:
        if n is None:
            raise ValueError(f"{where}: num_clients is required when {name} is a scalar")
        arr = np.full(n, float(arr))
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{where}: {name} must be a scalar or a non-empty 1-D array")
    if n is not None and arr.size != n:
        raise ValueError(f"{where}: {name} has {arr.size} entries for {n} clients")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0) or np.any(arr > 1):
        raise ValueError(f"{where}: {name} must lie in [0, 1]")
    return arr


class UniformSampler:
    """Each round, a fixed number of clients drawn uniformly without replacement.

    Parameters
    ----------
    num_clients : int
        Total number of clients ``N``.
    clients_per_round : int or None, default None
        Clients per round ``k``; give this or ``fraction``.
    fraction : float or None, default None
        Fraction of clients per round, ``k = max(1, floor(fraction * N))`` (Flower's rule).
    seed : int, default 0
        Seed; round ``t`` uses ``default_rng([seed, salt, t])``.
    """

    def __init__(self, num_clients: int, clients_per_round: int | None = None,
                 fraction: float | None = None, seed: int = 0) -> None:
        if num_clients < 1:
            raise ValueError(f"UniformSampler: num_clients must be >= 1, got {num_clients}")
        if (clients_per_round is None) == (fraction is None):
            raise ValueError("UniformSampler: give exactly one of clients_per_round and fraction")
        if fraction is not None:
            if not 0.0 < fraction <= 1.0:
                raise ValueError(f"UniformSampler: fraction must be in (0, 1], got {fraction}")
            clients_per_round = max(1, int(fraction * num_clients))
        if not 1 <= clients_per_round <= num_clients:
            raise ValueError(f"UniformSampler: clients_per_round must be in [1, {num_clients}], "
                             f"got {clients_per_round}")
        _check_seed(seed, "UniformSampler")
        self.num_clients = int(num_clients)
        self.clients_per_round = int(clients_per_round)
        self.seed = int(seed)

    def sample(self, server_round: int) -> list[int]:
        """Sorted ids of the ``k`` clients drawn for ``server_round``."""
        _check_round(server_round, "UniformSampler.sample")
        rng = _round_rng(self.seed, _SALT_UNIFORM, server_round)
        chosen = rng.choice(self.num_clients, size=self.clients_per_round, replace=False)
        return sorted(int(i) for i in chosen)

    def probabilities(self) -> np.ndarray:
        """``k / N`` for every client."""
        return np.full(self.num_clients, self.clients_per_round / self.num_clients)


class BernoulliParticipation:
    """Client ``i`` takes part in each round independently with probability ``p_i``.

    Parameters
    ----------
    probabilities : sequence of float or numpy.ndarray
        Per-client participation probabilities ``p_i`` in ``[0, 1]``; their number is ``N``.
    seed : int, default 0
        Seed; round ``t`` uses ``default_rng([seed, salt, t])``.

    See Also
    --------
    BernoulliParticipation.from_uniform : ``p_i`` drawn uniformly from an interval.
    BernoulliParticipation.from_label_distribution : ``p_i`` tied to the client's label mix.
    """

    def __init__(self, probabilities: Sequence[float] | np.ndarray, seed: int = 0) -> None:
        self.p = _as_probabilities(probabilities, None, "probabilities", "BernoulliParticipation")
        _check_seed(seed, "BernoulliParticipation")
        self.num_clients = self.p.size
        self.seed = int(seed)

    @classmethod
    def from_uniform(cls, num_clients: int, low: float = 0.02, high: float = 0.5,
                     seed: int = 0) -> BernoulliParticipation:
        """``p_i ~ Uniform[low, high]`` independently per client (drawn once, from ``seed``).

        Parameters
        ----------
        num_clients : int
            Number of clients ``N``.
        low, high : float, default 0.02, 0.5
            Interval of the probabilities, ``0 <= low <= high <= 1``.
        seed : int, default 0
            Seed for both the draw of the ``p_i`` and the rounds.
        """
        if num_clients < 1:
            raise ValueError(f"BernoulliParticipation.from_uniform: num_clients must be >= 1, got {num_clients}")
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError(f"BernoulliParticipation.from_uniform: need 0 <= low <= high <= 1, got {low}, {high}")
        _check_seed(seed, "BernoulliParticipation.from_uniform")
        rng = np.random.default_rng([int(seed), _SALT_DRAW_PROBABILITIES])
        return cls(rng.uniform(low, high, size=num_clients), seed=seed)

    @classmethod
    def from_label_distribution(cls, label_distribution: Sequence[Sequence[float]] | np.ndarray,
                                mean_probability: float = 0.1, min_probability: float = 0.02,
                                concentration: float = 0.1, seed: int = 0) -> BernoulliParticipation:
        """Probabilities tied to each client's label mix (FedAU's experimental setting).

        One per-class weight vector ``v ~ Dirichlet(concentration * 1_C)`` is drawn, and::

            p_i = clip(C * mean_probability * <q_i, v>, min_probability, 1)

        where ``q_i`` is client ``i``'s label distribution (its row, normalised to sum to 1).
        Since ``E[v_c] = 1/C``, ``p_i`` averages ``mean_probability`` before clipping; with a
        small concentration a few classes dominate ``v``, so clients holding those classes
        participate far more often than the others: participation is correlated with the
        data, which is what makes unknown ``p_i`` bias plain FedAvg.

        Parameters
        ----------
        label_distribution : array-like, shape (N, C)
            Per-client label counts or fractions (non-negative, each row with positive sum).
        mean_probability : float, default 0.1
            Target mean participation probability.
        min_probability : float, default 0.02
            Floor on every ``p_i`` (so every client participates eventually).
        concentration : float, default 0.1
            Dirichlet concentration of the per-class weights; smaller is more heterogeneous.
        seed : int, default 0
            Seed for both the draw of ``v`` and the rounds.
        """
        where = "BernoulliParticipation.from_label_distribution"
        counts = np.asarray(label_distribution, dtype=np.float64)
        if counts.ndim != 2 or counts.shape[0] < 1 or counts.shape[1] < 1:
            raise ValueError(f"{where}: label_distribution must have shape (N, C), got {counts.shape}")
        totals = counts.sum(axis=1)
        if np.any(counts < 0) or np.any(totals <= 0):
            raise ValueError(f"{where}: label_distribution rows must be non-negative with positive sum")
        if not 0.0 < mean_probability <= 1.0 or not 0.0 <= min_probability <= 1.0:
            raise ValueError(f"{where}: mean_probability must be in (0, 1] and min_probability in [0, 1]")
        if concentration <= 0:
            raise ValueError(f"{where}: concentration must be > 0, got {concentration}")
        _check_seed(seed, where)
        num_classes = counts.shape[1]
        rng = np.random.default_rng([int(seed), _SALT_DRAW_PROBABILITIES])
        class_weights = rng.dirichlet(np.full(num_classes, float(concentration)))
        fractions = counts / totals[:, None]
        p = np.clip(num_classes * mean_probability * (fractions @ class_weights), min_probability, 1.0)
        return cls(p, seed=seed)

    def sample(self, server_round: int) -> list[int]:
        """Sorted ids of the clients whose coin came up for ``server_round``."""
        _check_round(server_round, "BernoulliParticipation.sample")
        u = _round_rng(self.seed, _SALT_BERNOULLI, server_round).random(self.num_clients)
        return np.flatnonzero(u < self.p).tolist()

    def probabilities(self) -> np.ndarray:
        """The ``p_i``."""
        return self.p.copy()


class MarkovParticipation:
    """Each client is a two-state (on/off) Markov chain; "on" clients participate.

    Per round, an "on" client switches off with probability ``p_on_to_off`` (``a``) and an
    "off" client switches on with probability ``p_off_to_on`` (``b``). The state at round 0
    is drawn from the stationary distribution, whose "on" probability is::

        pi_i = b_i / (a_i + b_i)

    which is what :meth:`probabilities` returns.

    Parameters
    ----------
    p_on_to_off : float or array-like
        ``a``, scalar or one per client, in ``[0, 1]``.
    p_off_to_on : float or array-like
        ``b``, scalar or one per client, in ``[0, 1]``; ``a + b > 0`` for every client.
    num_clients : int or None, default None
        Required when both probabilities are scalars.
    seed : int, default 0
        Seed; the transition of round ``t`` uses ``default_rng([seed, salt, t])``.

    See Also
    --------
    MarkovParticipation.from_probabilities : chains with prescribed stationary ``p_i``.
    """

    def __init__(self, p_on_to_off: float | Sequence[float] | np.ndarray,
                 p_off_to_on: float | Sequence[float] | np.ndarray,
                 num_clients: int | None = None, seed: int = 0) -> None:
        where = "MarkovParticipation"
        off_arr = np.asarray(p_on_to_off, dtype=np.float64)
        on_arr = np.asarray(p_off_to_on, dtype=np.float64)
        n = num_clients
        for arr in (off_arr, on_arr):
            if n is None and arr.ndim == 1:
                n = arr.size
        self.p_on_to_off = _as_probabilities(off_arr, n, "p_on_to_off", where)
        self.p_off_to_on = _as_probabilities(on_arr, n, "p_off_to_on", where)
        if np.any(self.p_on_to_off + self.p_off_to_on <= 0):
            raise ValueError(f"{where}: p_on_to_off + p_off_to_on must be > 0 for every client")
        _check_seed(seed, where)
        self.num_clients = self.p_on_to_off.size
        self.seed = int(seed)
        self._round = 0
        self._state = self._initial_state()

    @classmethod
    def from_probabilities(cls, probabilities: Sequence[float] | np.ndarray,
                           p_off_to_on: float = 0.05, seed: int = 0) -> MarkovParticipation:
        """Chains whose stationary "on" probability is ``p_i`` (FedAU's Markov setting).

        ``b = p_off_to_on`` and ``a = b (1/p_i - 1)``; where that ``a`` exceeds 1, both are
        divided by it (``a = 1``, ``b = p_i / (1 - p_i)``). Either way ``b / (a + b) = p_i``.

        Parameters
        ----------
        probabilities : array-like
            Target stationary probabilities, in ``(0, 1]``.
        p_off_to_on : float, default 0.05
            Largest "off -> on" probability; smaller means longer on/off runs.
        seed : int, default 0
            Seed.
        """
        where = "MarkovParticipation.from_probabilities"
        p = _as_probabilities(probabilities, None, "probabilities", where)
        if np.any(p <= 0):
            raise ValueError(f"{where}: probabilities must be > 0")
        if not 0.0 < p_off_to_on <= 1.0:
            raise ValueError(f"{where}: p_off_to_on must be in (0, 1], got {p_off_to_on}")
        to_on = np.full(p.size, float(p_off_to_on))
        to_off = to_on * (1.0 / p - 1.0)
        too_big = to_off > 1.0
        to_on[too_big] /= to_off[too_big]
        to_off[too_big] = 1.0
        return cls(to_off, to_on, seed=seed)

    def _initial_state(self) -> np.ndarray:
        u = _round_rng(self.seed, _SALT_MARKOV, 0).random(self.num_clients)
        return u < self.probabilities()

    def _step(self, state: np.ndarray, server_round: int) -> np.ndarray:
        u = _round_rng(self.seed, _SALT_MARKOV, server_round).random(self.num_clients)
        return np.where(state, u >= self.p_on_to_off, u < self.p_off_to_on)

    def sample(self, server_round: int) -> list[int]:
        """Sorted ids of the clients "on" at ``server_round``."""
        _check_round(server_round, "MarkovParticipation.sample")
        if server_round < self._round:
            self._round, self._state = 0, self._initial_state()
        while self._round < server_round:
            self._round += 1
            self._state = self._step(self._state, self._round)
        return np.flatnonzero(self._state).tolist()

    def probabilities(self) -> np.ndarray:
        """Stationary "on" probabilities ``b / (a + b)``."""
        return self.p_off_to_on / (self.p_on_to_off + self.p_off_to_on)

    def state_dict(self) -> dict:
        """The cached chain: the last round computed and every client's state then."""
        return {"round": int(self._round), "state": [bool(s) for s in self._state]}

    def load_state_dict(self, state: dict) -> None:
        """Restore a cache written by :meth:`state_dict` of an identically built model."""
        on = np.asarray(state["state"], dtype=bool)
        if on.shape != (self.num_clients,):
            raise ValueError(f"MarkovParticipation.load_state_dict: state has {on.size} clients, "
                             f"model has {self.num_clients}")
        _check_round(state["round"], "MarkovParticipation.load_state_dict")
        self._round, self._state = int(state["round"]), on


class CyclicParticipation:
    """Clients split into groups that take turns: round ``t`` runs group ``t mod G``.

    The split is a seeded random permutation cut into ``G`` groups whose sizes differ by at
    most one (``numpy.array_split``). Every client participates once every ``G`` rounds.

    Parameters
    ----------
    num_clients : int
        Total number of clients ``N``.
    num_groups : int
        Number of groups ``G``, ``1 <= G <= N``.
    seed : int, default 0
        Seed of the permutation.
    """

    def __init__(self, num_clients: int, num_groups: int, seed: int = 0) -> None:
        if num_clients < 1:
            raise ValueError(f"CyclicParticipation: num_clients must be >= 1, got {num_clients}")
        if not 1 <= num_groups <= num_clients:
            raise ValueError(f"CyclicParticipation: num_groups must be in [1, {num_clients}], got {num_groups}")
        _check_seed(seed, "CyclicParticipation")
        self.num_clients = int(num_clients)
        self.num_groups = int(num_groups)
        self.seed = int(seed)
        order = np.random.default_rng([int(seed), _SALT_CYCLIC]).permutation(num_clients)
        self.groups = [sorted(int(i) for i in g) for g in np.array_split(order, num_groups)]

    def sample(self, server_round: int) -> list[int]:
        """Sorted ids of group ``server_round mod G``."""
        _check_round(server_round, "CyclicParticipation.sample")
        return list(self.groups[server_round % self.num_groups])

    def probabilities(self) -> np.ndarray:
        """``1 / G`` for every client (long-run fraction of rounds)."""
        return np.full(self.num_clients, 1.0 / self.num_groups)


def evaluation_sample(num_clients: int, fraction: float, seed: int, step: int) -> list[int]:
    """The sorted clients of the federated evaluation at ``step`` (``eval.federated_fraction``):
    ``max(1, round(fraction * N))`` drawn uniformly without replacement from
    ``default_rng([seed, salt, step])``, so a step's draw is the same on resume; costs
    O(drawn), not O(N)."""
    _check_seed(seed, "evaluation_sample")
    _check_round(step, "evaluation_sample")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"evaluation_sample: fraction must be in (0, 1], got {fraction}")
    count = min(num_clients, max(1, round(fraction * num_clients)))
    chosen = _round_rng(seed, _SALT_EVALUATE, step).choice(num_clients, size=count, replace=False)
    return sorted(int(i) for i in chosen)


def build_sampler(exp: ExperimentConfig, label_mix: np.ndarray | None = None):
    """The participation model over partition ids (``participation:`` in the config).

    ``label_mix`` (clients x classes label proportions) is needed when the Bernoulli
    probabilities are tied to each client's labels.
    """
    part, n, seed = exp.participation, exp.partition.num_clients, exp.seed
    if part.model == "uniform":
        return UniformSampler(n, fraction=exp.strategy.fraction_train, seed=seed)
    if part.model == "cyclic":
        return CyclicParticipation(n, part.num_groups, seed=seed)
    if part.tied_to_labels:
        if label_mix is None:
            raise ValueError("participation.tied_to_labels needs the clients' label mix")
        bernoulli = BernoulliParticipation.from_label_distribution(
            label_mix, mean_probability=part.p_mean, min_probability=part.p_low,
            concentration=part.label_concentration, seed=seed)
    else:
        bernoulli = BernoulliParticipation.from_uniform(n, low=part.p_low, high=part.p_high, seed=seed)
    if part.model == "bernoulli":
        return bernoulli
    return MarkovParticipation.from_probabilities(bernoulli.probabilities(), p_off_to_on=part.p_off_to_on,
                                                  seed=seed)

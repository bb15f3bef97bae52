"""Simulated client speeds and the virtual duration of a client's work.

A speed is units of work per unit of virtual time; a client that must do ``work`` units
(e.g. local steps) takes ``work / speed`` plus its network delay. FedFix (Fraboni et al.,
"A General Theory for Federated Optimization with Asynchronous and Heterogeneous Clients
Updates", JMLR 2023, arXiv 2206.10189) spreads speeds linearly so that the fastest client
is 80% faster than the slowest: the ``"linear"`` profile with its default ``spread=0.8``.
"""

import csv
import inspect
import math
from pathlib import Path

import numpy as np

SPEED_PROFILES = ("linear", "lognormal", "two_tier", "csv")


def _linear(num_clients: int, rng: np.random.Generator, *, spread: float = 0.8,
            base: float = 1.0) -> np.ndarray:
    if spread < 0:
        raise ValueError(f"client_speeds('linear'): spread must be >= 0, got {spread}")
    steps = np.linspace(0.0, 1.0, num_clients) if num_clients > 1 else np.zeros(1)
    return rng.permutation(base * (1.0 + spread * steps))


def _lognormal(num_clients: int, rng: np.random.Generator, *, sigma: float = 0.5,
               base: float = 1.0) -> np.ndarray:
    if sigma < 0:
        raise ValueError(f"client_speeds('lognormal'): sigma must be >= 0, got {sigma}")
    return base * np.exp(rng.normal(0.0, sigma, size=num_clients))


def _two_tier(num_clients: int, rng: np.random.Generator, *, slow_fraction: float = 0.5,
              slow_factor: float = 4.0, base: float = 1.0) -> np.ndarray:
    if not 0.0 <= slow_fraction <= 1.0:
        raise ValueError(
            f"client_speeds('two_tier'): slow_fraction must be in [0, 1], got {slow_fraction}"
        )
    if slow_factor < 1.0:
        raise ValueError(
            f"client_speeds('two_tier'): slow_factor must be >= 1 (how many times slower), "
            f"got {slow_factor}"
        )
    speeds = np.full(num_clients, float(base))
    slow = rng.permutation(num_clients)[: round(slow_fraction * num_clients)]
    speeds[slow] = base / slow_factor
    return speeds


def _from_csv(num_clients: int, rng: np.random.Generator, *, path: str | Path,
              column: str = "speed") -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"client_speeds('csv'): no such file {path}")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or column not in reader.fieldnames:
            raise ValueError(
                f"client_speeds('csv'): {path} has no '{column}' column in its header "
                f"(found {reader.fieldnames})"
            )
        speeds = []
        for row in reader:
            try:
                speeds.append(float(row[column]))
            except (TypeError, ValueError):
                raise ValueError(
                    f"client_speeds('csv'): {path} line {reader.line_num}: "
                    f"'{row[column]}' is not a number"
                ) from None
    if len(speeds) != num_clients:
        raise ValueError(
            f"client_speeds('csv'): {path} has {len(speeds)} speeds, expected one per client "
            f"({num_clients})"
        )
    speeds = np.asarray(speeds, dtype=float)
    bad = np.flatnonzero(~(np.isfinite(speeds) & (speeds > 0)))
    if bad.size:
        raise ValueError(
            f"client_speeds('csv'): {path}: speeds must be finite and > 0; client "
            f"{int(bad[0])} has {speeds[bad[0]]}"
        )
    return speeds


_PROFILES = {"linear": _linear, "lognormal": _lognormal, "two_tier": _two_tier,
             "csv": _from_csv}


def client_speeds(kind: str, num_clients: int, seed: int = 0, **kw) -> np.ndarray:
    """Per-client speeds (work units per unit of virtual time), shape ``(num_clients,)``.

    Parameters
    ----------
    kind : str
        The speed profile, one of:

        - ``"linear"``: ``base * (1 + spread * k / (num_clients - 1))`` for k = 0..N-1,
          assigned to clients in a seeded random order, so ``max / min = 1 + spread``.
          kw: ``spread`` (float, default 0.8: the FedFix setting, fastest 80% faster),
          ``base`` (float, default 1.0: the slowest speed).
        - ``"lognormal"``: ``base * exp(N(0, sigma^2))``, i.i.d. per client.
          kw: ``sigma`` (float, default 0.5), ``base`` (float, default 1.0: the median).
        - ``"two_tier"``: ``round(slow_fraction * N)`` clients, chosen at random, run at
          ``base / slow_factor``, the others at ``base``. kw: ``slow_fraction`` (float,
          default 0.5), ``slow_factor`` (float >= 1, default 4.0), ``base`` (default 1.0).
        - ``"csv"``: read from a CSV file with a header; row k is client k. kw: ``path``
          (required), ``column`` (str, default ``"speed"``). Exactly ``num_clients`` rows of
          finite positive numbers are required.
    num_clients : int
        Number of clients (>= 1).
    seed : int, default 0
        Seed of the random assignment / draws (unused by ``"csv"``).
    **kw
        Profile parameters listed above.

    Returns
    -------
    numpy.ndarray
        Float64 speeds, all > 0.
    """
    if kind not in _PROFILES:
        raise ValueError(f"client_speeds: '{kind}' is not a speed profile; known: "
                         f"{', '.join(SPEED_PROFILES)}")
    if num_clients < 1:
        raise ValueError(f"client_speeds: num_clients must be >= 1, got {num_clients}")
    profile = _PROFILES[kind]
    rng = np.random.default_rng(seed)
    try:
        inspect.signature(profile).bind(num_clients, rng, **kw)
    except TypeError as err:
        raise ValueError(f"client_speeds('{kind}'): {err}") from None
    return profile(num_clients, rng, **kw)


def client_duration(
    work: float,
    speed: float,
    *,
    network_delay: float = 0.0,
    rng: np.random.Generator | None = None,
    dropout: float = 0.0,
) -> float | None:
    """Virtual time a client needs for ``work``: ``work / speed + network_delay``.

    Parameters
    ----------
    work : float
        Units of work (e.g. local steps), >= 0.
    speed : float
        The client's speed, > 0.
    network_delay : float, default 0.0
        Fixed round-trip communication time added to the compute time, >= 0.
    rng : numpy.random.Generator or None, default None
        Source of the dropout draw; required when ``dropout > 0``.
    dropout : float, default 0.0
        Probability in [0, 1] that the client drops out of this round.

    Returns
    -------
    float or None
        The duration, or ``None`` when the client dropped out (it never reports back).
    """
    if work < 0 or not math.isfinite(work):
        raise ValueError(f"client_duration: work must be finite and >= 0, got {work}")
    if speed <= 0 or not math.isfinite(speed):
        raise ValueError(f"client_duration: speed must be finite and > 0, got {speed}")
    if network_delay < 0:
        raise ValueError(f"client_duration: network_delay must be >= 0, got {network_delay}")
    if not 0.0 <= dropout <= 1.0:
        raise ValueError(f"client_duration: dropout must be in [0, 1], got {dropout}")
    if dropout > 0:
        if rng is None:
            raise ValueError("client_duration: dropout > 0 needs an rng")
        if rng.random() < dropout:
            return None
    return work / speed + network_delay

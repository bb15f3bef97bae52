"""The server's half of a run's differential privacy: the central mechanism, adaptive
clipping, and the accountant's ledger (checkpointed, so a resumed run continues it exactly).

Under ``privacy.mechanism: central`` the strategy base
(:class:`fedsim.strategies.base.FedsimStrategy`) calls its ``private_aggregate`` in place of
``aggregate_updates``: :meth:`ServerPrivacy.aggregate` (DP-FedAvg's mean) by default, an
algorithm's own weighted sum through :meth:`ServerPrivacy.noisy_sum` (SCAFFOLD, FedNova,
FedAU); clipping is the server's, on the updates it receives. The base calls
:meth:`ServerPrivacy.spend` after every round; the synchronous loop writes
:meth:`ServerPrivacy.row` into every metrics row.

Units of privacy: a client under ``central`` and ``local`` (client-level DP), a training
record under ``sample`` (DP-SGD). The reported ``epsilon`` is that of the worst-off unit.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from fedsim.clients.train import local_steps
from fedsim.privacy.accounting import GaussianRelease, calibrate_noise, epsilon
from fedsim.privacy.mechanisms import (
    adaptive_clip_norm,
    aggregate_noise_std,
    analytic_gaussian_epsilon,
    analytic_gaussian_sigma,
    clip_factors,
    clip_rows,
    update_noise_multiplier,
)
from fedsim.privacy.noise import gaussian_noise
from fedsim.privacy.sampling import ClientSampling, client_sampling

if TYPE_CHECKING:
    from fedsim.config import ExperimentConfig
    from fedsim.strategies.replies import ClientUpdate

log = logging.getLogger(__name__)

__all__ = ["NOISE_KEY", "ServerPrivacy", "record_release"]

NOISE_KEY = "privacy-noise-multiplier"
"""The training message's config key holding the run's noise multiplier, which the server
calibrates (local and sample: the clients add the noise)."""


def record_release(num_examples: int, batch_size: int, noise_multiplier: float) -> GaussianRelease:
    """One DP-SGD step of a client of ``num_examples`` records: a Gaussian of the noise
    multiplier on a batch of ``batch_size``, accounted as Poisson sampling with
    ``q = min(1, B / n)`` (as Opacus and TF Privacy account shuffled batches)."""
    return GaussianRelease(noise_multiplier, "poisson", min(1.0, batch_size / num_examples))


class ServerPrivacy:
    """A run's mechanism, noise multiplier and ledger.

    Parameters
    ----------
    cfg : ExperimentConfig
        ``cfg.privacy`` is not ``none``.
    client_examples : sequence of int
        Each client's training examples (DP-SGD's sampling rates and steps).
    """

    def __init__(self, cfg: ExperimentConfig, client_examples: Sequence[int]) -> None:
        self.cfg, self.settings = cfg, cfg.privacy
        self.sampling: ClientSampling = client_sampling(cfg)
        self.client_examples = [int(n) for n in client_examples]
        self.clip_norm = self.settings.clip_norm
        self.rounds_spent = 0
        self.participations: dict[int, int] = {}
        settings = self.settings
        self.noise_multiplier = settings.noise_multiplier or self._calibrated(settings.target_epsilon)
        self.count_noise_multiplier = (settings.count_noise_multiplier
                                       or max(self.sampling.expected_clients / 20, self.noise_multiplier))
        if self.sampling.note and settings.mechanism == "central":
            log.warning("privacy: %s", self.sampling.note)
        log.info("privacy: %s, noise multiplier %.4g, clip norm %g, delta %g; epsilon covers the model, not the "
                 "clients' metrics in the rows (train_loss, federated evaluation)", settings.mechanism,
                 self.noise_multiplier, self.clip_norm, settings.delta)

    # ---------------------------------------------------------------- accounting
    def _central_release(self, noise_multiplier: float) -> GaussianRelease:
        s = self.sampling
        return GaussianRelease(noise_multiplier, s.kind, s.probability, s.sample_size, s.population)

    def _epsilon_of(self, noise_multiplier: float, rounds: int, participations: dict[int, int]) -> float:
        """Epsilon of the worst-off unit after ``rounds`` rounds with these participations."""
        mechanism, delta = self.settings.mechanism, self.settings.delta
        if mechanism == "central":
            return epsilon({self._central_release(noise_multiplier): rounds}, delta, self.settings.accountant)
        most = max(participations.values(), default=0)
        if mechanism == "local":  # c Gaussian releases compose to one of multiplier z / sqrt(c)
            return analytic_gaussian_epsilon(noise_multiplier / math.sqrt(most), delta) if most else 0.0
        return epsilon(self._worst_ledger(noise_multiplier, participations), delta, self.settings.accountant)

    def _calibrated(self, target_epsilon: float) -> float:
        """The noise multiplier that spends ``target_epsilon`` over the whole run, every
        client taking part in every round under ``local`` and ``sample`` (the worst case)."""
        rounds = self.cfg.rounds
        if self.settings.mechanism == "local":
            return analytic_gaussian_sigma(target_epsilon, self.settings.delta) * math.sqrt(rounds)
        if self.settings.mechanism == "central":
            def ledger_of(z: float) -> dict[GaussianRelease, int]:
                return {self._central_release(z): rounds}
        else:
            one_per_size = {n: client for client, n in enumerate(self.client_examples)}
            every_round = dict.fromkeys(one_per_size.values(), rounds)

            def ledger_of(z: float) -> dict[GaussianRelease, int]:
                return self._worst_ledger(z, every_round)
        return calibrate_noise(ledger_of, target_epsilon, self.settings.delta, self.settings.accountant)

    def _worst_ledger(self, noise_multiplier: float, participations: dict[int, int]) -> dict[GaussianRelease, int]:
        """The ledger of the client whose epsilon is largest (DP-SGD)."""
        most: dict[int, int] = {}  # per client size, the most participations
        for client, count in participations.items():
            n = self.client_examples[client]
            most[n] = max(most.get(n, 0), count)
        batch, delta = self.cfg.client.batch_size, self.settings.delta
        ledgers = [{record_release(n, batch, noise_multiplier): count * local_steps(n, self.cfg.client)}
                   for n, count in most.items()]
        return max(ledgers, key=lambda ledger: epsilon(ledger, delta, self.settings.accountant), default={})

    def epsilon(self) -> float:
        """Epsilon spent so far (the worst-off unit's; an upper bound)."""
        return self._epsilon_of(self.noise_multiplier, self.rounds_spent, self.participations)

    def epsilon_after_next_round(self) -> float:
        """Epsilon if one more round is spent (every client taking part, under local and sample)."""
        every = {c: self.participations.get(c, 0) + 1 for c in range(len(self.client_examples))}
        return self._epsilon_of(self.noise_multiplier, self.rounds_spent + 1, every)

    def stop_reason(self) -> str | None:
        """Why the next round must not run (``privacy.max_epsilon``), or None."""
        budget = self.settings.max_epsilon
        if budget is None or (after := self.epsilon_after_next_round()) <= budget:
            return None
        return (f"privacy.max_epsilon {budget:g}: one more round would spend epsilon {after:.4g}; "
                f"stopped with {self.epsilon():.4g} spent")

    def spend(self, participants: Sequence[int]) -> None:
        """Record one round: the central release, or each participant's own release."""
        self.rounds_spent += 1
        if self.settings.mechanism == "central":
            return
        for client in participants:
            self.participations[client] = self.participations.get(client, 0) + 1

    # ------------------------------------------------------------- the mechanism
    @property
    def replace_one(self) -> bool:
        return self.sampling.kind == "fixed"

    @property
    def update_noise_multiplier(self) -> float:
        """The multiplier of the noise on the updates' sum (the whole of it under fixed
        clipping; under adaptive clipping what the count leaves, Andrew et al. Theorem 1)."""
        if self.settings.clipping == "adaptive":
            return update_noise_multiplier(self.noise_multiplier, self.count_noise_multiplier)
        return self.noise_multiplier

    def noise_std(self) -> float:
        """Std per coordinate of the noise on the central aggregate (:func:`aggregate_noise_std`)."""
        return aggregate_noise_std(self.clip_norm, self.update_noise_multiplier, self.sampling.expected_clients,
                                   self.replace_one)

    def sum_noise_std(self) -> float:
        """Std per coordinate of the noise on the clipped updates' sum, ``z S`` (the aggregate's
        :meth:`noise_std` times ``m``): what a distributed mechanism splits over the clients."""
        return self.noise_std() * self.sampling.expected_clients

    def aggregate(self, server_round: int, updates: list[ClientUpdate]) -> torch.Tensor:
        """The central mechanism: ``(sum_i clip(Delta_i, C) + N(0, (z S)^2 I)) / m``, every
        client weighing the same (DP-FedAvg), then the adaptive clip norm's step."""
        stacked = torch.stack([u.update for u in updates])
        return (self.noisy_sum(server_round, stacked.double()) / self.sampling.expected_clients).to(stacked.dtype)

    def noisy_sum(self, server_round: int, rows: torch.Tensor, coefficients: torch.Tensor | None = None,
                  bound: float = 1.0, divisors: torch.Tensor | None = None) -> torch.Tensor:
        """The Gaussian mechanism on a weighted sum of clipped client vectors (McMahan et al.
        2018, arXiv 1710.06963, the fixed-denominator estimator with bounded weights)::

            sum_i c_i clip(v_i, C) + N(0, (z S beta)^2 I),    v_i = rows_i / divisors_i

        ``c_i`` in ``[0, beta]`` (1 when ``coefficients`` is None) with ``beta = bound`` a
        bound on every client's coefficient that does not depend on the clients' data, so one
        client added or removed moves the sum by at most ``beta C`` (``S = C``; ``2 C`` when
        one is replaced, fixed-size sampling): the L2 sensitivity, times the noise multiplier
        ``z`` (:attr:`update_noise_multiplier`), is the noise's std per coordinate.
        ``divisors`` (positive, one per row; 1 when None) give the vectors clipped, e.g.
        FedNova's ``d_i = Delta_i / a_i``; the sum is taken as ``sum_i (c_i f_i / a_i) rows_i``
        (``f_i`` the clip factors), the algorithm's own weighted sum when nothing is clipped.
        DP-FedAvg's mean is this sum with ``c_i = 1`` divided by ``m`` (:meth:`aggregate`);
        algorithms with their own weights pass them here
        (:meth:`fedsim.strategies.base.FedsimStrategy.private_aggregate`). In the rows' dtype;
        under ``privacy.clipping: adaptive`` the clip norm then takes its step from the
        ``v_i``'s norms."""
        if coefficients is not None and (bool((coefficients < 0).any())
                                         or bool((coefficients > bound * (1 + 1e-12)).any())):
            raise ValueError(f"noisy_sum: coefficients outside [0, {bound:g}], the bound their noise is "
                             "calibrated to")
        if divisors is None:
            clipped, norms = clip_rows(rows, self.clip_norm)
            total = clipped.sum(0) if coefficients is None else coefficients.to(rows.dtype) @ clipped
        else:
            norms = (rows.double() / divisors[:, None]).norm(dim=1)
            weights = torch.ones(len(rows), dtype=torch.float64) if coefficients is None else coefficients
            total = (weights * clip_factors(norms, self.clip_norm) / divisors).to(rows.dtype) @ rows
        seed, m = self.cfg.seed, self.sampling.expected_clients
        noise = gaussian_noise(rows.shape[1], self.sum_noise_std() * bound, "privacy", seed, "central", server_round)
        total = total + noise.to(rows.dtype)
        if self.settings.clipping == "adaptive":
            scale = 2.0 if self.replace_one else 1.0
            count_noise = float(gaussian_noise(1, self.count_noise_multiplier * scale, "privacy", seed, "count",
                                               server_round))
            unclipped = (float((norms <= self.clip_norm).sum()) - len(rows) / 2 + count_noise) / m + 0.5
            self.clip_norm = adaptive_clip_norm(self.clip_norm, unclipped, self.settings.target_quantile,
                                                self.settings.clip_learning_rate)
        return total

    def client_config(self) -> dict[str, float]:
        """What a training message tells the clients: the noise multiplier (local, sample)."""
        return {} if self.settings.mechanism == "central" else {NOISE_KEY: self.noise_multiplier}

    # ------------------------------------------------------------------ outputs
    def row(self) -> dict[str, Any]:
        """The privacy entries of a metrics row."""
        row: dict[str, Any] = {"epsilon": self.epsilon()}
        if self.settings.clipping == "adaptive":
            row["clip_norm"] = self.clip_norm
        return row

    def summary(self) -> dict[str, Any]:
        return {"epsilon": self.epsilon(), "delta": self.settings.delta, "noise_multiplier": self.noise_multiplier}

    def state_dict(self) -> dict[str, Any]:
        return {"clip_norm": self.clip_norm, "rounds_spent": self.rounds_spent,
                "participations": {str(c): n for c, n in self.participations.items()},
                "noise_multiplier": self.noise_multiplier}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.clip_norm = float(state["clip_norm"])
        self.rounds_spent = int(state["rounds_spent"])
        self.participations = {int(c): int(n) for c, n in state["participations"].items()}
        self.noise_multiplier = float(state["noise_multiplier"])

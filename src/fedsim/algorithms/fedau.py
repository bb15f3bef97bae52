"""FedAU: FedAvg with online-estimated aggregation weights for unknown participation.

Reference
---------
S. Wang, M. Ji, "A Lightweight Method for Tackling Unknown Participation Statistics in
Federated Averaging", arXiv:2306.03401. Authors' code: github.com/IBM/fedau (``main.py``).

Definition implemented (online weight estimation, per client ``i``)
-------------------------------------------------------------------
The client keeps ``S_i``, the length of its open participation gap, and the gaps closed so
far (their sum and count suffice). In every round ``t``, for every client::

    S_i <- S_i + 1
    if i participates in round t:
        omega_i^t = mean(closed gaps)  if any gap is closed, else 1   # history BEFORE this gap
        close the gap S_i;  S_i <- 0
    elif S_i == K:
        close the gap S_i (= K);  S_i <- 0                             # the open gap reached K

So a gap is the number of rounds between consecutive participations (participating in two
consecutive rounds is a gap of 1), every recorded gap is at most ``K``, and an absence longer
than ``K`` rounds is recorded as gaps of ``K`` followed by the remainder. ``omega_i`` estimates
``1 / p_i`` (the mean gap of a Bernoulli(``p_i``) client is ``1 / p_i``), truncated by ``K``.
The first participation gets weight 1, and the weight of round ``t`` uses only the gaps
closed before round ``t``, never the one that round ``t`` closes. Before the first recorded
round every client's open gap is 0, so a client that participates in the first round closes
a gap of 1. This is the rule of the authors' code (IBM/fedau, ``main.py``: the weight is the
mean of the recorded intervals, taken before the current interval is appended; an interval is
also recorded when the non-participation count reaches K). Their default cut-off is
effectively infinite (100000); fedsim's default is K = 50.

Aggregation::

    x <- x + eta_g * (1/N) * sum_{i in S_t} omega_i^t * Delta_i^t

with ``N`` the total number of clients, not the number of participants.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from pydantic import Field

from fedsim.algorithms.api import SyncStrategyBase
from fedsim.strategies.aggregate import check_updates
from fedsim.strategies.base import FedsimStrategy
from fedsim.strategies.replies import ClientUpdate

if TYPE_CHECKING:
    from fedsim.config import ExperimentConfig

__all__ = ["FedAU", "FedAUConfig", "FedAUWeights", "fedau_aggregate"]


class FedAUConfig(SyncStrategyBase):
    """FedAU (Wang & Ji, arXiv 2306.03401): x += eta_g/N * sum omega_i Delta_i.

    ``weights: online`` estimates omega_i from participation gaps (capped at K);
    ``weights: known`` uses the oracle omega_i = 1/p_i of the participation model.
    """

    name: Literal["fedau"] = "fedau"
    K: int = Field(50, ge=1)
    weights: Literal["online", "known"] = "online"


class FedAUWeights:
    """Online FedAU weights ``omega_i`` from the observed participation of ``N`` clients.

    FedAU (Wang & Ji, "A Lightweight Method for Tackling Unknown Participation Statistics in
    Federated Averaging", arXiv:2306.03401); the rule is spelled out in the module docstring.

    Parameters
    ----------
    num_clients : int
        Total number of clients ``N`` (ids ``0..N-1``).
    K : int, default 50
        Cut-off: an open gap is recorded (as ``K``) once it reaches ``K`` rounds.

    Notes
    -----
    Call :meth:`observe` once per round, with increasing round numbers. Rounds skipped
    between two calls count as rounds in which no client participated; the first call starts
    the history (earlier round numbers are not counted as absences).
    """

    def __init__(self, num_clients: int, K: int = 50) -> None:
        if num_clients < 1:
            raise ValueError(f"FedAUWeights: num_clients must be >= 1, got {num_clients}")
        if K < 1:
            raise ValueError(f"FedAUWeights: K must be >= 1, got {K}")
        self.num_clients = int(num_clients)
        self.K = int(K)
        self.open_gap = np.zeros(self.num_clients, dtype=np.int64)
        self.gap_sum = np.zeros(self.num_clients, dtype=np.int64)
        self.gap_count = np.zeros(self.num_clients, dtype=np.int64)
        self.last_round: int | None = None

    def add_clients(self, count: int) -> None:
        """Track ``count`` more clients, ids ``num_clients .. num_clients + count - 1``, with no
        history yet: their first participation gets weight 1 and their open gaps start now."""
        if count < 0:
            raise ValueError(f"FedAUWeights.add_clients: count must be >= 0, got {count}")
        fresh = np.zeros(count, dtype=np.int64)
        self.open_gap = np.concatenate([self.open_gap, fresh])
        self.gap_sum = np.concatenate([self.gap_sum, fresh])
        self.gap_count = np.concatenate([self.gap_count, fresh])
        self.num_clients += count

    def omega(self) -> np.ndarray:
        """Current weights of all clients from the closed gaps (1 where none is closed yet)."""
        has_gaps = self.gap_count > 0
        return np.where(has_gaps, self.gap_sum / np.maximum(self.gap_count, 1), 1.0)

    def _skip_rounds(self, num_rounds: int) -> None:
        """Advance every open gap by ``num_rounds`` rounds without participation."""
        total = self.open_gap + num_rounds
        closed = total // self.K
        self.gap_sum += closed * self.K
        self.gap_count += closed
        self.open_gap = total % self.K

    def observe(self, server_round: int, participant_ids: Iterable[int]) -> dict[int, float]:
        """Record round ``server_round`` and return the weights of its participants.

        Parameters
        ----------
        server_round : int
            Round number, larger than the previous call's.
        participant_ids : iterable of int
            Ids of the clients that participated (distinct, in ``[0, N)``).

        Returns
        -------
        dict of int to float
            ``omega_i`` of each participant, computed from its gaps closed before this round.
        """
        ids = np.asarray(sorted(int(i) for i in participant_ids), dtype=np.int64)
        if ids.size and (ids[0] < 0 or ids[-1] >= self.num_clients):
            raise ValueError(f"FedAUWeights.observe: participant ids must be in [0, {self.num_clients}), "
                             f"got {ids.tolist()}")
        if ids.size != np.unique(ids).size:
            raise ValueError(f"FedAUWeights.observe: duplicate participant ids in {ids.tolist()}")
        if self.last_round is not None:
            if server_round <= self.last_round:
                raise ValueError(f"FedAUWeights.observe: round {server_round} is not after the last "
                                 f"observed round {self.last_round}")
            self._skip_rounds(server_round - self.last_round - 1)
        self.last_round = int(server_round)

        weights = self.omega()[ids]
        self.open_gap += 1
        participated = np.zeros(self.num_clients, dtype=bool)
        participated[ids] = True
        closes = participated | (self.open_gap >= self.K)
        self.gap_sum[closes] += self.open_gap[closes]
        self.gap_count[closes] += 1
        self.open_gap[closes] = 0
        return {int(i): float(w) for i, w in zip(ids, weights)}

    def state_dict(self) -> dict:
        """Checkpointable state (plain Python types)."""
        return {
            "num_clients": self.num_clients,
            "K": self.K,
            "open_gap": self.open_gap.tolist(),
            "gap_sum": self.gap_sum.tolist(),
            "gap_count": self.gap_count.tolist(),
            "last_round": self.last_round,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a state written by :meth:`state_dict` (same ``num_clients`` and ``K``)."""
        if state["num_clients"] != self.num_clients or state["K"] != self.K:
            raise ValueError(f"FedAUWeights.load_state_dict: state is for num_clients={state['num_clients']}, "
                             f"K={state['K']}; this object has num_clients={self.num_clients}, K={self.K}")
        self.open_gap = np.asarray(state["open_gap"], dtype=np.int64)
        self.gap_sum = np.asarray(state["gap_sum"], dtype=np.int64)
        self.gap_count = np.asarray(state["gap_count"], dtype=np.int64)
        self.last_round = None if state["last_round"] is None else int(state["last_round"])


def fedau_aggregate(
    updates: torch.Tensor,
    weights: torch.Tensor | Sequence[float],
    num_clients: int,
    eta_g: float = 1.0,
) -> torch.Tensor:
    """FedAU's server step (arXiv:2306.03401): ``eta_g * (1/N) * sum_i omega_i * Delta_i``.

    Parameters
    ----------
    updates : torch.Tensor
        Participants' updates ``Delta_i``, shape ``(n, D)``.
    weights : torch.Tensor or sequence of float
        Their FedAU weights ``omega_i``, shape ``(n,)`` (from :meth:`FedAUWeights.observe`).
    num_clients : int
        Total number of clients ``N`` (the divisor; not ``n``).
    eta_g : float, default 1.0
        Global learning rate.

    Returns
    -------
    torch.Tensor
        Shape ``(D,)``, dtype and device of ``updates``.
    """
    check_updates(updates, "fedau_aggregate")
    w = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
    if w.numel() != updates.shape[0]:
        raise ValueError(f"fedau_aggregate: got {w.numel()} weights for {updates.shape[0]} updates")
    if num_clients < updates.shape[0]:
        raise ValueError(f"fedau_aggregate: num_clients ({num_clients}) is smaller than the number "
                         f"of updates ({updates.shape[0]})")
    scale = (w * (eta_g / num_clients)).to(dtype=updates.dtype, device=updates.device)
    return scale @ updates


class FedAU(FedsimStrategy):
    """FedAU: ``delta = (1/N) sum_{i in S_t} omega_i Delta_i``.

    ``weights: online`` uses :class:`FedAUWeights` (estimated from each client's
    participation gaps, capped at ``K``), fed every round with the clients whose updates were
    accepted; ``known`` uses the oracle ``omega_i = 1 / p_i`` of fedsim's participation model
    (the "FedAvg with known participation probabilities" baseline; engine only).

    In a Flower app there are no partition ids: participation is tracked per Flower node id,
    and a node participates in a round when its training reply is accepted. ``N`` is the
    number of nodes the grid reports in that round (all connected nodes, sampled or not), not
    the number of replies; a node that connects later is tracked from the round it first
    appears in, with no history.

    Parameters
    ----------
    *args, **kwargs
        Flower FedAvg's arguments, ``min_successful`` and ``server_opt``; ``weighted_by_key``
        weighs the metrics only.
    K : int, default 50
        Cut-off: an open gap is recorded (as ``K``) once it reaches ``K`` rounds.
    weights : {"online", "known"}, default "online"
        Estimated weights, or the participation model's ``1 / p_i``.
    """

    name = "fedau"
    Config = FedAUConfig
    description = "FedAU (Wang & Ji 2023): FedAvg weighted by each client's online-estimated 1/p_i, divided by N"
    reads_round_replies = "weights each of the round's participants by its participation gaps"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.participation: FedAUWeights | None = None
        self.index: dict[int, int] = {}  # client -> its row in the participation history
        self._omega: dict[int, float] = {}

    def bound(self) -> None:
        self._track(self.clients())

    def _track(self, clients: Iterable[int]) -> None:
        """Give every client not seen before the next participation index."""
        for client in sorted(set(clients) - set(self.index)):
            self.index[client] = len(self.index)
        if self.participation is None:
            self.participation = FedAUWeights(len(self.index), K=self.cfg.K)
        else:
            self.participation.add_clients(len(self.index) - self.participation.num_clients)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        if self.cfg.weights == "known" and not self.engine:
            raise ValueError("FedAU: weights='known' needs the participation model's probabilities, which only "
                             "fedsim's engine has; use weights='online' in a Flower app")
        messages = super().configure_train(server_round, arrays, config, grid)
        self._track(self.clients())
        return messages

    def observe(self, server_round: int, accepted: list[ClientUpdate]) -> None:
        ids = [u.partition_id for u in accepted]
        if self.cfg.weights == "online":
            self._track(ids)
            omega = self.participation.observe(server_round, [self.index[i] for i in ids])
            self._omega = {i: omega[self.index[i]] for i in ids}
        else:
            p = self.engine.sampler.probabilities()
            self._omega = {i: 1.0 / float(p[i]) for i in ids}

    def aggregate_updates(self, server_round: int, updates: list[ClientUpdate]) -> torch.Tensor:
        stacked = torch.stack([u.update for u in updates])
        omega = torch.tensor([self._omega[u.partition_id] for u in updates], dtype=torch.float64)
        # a node that replied and then left the grid still counts among the N clients
        return fedau_aggregate(stacked, omega, num_clients=max(self.num_clients, len(updates)))

    def weight_bound(self) -> float:
        """The largest ``omega_i`` a client can have, whatever the clients' data and
        participation: ``K`` under ``weights: online`` (a mean of gaps capped at ``K``; 1 at a
        first participation), ``max_i 1 / p_i`` of the participation model over all clients
        under ``known``. Neither depends on who takes part, so one client added or removed
        changes no other client's weight and no noise scale."""
        if self.cfg.weights == "online":
            return float(self.cfg.K)
        p = self.engine.sampler.probabilities()
        return float(1.0 / p[p > 0].min())

    def private_aggregate(self, server_round: int, updates: list[ClientUpdate]) -> torch.Tensor:
        """FedAU under central DP: each update clipped to ``C`` (``privacy.clip_norm``) on the
        server, FedAU's weighted sum, and Gaussian noise calibrated to the largest weight a
        client can have (:meth:`weight_bound`, ``B``; :meth:`ServerPrivacy.noisy_sum`)::

            x <- x + eta_g ((1/N) sum_{i in S} omega_i clip(Delta_i, C) + N(0, (z S_C B / N)^2 I))

        One client moves the sum by at most ``B C / N`` (``S_C = C``, ``2 C`` under
        fixed-size sampling), so that is the noise's std per coordinate over ``z``. The
        weights depend only on participation, never on the clients' data: ``online``
        estimates them from each client's participation gaps, ``known`` reads the
        participation model's ``p_i`` (refused with ``participation.tied_to_labels``, whose
        ``p_i`` come from the clients' labels). So they are public where participation is:
        the accountant takes it as public (no amplification by sampling) under markov,
        cyclic and unequal ``p_i``, and under ``online`` weights whatever the participation
        model (:meth:`participation_revealed`: the amplification theorems need a round's
        participation hidden, and these weights carry the past rounds'); ``known`` weights
        under uniform or one-``p`` Bernoulli sampling are ``N / k`` or ``1 / p``, fixed in
        advance, and keep the amplification."""
        stacked = torch.stack([u.update for u in updates])
        omega = torch.tensor([self._omega[u.partition_id] for u in updates], dtype=torch.float64)
        num_clients = max(self.num_clients, len(updates))
        return self.privacy.noisy_sum(server_round, stacked, omega * (1.0 / num_clients),
                                      self.weight_bound() / num_clients)

    @classmethod
    def participation_revealed(cls, cfg: ExperimentConfig) -> str | None:
        if cfg.strategy.weights == "online":
            return ("strategy.name fedau weighs each client by its own past participation gaps, so its aggregate "
                    "depends on who took part before")
        return None

    @classmethod
    def rules(cls, cfg: ExperimentConfig) -> Iterator[str | None]:
        """Central DP needs weights that depend on participation only."""
        if (cfg.privacy.mechanism == "central" and cfg.strategy.weights == "known"
                and cfg.participation.tied_to_labels):
            yield ("strategy.weights: known weighs each client by 1 / p_i, which participation.tied_to_labels "
                   "derives from its labels; privacy.mechanism central needs weights independent of the clients' "
                   "data (use strategy.weights online)")

    def sum_coefficients(self, server_round: int, updates: list[ClientUpdate]) -> torch.Tensor:
        """``omega_i / N``: FedAU's aggregate is a weighted sum (secure aggregation)."""
        omega = torch.tensor([self._omega[u.partition_id] for u in updates], dtype=torch.float64)
        return omega / max(self.num_clients, len(updates))

    def state_dict(self) -> dict:
        return {**super().state_dict(), "fedau_weights": self.participation.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.participation.load_state_dict(state["fedau_weights"])

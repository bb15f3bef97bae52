"""Secure aggregation inside fedsim's synchronous engine (``secagg.enabled``).

The server of a strategy whose aggregate is a weighted sum of the updates,
``sum_i c_i u_i`` (:meth:`fedsim.strategies.base.FedsimStrategy.sum_coefficients`), gets
that sum from one round of SecAgg+ (:mod:`fedsim.secagg.protocol`) instead of the updates:

1. client ``i`` scales its update by ``w_i = c_i / max_j c_j`` over the clients whose keys
   entered the round (in ``[0, 1]``), so a coordinate within ``[-secagg.value_range,
   secagg.value_range]`` stays there (:func:`quantiser_weights`);
2. quantises it to ``secagg.bits`` bits (:func:`client_input`); a client whose input has a
   coordinate outside the range withholds it (``secagg.out_of_range: withhold``) or sends it
   clipped (``clip``), and both are counted in the round's row and in one warning line;
3. the masked modular sum is unmasked, clients that dropped after sharing their keys (the
   round's failed replies, withheld inputs, ``faults.drop_after_keys``) recovered from their
   neighbours' shares;
4. the server dequantises and multiplies by ``max_j c_j`` times ``c'_i / c_i``, the
   aggregator's weights ``c'`` of the clients that sent their inputs over the weights they
   were quantised with (one number for every weighted sum fedsim has: FedAvg's, FedNova's
   and FedAU's weights of a subset are a common multiple of the full set's;
   :func:`sender_scale`). The same steps run on real clients in a deployment
   (:mod:`fedsim.loops.secagg_messages`, :mod:`fedsim.clients.secagg_steps`), so both give the same aggregate bit for bit.

A strategy that sums more than the update passes longer vectors
(:meth:`fedsim.strategies.base.FedsimStrategy.secure_aggregate`): SCAFFOLD's clients mask
``(dy_i, dc_i)`` together, so its control variate moves by a sum the server never sees
the terms of.

Distributed DP (``privacy.mechanism: central`` with secure aggregation; Kairouz et al. 2021,
"The Distributed Discrete Gaussian Mechanism for Federated Learning with Secure
Aggregation", ICML, here with continuous Gaussian shares before quantisation): the server
cannot clip or add noise to a sum it never sees, so each client clips its update to
``privacy.clip_norm`` and adds its share of the central mechanism's noise,
``N(0, (m sigma)^2 / m)`` with ``m`` the expected clients per round and ``sigma`` the
aggregate's noise std (:meth:`fedsim.privacy.server.ServerPrivacy.noise_std`), before
quantising; the clients weigh the same and the sum is divided by ``m`` (DP-FedAvg), so
when the expected ``m`` clients report, the aggregate carries exactly the calibrated noise
(fewer survivors carry less of it). A noise coordinate outside the range is counted like
any other (``secagg.value_range`` must cover the clipped update and the noise share).

In simulation the protocol's keys derive from the run's seed and the round (HKDF), so a run
is reproducible and a resumed one continues exactly (nothing is kept between rounds). Each
party's step runs in the server's process: the numbers and the bytes are the protocol's,
the message rounds are counted, not sent.

Row columns: ``secagg_bytes_per_client`` (mean bytes a client that sent its input uploaded
over the four message rounds; ``bytes_up`` is the total), ``secagg_bytes_down_per_client``
(what the server relayed to it: keys, shares, dropout lists; added to ``bytes_down``),
``secagg_message_rounds``, ``secagg_recovered`` (dropped clients whose masks were removed),
``secagg_out_of_range`` (coordinates of the clients' inputs outside the range),
``secagg_withheld`` (clients that withheld their input) and ``secagg_clipped`` (coordinates
clipped in the inputs sent).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from fedsim.privacy.noise import gaussian_noise
from fedsim.secagg.protocol import MESSAGE_ROUNDS, run_round
from fedsim.secagg.quantization import dequantize_sum, out_of_range, quantize

if TYPE_CHECKING:
    from fedsim.config import FaultConfig, SecAggConfig
    from fedsim.privacy.server import ServerPrivacy
    from fedsim.strategies.replies import ClientUpdate

log = logging.getLogger(__name__)

Coefficients = Callable[[list["ClientUpdate"]], torch.Tensor]


def round_material(seed: int, server_round: int) -> bytes:
    """The secret material of a simulated round's keys: the run's seed and the round."""
    return hashlib.sha256(f"fedsim-secagg/{seed}/{server_round}".encode()).digest()


def quantiser_weights(c: torch.Tensor) -> tuple[float, list[float]]:
    """``max_j c_j`` and each client's ``w_i = c_i / max_j c_j`` (in ``[0, 1]``)."""
    scale = float(c.max())
    return scale, [(c_i / scale).item() for c_i in c]


@dataclasses.dataclass(frozen=True)
class ClientInput:
    """A client's quantised input (None: withheld) and its coordinates outside the range."""

    levels: np.ndarray | None
    out_of_range: int
    clipped: int


def client_input(update: np.ndarray, weight: float, noise: np.ndarray | None, cfg: SecAggConfig) -> ClientInput:
    """Client ``i``'s step before masking: ``x = w_i u_i`` (plus its noise share), its
    coordinates outside ``[-secagg.value_range, secagg.value_range]`` counted, then withheld
    or clipped (``secagg.out_of_range``) and quantised to ``secagg.bits`` bits."""
    x = weight * update
    if noise is not None:
        x = x + noise
    outside = out_of_range(x, cfg.value_range)
    if outside and cfg.out_of_range == "withhold":
        return ClientInput(None, outside, 0)
    return ClientInput(quantize(x, cfg.value_range, cfg.bits), outside, outside)


def input_costs(server_round: int, inputs: dict[int, ClientInput], cfg: SecAggConfig) -> dict[str, int]:
    """The row's columns of the clients' inputs (bytes and recoveries still 0), and one
    warning line when some coordinate was outside the range."""
    costs = {"secagg_message_rounds": MESSAGE_ROUNDS,
             "secagg_out_of_range": sum(i.out_of_range for i in inputs.values()),
             "secagg_clipped": sum(i.clipped for i in inputs.values()),
             "secagg_withheld": sum(i.levels is None for i in inputs.values()), "secagg_recovered": 0,
             "secagg_bytes_per_client": 0, "secagg_bytes_down_per_client": 0}
    if costs["secagg_out_of_range"]:
        log.warning("round %d: secure aggregation: %d coordinates of %d clients outside secagg.value_range "
                    "[-%g, %g]: %d clients withheld their inputs, %d coordinates clipped", server_round,
                    costs["secagg_out_of_range"], sum(1 for i in inputs.values() if i.out_of_range), cfg.value_range,
                    cfg.value_range, costs["secagg_withheld"], costs["secagg_clipped"])
    return costs


def sender_scale(server_round: int, updates: list[ClientUpdate], c: torch.Tensor, senders: set[int],
                 coefficients: Coefficients) -> float | None:
    """What the dequantised sum of the ``senders``' inputs is multiplied by: ``max_j c_j``
    (``c``: the weights of ``updates``, the clients quantised with) times ``c'_i / c_i``, the
    aggregator's weights of the senders alone over theirs; None (and one line) when that
    ratio is not one number."""
    rows = [i for i, u in enumerate(updates) if u.partition_id in senders]
    ratio = coefficients([updates[i] for i in rows]) / c[rows]
    if not torch.allclose(ratio, ratio[:1].expand_as(ratio), rtol=1e-9, atol=0.0):
        log.warning("round %d refused: secure aggregation: the aggregator's weights of the clients that sent their "
                    "inputs are no common multiple of the weights they quantised with", server_round)
        return None
    return float(c.max()) * ratio[0].item()


def distributed_dp(privacy: ServerPrivacy) -> tuple[float, float, Coefficients]:
    """Distributed DP (see the module docstring): the clip norm, each client's noise std
    ``(m sigma) / sqrt(m)`` and the weights ``1 / m`` of DP-FedAvg's sum."""
    m = privacy.sampling.expected_clients

    def coefficients(sending: list[ClientUpdate]) -> torch.Tensor:
        return torch.full((len(sending),), 1.0 / m, dtype=torch.float64)

    return privacy.clip_norm, privacy.noise_std() * m / math.sqrt(m), coefficients


class SecureAggregation:
    """The engine's secure sum of a round's updates (see the module docstring).

    Parameters
    ----------
    cfg : SecAggConfig
        ``secagg:`` of the experiment.
    seed : int
        The run's seed.
    faults : FaultConfig or None, default None
        ``faults:`` of the experiment (``drop_after_keys``); None: no faults.
    """

    on_clients = False
    """Whether the clients run their own steps (a deployment) or the server runs every party's."""

    def __init__(self, cfg: SecAggConfig, seed: int, faults: FaultConfig | None = None) -> None:
        self.cfg, self.seed, self.faults = cfg, seed, faults
        self.withheld: list[int] = []
        """The clients whose inputs the last :meth:`aggregate` left out of the sum (withheld
        under ``secagg.out_of_range: withhold``, or dropped after sharing their keys)."""

    def aggregate(self, server_round: int, updates: list[ClientUpdate], dropped: list[int],
                  coefficients: Coefficients, privacy: ServerPrivacy | None = None
                  ) -> tuple[torch.Tensor | None, dict[str, int], int, int]:
        """``sum_i c_i u_i`` over the clients that send their input (None when the protocol
        cannot unmask), the row's columns, and the protocol's bytes up and down; with the
        central ``privacy`` mechanism, DP-FedAvg's noisy mean of clipped updates instead
        (distributed DP, see the module docstring)."""
        cfg = self.cfg
        noise_std = 0.0
        if privacy is not None:
            from fedsim.privacy.mechanisms import clip_rows  # with dp-accounting: not on a client's import path

            clip_norm, noise_std, coefficients = distributed_dp(privacy)
            clipped, _ = clip_rows(torch.stack([u.update for u in updates]).double(), clip_norm)
            updates = [dataclasses.replace(u, update=row.to(u.update.dtype)) for u, row in zip(updates, clipped, strict=True)]
        c = coefficients(updates)
        _, weights = quantiser_weights(c)
        late = [u.partition_id for u in updates
                if self.faults is not None and self.faults.dropped_after_keys(u.partition_id, server_round)]
        inputs = {}
        for u, w in zip(updates, weights, strict=True):
            if u.partition_id not in late:
                noise = (gaussian_noise(u.update.shape[0], noise_std, "privacy", self.seed, "secagg", server_round,
                                        u.partition_id).numpy() if noise_std else None)
                inputs[u.partition_id] = client_input(u.update.double().numpy(), w, noise, cfg)
        costs = input_costs(server_round, inputs, cfg)
        levels = {pid: i.levels for pid, i in inputs.items() if i.levels is not None}
        self.withheld = sorted([*late, *(pid for pid, i in inputs.items() if i.levels is None)])
        if not levels:
            log.warning("round %d skipped: secure aggregation: no client sent its input", server_round)
            return None, costs, 0, 0
        withheld = [pid for pid, i in inputs.items() if i.levels is None]
        outcome = run_round(levels, [*dropped, *withheld, *late], degree=cfg.degree, threshold=cfg.threshold,
                            material=round_material(self.seed, server_round))
        costs["secagg_recovered"] = len(outcome.recovered)
        costs["secagg_bytes_per_client"] = round(float(np.mean([outcome.bytes_up[pid] for pid in levels])))
        costs["secagg_bytes_down_per_client"] = round(float(np.mean([outcome.bytes_down[pid] for pid in levels])))
        up, down = sum(outcome.bytes_up.values()), sum(outcome.bytes_down.values())
        if outcome.refused:
            log.warning("round %d refused: secure aggregation cannot unmask: %s (secagg.threshold %g)",
                        server_round, outcome.refused, cfg.threshold)
            return None, costs, up, down
        scale = sender_scale(server_round, updates, c, set(levels), coefficients)
        if scale is None:
            return None, costs, up, down
        total = dequantize_sum(outcome.total, len(levels), cfg.value_range, cfg.bits) * scale
        return torch.from_numpy(total).to(updates[0].update.dtype), costs, up, down

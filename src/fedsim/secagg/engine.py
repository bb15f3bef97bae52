"""Secure aggregation inside fedsim's synchronous engine (``secagg.enabled``).

The server of a strategy whose aggregate is a weighted sum of the updates,
``sum_i c_i u_i`` (:meth:`fedsim.strategies.base.FedsimStrategy.sum_coefficients`), gets
that sum from one round of SecAgg+ (:mod:`fedsim.secagg.protocol`) instead of the updates:

1. client ``i`` scales its update by ``w_i = c_i / max_j c_j`` (in ``[0, 1]``; a deployment
   uses a public bound on the weights, e.g. the largest example count), so a coordinate
   within ``[-secagg.value_range, secagg.value_range]`` stays there;
2. quantises it to ``secagg.bits`` bits (:mod:`fedsim.secagg.quantization`); a client whose
   input has a coordinate outside the range withholds it (``secagg.out_of_range: withhold``;
   the others' weights are then taken again without it) or sends it clipped (``clip``), and
   both are counted in the round's row and in one warning line;
3. the masked modular sum is unmasked, clients that dropped after sharing their keys (the
   round's failed replies, and withheld inputs) recovered from their neighbours' shares;
4. the server dequantises and multiplies by ``max_j c_j``.

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

The protocol's keys derive from the run's seed and the round (HKDF), so a run is
reproducible and a resumed one continues exactly (nothing is kept between rounds). Each
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

from fedsim.privacy.mechanisms import clip_rows
from fedsim.privacy.noise import gaussian_noise
from fedsim.secagg.protocol import MESSAGE_ROUNDS, run_round
from fedsim.secagg.quantization import dequantize_sum, out_of_range, quantize

if TYPE_CHECKING:
    from fedsim.config import SecAggConfig
    from fedsim.privacy.server import ServerPrivacy
    from fedsim.strategies.replies import ClientUpdate

log = logging.getLogger(__name__)


def round_material(seed: int, server_round: int) -> bytes:
    """The secret material of a simulated round's keys: the run's seed and the round."""
    return hashlib.sha256(f"fedsim-secagg/{seed}/{server_round}".encode()).digest()


class SecureAggregation:
    """The engine's secure sum of a round's updates (see the module docstring).

    Parameters
    ----------
    cfg : SecAggConfig
        ``secagg:`` of the experiment.
    seed : int
        The run's seed.
    """

    def __init__(self, cfg: SecAggConfig, seed: int) -> None:
        self.cfg, self.seed = cfg, seed
        self.withheld: list[int] = []
        """The clients whose inputs the last :meth:`aggregate` left out of the sum
        (``secagg.out_of_range: withhold``)."""

    def aggregate(self, server_round: int, updates: list[ClientUpdate], dropped: list[int],
                  coefficients: Callable[[list[ClientUpdate]], torch.Tensor], privacy: ServerPrivacy | None = None
                  ) -> tuple[torch.Tensor | None, dict[str, int], int, int]:
        """``sum_i c_i u_i`` over the clients that send their input (None when the protocol
        cannot unmask), the row's columns, and the protocol's bytes up and down; with the
        central ``privacy`` mechanism, DP-FedAvg's noisy mean of clipped updates instead
        (distributed DP, see the module docstring)."""
        cfg = self.cfg
        noise_std = 0.0
        if privacy is not None:
            m = privacy.sampling.expected_clients
            clipped, _ = clip_rows(torch.stack([u.update for u in updates]).double(), privacy.clip_norm)
            updates = [dataclasses.replace(u, update=row.to(u.update.dtype)) for u, row in zip(updates, clipped, strict=True)]
            noise_std = privacy.noise_std() * m / math.sqrt(m)

            def coefficients(sending: list[ClientUpdate]) -> torch.Tensor:
                return torch.full((len(sending),), 1.0 / m, dtype=torch.float64)

        def quantiser_inputs(sending: list[ClientUpdate]) -> tuple[float, dict[int, np.ndarray]]:
            c = coefficients(sending)
            scale = float(c.max())
            inputs = {}
            for u, c_i in zip(sending, c, strict=True):
                x = (c_i / scale).item() * u.update.double().numpy()
                if noise_std:
                    x = x + gaussian_noise(x.shape[0], noise_std, "privacy", self.seed, "secagg", server_round,
                                           u.partition_id).numpy()
                inputs[u.partition_id] = x
            return scale, inputs

        scale, inputs = quantiser_inputs(updates)
        outside = {pid: out_of_range(x, cfg.value_range) for pid, x in inputs.items()}
        withheld = sorted(pid for pid, count in outside.items() if count and cfg.out_of_range == "withhold")
        self.withheld = withheld
        if withheld:
            scale, inputs = quantiser_inputs([u for u in updates if u.partition_id not in withheld])
        clipped = sum(out_of_range(x, cfg.value_range) for x in inputs.values())
        costs = {"secagg_message_rounds": MESSAGE_ROUNDS, "secagg_out_of_range": sum(outside.values()),
                 "secagg_clipped": clipped, "secagg_withheld": len(withheld), "secagg_recovered": 0,
                 "secagg_bytes_per_client": 0, "secagg_bytes_down_per_client": 0}
        if costs["secagg_out_of_range"]:
            log.warning("round %d: secure aggregation: %d coordinates of %d clients outside secagg.value_range "
                        "[-%g, %g]: %d clients withheld their inputs, %d coordinates clipped", server_round,
                        costs["secagg_out_of_range"], sum(1 for count in outside.values() if count), cfg.value_range,
                        cfg.value_range, len(withheld), clipped)
        if not inputs:
            log.warning("round %d skipped: secure aggregation: every client withheld its input", server_round)
            return None, costs, 0, 0
        levels = {pid: quantize(x, cfg.value_range, cfg.bits) for pid, x in inputs.items()}
        outcome = run_round(levels, [*dropped, *withheld], degree=cfg.degree, threshold=cfg.threshold,
                            material=round_material(self.seed, server_round))
        costs["secagg_recovered"] = len(outcome.recovered)
        costs["secagg_bytes_per_client"] = round(float(np.mean([outcome.bytes_up[pid] for pid in levels])))
        costs["secagg_bytes_down_per_client"] = round(float(np.mean([outcome.bytes_down[pid] for pid in levels])))
        up, down = sum(outcome.bytes_up.values()), sum(outcome.bytes_down.values())
        if outcome.refused:
            log.warning("round %d refused: secure aggregation cannot unmask: %s (secagg.threshold %g)",
                        server_round, outcome.refused, cfg.threshold)
            return None, costs, up, down
        total = dequantize_sum(outcome.total, len(levels), cfg.value_range, cfg.bits) * scale
        return torch.from_numpy(total).to(updates[0].update.dtype), costs, up, down

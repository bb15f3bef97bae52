"""Secure aggregation inside fedsim's synchronous engine (``secagg.enabled``).

The server of a strategy whose aggregate is a weighted sum of the updates,
``sum_i c_i u_i`` (:meth:`fedsim.strategies.base.FedsimStrategy.sum_coefficients`), gets
that sum from one round of SecAgg+ (:mod:`fedsim.secagg.protocol`) instead of the updates:

1. client ``i`` scales its update by ``w_i = c_i / max_j c_j`` (in ``[0, 1]``; a deployment
   uses a public bound on the weights, e.g. the largest example count), so a coordinate
   within ``[-secagg.value_range, secagg.value_range]`` stays there;
2. quantises it to ``secagg.bits`` bits (:mod:`fedsim.secagg.quantization`); a coordinate
   outside the range is clipped or the client withholds its input (``secagg.out_of_range``),
   and either is counted in the round's row and in one warning line;
3. the masked modular sum is unmasked, clients that dropped after sharing their keys (the
   round's failed replies, and withheld inputs) recovered from their neighbours' shares;
4. the server dequantises and multiplies by ``max_j c_j``.

The protocol's keys derive from the run's seed and the round (HKDF), so a run is
reproducible and a resumed one continues exactly (nothing is kept between rounds). Each
party's step runs in the server's process: the numbers and the bytes are the protocol's,
the message rounds are counted, not sent.

Row columns: ``secagg_bytes_per_client`` (mean bytes a client that sent its input uploaded
over the four message rounds; ``bytes_up`` is the total), ``secagg_bytes_down_per_client``
(what the server relayed to it: keys, shares, dropout lists; added to ``bytes_down``),
``secagg_message_rounds``,
``secagg_recovered`` (dropped clients whose masks were removed), ``secagg_out_of_range``
(coordinates outside the range) and ``secagg_withheld`` (clients that withheld their input).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from fedsim.secagg.protocol import MESSAGE_ROUNDS, run_round
from fedsim.secagg.quantization import dequantize_sum, out_of_range, quantize

if TYPE_CHECKING:
    from fedsim.config import SecAggConfig
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

    def aggregate(self, server_round: int, updates: list[ClientUpdate], dropped: list[int],
                  coefficients: Callable[[list[ClientUpdate]], torch.Tensor]
                  ) -> tuple[torch.Tensor | None, dict[str, int], int, int]:
        """``sum_i c_i u_i`` over the clients that send their input (None when the protocol
        cannot unmask), the row's columns, and the protocol's bytes up and down."""
        cfg = self.cfg
        outside = {u.partition_id: out_of_range(u.update.numpy(), cfg.value_range) for u in updates}
        withheld = sorted(pid for pid, count in outside.items() if count and cfg.out_of_range == "withhold")
        sending = [u for u in updates if u.partition_id not in withheld]
        costs = {"secagg_message_rounds": MESSAGE_ROUNDS, "secagg_out_of_range": sum(outside.values()),
                 "secagg_withheld": len(withheld), "secagg_recovered": 0, "secagg_bytes_per_client": 0,
                 "secagg_bytes_down_per_client": 0}
        if costs["secagg_out_of_range"]:
            action = "withheld their inputs" if withheld else "clipped"
            log.warning("round %d: secure aggregation: %d coordinates of %d clients outside secagg.value_range "
                        "[-%g, %g], %s", server_round, costs["secagg_out_of_range"],
                        sum(1 for count in outside.values() if count), cfg.value_range, cfg.value_range, action)
        if not sending:
            log.warning("round %d skipped: secure aggregation: every client withheld its input", server_round)
            return None, costs, 0, 0
        c = coefficients(sending)
        scale = float(c.max())
        inputs = {u.partition_id: quantize((c_i / scale).item() * np.clip(u.update.double().numpy(), -cfg.value_range,
                                                                             cfg.value_range), cfg.value_range, cfg.bits)
                  for u, c_i in zip(sending, c, strict=True)}
        outcome = run_round(inputs, [*dropped, *withheld], degree=cfg.degree, threshold=cfg.threshold,
                            material=round_material(self.seed, server_round))
        costs["secagg_recovered"] = len(outcome.recovered)
        costs["secagg_bytes_per_client"] = round(float(np.mean([outcome.bytes_up[pid] for pid in inputs])))
        costs["secagg_bytes_down_per_client"] = round(float(np.mean([outcome.bytes_down[pid] for pid in inputs])))
        up, down = sum(outcome.bytes_up.values()), sum(outcome.bytes_down.values())
        if outcome.refused:
            log.warning("round %d refused: secure aggregation cannot unmask: %s (secagg.threshold %g)",
                        server_round, outcome.refused, cfg.threshold)
            return None, costs, up, down
        total = dequantize_sum(outcome.total, len(inputs), cfg.value_range, cfg.bits) * scale
        return torch.from_numpy(total).to(sending[0].update.dtype), costs, up, down

"""Client-level central DP for a buffered asynchronous server (FedBuff), per buffer, and
its accountant, which claims no amplification.

The mechanism is DP-FedAvg's (McMahan et al., "Learning Differentially Private Recurrent
Language Models", arXiv 1710.06963) applied to each buffer of FedBuff (Nguyen et al.,
"Federated Learning with Buffered Asynchronous Aggregation", AISTATS 2022,
arXiv 2106.06639): each arriving update is clipped to ``C = privacy.clip_norm``, and a full
buffer of ``K`` updates is applied as

    x <- x + eta_g * ( (1/K) sum_k s_k clip(Delta_k, C) + N(0, (z C / K)^2 I) )

with FedBuff's staleness weights ``s_k = 1 / sqrt(1 + staleness_k) <= 1`` and the fixed
denominator ``K``. A client with ``r`` of the buffer's ``K`` updates moves the weighted mean
by at most ``r C / K`` (every ``s_k <= 1``), so for it the buffer is a Gaussian mechanism of
noise multiplier ``z / r``; ``eta_g`` is post-processing.

Neighbours are zero-out ones (a client's updates replaced by zeros; Kairouz et al.,
"Practical and Private (Deep) Learning without Sampling or Shuffling", arXiv 2103.00039):
arrival times come from the simulated devices, not from the data, so the buffers'
membership is the same in both worlds. Asynchronous arrival is not Poisson sampling, so no
amplification is claimed: a client's ledger is every buffer it took part in, one unsampled
Gaussian of multiplier ``z / r`` each, composed by ``privacy.accountant``; the reported
epsilon is the worst-off client's. On the wall clock (deployment) the arrival times are the
real clients'; the accounting then assumes they do not depend on the data it protects.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from fedsim.privacy.accounting import GaussianRelease, epsilon
from fedsim.privacy.mechanisms import aggregate_noise_std, clip_rows
from fedsim.privacy.noise import gaussian_noise

if TYPE_CHECKING:
    from fedsim.config import ExperimentConfig

log = logging.getLogger(__name__)

__all__ = ["BufferPrivacy", "buffer_ledger"]

NO_AMPLIFICATION = ("privacy: no amplification: asynchronous arrival is not Poisson sampling, so each buffer is "
                    "accounted as an unsampled Gaussian release to every client in it")


def buffer_ledger(noise_multiplier: float, appearances: Mapping[int, int]) -> dict[GaussianRelease, int]:
    """A client's ledger: ``appearances[r]`` buffers held ``r`` of its updates, each a
    Gaussian release of multiplier ``noise_multiplier / r`` without sampling."""
    return {GaussianRelease(noise_multiplier / r): count for r, count in appearances.items() if count}


class BufferPrivacy:
    """The central mechanism of a buffered run and its per-client ledgers (see the module
    docstring). Kept by the server rule, so a checkpoint of the rule holds the ledgers.

    Parameters
    ----------
    cfg : ExperimentConfig
        ``cfg.privacy.mechanism`` is central, with ``noise_multiplier``; ``cfg.strategy``
        has ``buffer_size`` (K).
    """

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.settings = cfg.privacy
        self.seed = cfg.seed
        self.buffer_size = cfg.strategy.buffer_size
        self.noise_multiplier = float(self.settings.noise_multiplier)
        self.clip_norm = self.settings.clip_norm
        self.appearances: dict[int, dict[int, int]] = {}  # client -> {updates in a buffer: buffers}
        self.stopped: str | None = None
        log.warning(NO_AMPLIFICATION)
        log.info("privacy: central per buffer of %d, noise multiplier %.4g, clip norm %g, delta %g; epsilon covers "
                 "the model, not the clients' metrics in the rows (train_loss, federated evaluation)", self.buffer_size,
                 self.noise_multiplier, self.clip_norm, self.settings.delta)

    # ------------------------------------------------------------- the mechanism
    def clip(self, update: torch.Tensor) -> torch.Tensor:
        """``update`` scaled to L2 norm at most ``clip_norm`` (in its own dtype)."""
        return clip_rows(update[None], self.clip_norm)[0][0]

    def noise_std(self) -> float:
        """Std per coordinate of the noise on a buffer's mean, ``z C / K``."""
        return aggregate_noise_std(self.clip_norm, self.noise_multiplier, self.buffer_size)

    def release(self, clients: Sequence[int], version: int, dim: int) -> torch.Tensor:
        """The noise of the buffer that becomes model ``version``, holding the updates of
        ``clients`` (a client once per update); their ledgers are charged."""
        for client, r in Counter(clients).items():
            ledger = self.appearances.setdefault(client, {})
            ledger[r] = ledger.get(r, 0) + 1
        return gaussian_noise(dim, self.noise_std(), "privacy", self.seed, "buffer", version)

    # ---------------------------------------------------------------- accounting
    def _epsilon(self, appearances: Mapping[int, Mapping[int, int]]) -> float:
        """The worst-off client's epsilon: the one whose releases sum the most ``r^2``
        (Gaussians compose to one of multiplier ``z / sqrt(sum r^2)``)."""
        worst = max(appearances.values(), key=lambda a: (sum(r * r * n for r, n in a.items()), sorted(a.items())),
                    default={})
        return epsilon(buffer_ledger(self.noise_multiplier, worst), self.settings.delta, self.settings.accountant)

    def epsilon(self) -> float:
        """Epsilon spent so far (the worst-off client's; an upper bound)."""
        return self._epsilon(self.appearances)

    def affordable(self, clients: Sequence[int]) -> bool:
        """Whether the buffer of ``clients`` may be released under ``privacy.max_epsilon``;
        once one may not, none may (the run then stops at its next step)."""
        budget = self.settings.max_epsilon
        if self.stopped is not None:
            return False
        if budget is None:
            return True
        after = {client: dict(self.appearances.get(client, {})) for client in set(clients)}
        for client, r in Counter(clients).items():
            after[client][r] = after[client].get(r, 0) + 1
        spent = self._epsilon({**self.appearances, **after})
        if spent <= budget:
            return True
        self.stopped = (f"privacy.max_epsilon {budget:g}: the next buffer would spend epsilon {spent:.4g}; "
                        f"stopped with {self.epsilon():.4g} spent")
        return False

    # ------------------------------------------------------------------ outputs
    def row(self) -> dict[str, Any]:
        return {"epsilon": self.epsilon()}

    def summary(self) -> dict[str, Any]:
        return {"epsilon": self.epsilon(), "delta": self.settings.delta, "noise_multiplier": self.noise_multiplier}

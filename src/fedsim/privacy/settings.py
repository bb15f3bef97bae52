"""The ``privacy:`` section of an experiment: which differential-privacy mechanism a run uses.

Kept free of torch and of the accounting libraries, so a config validates without them.

- ``none`` (the default): no privacy; every other key must stay at its default.
- ``central``: client-level DP (McMahan et al., "Learning Differentially Private Recurrent
  Language Models", arXiv 1710.06963): each accepted update is clipped to ``clip_norm`` on
  the server, and Gaussian noise is added to their sum (:mod:`fedsim.privacy.mechanisms`);
  under FedBuff, to each buffer's mean, accounted without amplification
  (:mod:`fedsim.privacy.buffered`).
- ``local``: client-level local DP: each client clips its update and adds the noise itself;
  the noise is calibrated with the analytic Gaussian mechanism (Balle & Wang, "Improving the
  Gaussian Mechanism for Differential Privacy", arXiv 1805.06530), and each client's releases
  compose over the rounds it took part in.
- ``sample``: record-level DP-SGD in the clients (Abadi et al., "Deep Learning with
  Differential Privacy", arXiv 1607.00133): per-sample gradients clipped to ``clip_norm``
  and noised at every local step.

``clipping: adaptive`` (central only) tracks the ``target_quantile`` of the clients' update
norms (Andrew et al., "Differentially Private Learning with Adaptive Clipping",
arXiv 1905.03871); its noisy count is part of the accounted mechanism.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from fedsim.sections import Section

if TYPE_CHECKING:
    from fedsim.config import ExperimentConfig

__all__ = ["PrivacyConfig", "delta_warning"]


class PrivacyConfig(Section):
    """Differential privacy of a run; see the module docstring.

    Parameters
    ----------
    mechanism : {"none", "central", "local", "sample"}, default "none"
    clip_norm : float, default 1.0
        L2 bound of a client's update (central, local) or of a per-sample gradient (sample);
        adaptive clipping's starting value.
    clipping : {"fixed", "adaptive"}, default "fixed"
    noise_multiplier : float or None
        Noise std over the sensitivity; give this or ``target_epsilon``.
    target_epsilon : float or None
        Calibrate ``noise_multiplier`` before round 1 so the whole run spends this epsilon.
    delta : float, default 1e-5
    max_epsilon : float or None
        Stop the run cleanly before a round would spend more than this.
    accountant : {"pld", "rdp", "prv"}, default "pld"
    target_quantile : float, default 0.5
        Adaptive clipping: the quantile of update norms the clip norm tracks (gamma).
    clip_learning_rate : float, default 0.2
        Adaptive clipping: geometric step eta_C of ``C <- C exp(-eta_C (b - gamma))``.
    count_noise_multiplier : float or None
        Adaptive clipping: std of the noise on the count of unclipped clients, sigma_b; it
        must exceed half the noise multiplier. Unset: the paper's expected clients per round
        / 20, or the noise multiplier where that is larger (the count then takes at most a
        quarter of the budget, in inverse variance).
    """

    mechanism: Literal["none", "central", "local", "sample"] = "none"
    clip_norm: float = Field(1.0, gt=0)
    clipping: Literal["fixed", "adaptive"] = "fixed"
    noise_multiplier: float | None = Field(None, gt=0)
    target_epsilon: float | None = Field(None, gt=0)
    delta: float = Field(1e-5, gt=0, lt=1)
    max_epsilon: float | None = Field(None, gt=0)
    accountant: Literal["pld", "rdp", "prv"] = "pld"
    target_quantile: float = Field(0.5, gt=0, lt=1)
    clip_learning_rate: float = Field(0.2, gt=0)
    count_noise_multiplier: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _consistent(self) -> PrivacyConfig:
        if self.mechanism == "none":
            unread = [name for name, field in type(self).model_fields.items()
                      if name != "mechanism" and getattr(self, name) != field.default]
            if unread:
                raise ValueError(f"{unread[0]} is not read with mechanism none; set mechanism (central, local or "
                                 "sample) or leave it unset")
            return self
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError(f"noise_multiplier, target_epsilon: give exactly one with mechanism {self.mechanism} "
                             "(the noise, or the epsilon it is calibrated to)")
        if (self.target_epsilon is not None and self.max_epsilon is not None
                and self.target_epsilon > self.max_epsilon):
            raise ValueError(f"target_epsilon {self.target_epsilon:g} is above max_epsilon {self.max_epsilon:g}; "
                             "the run would stop before spending it")
        if self.clipping == "fixed":
            adaptive = [name for name in ("target_quantile", "clip_learning_rate", "count_noise_multiplier")
                        if getattr(self, name) != type(self).model_fields[name].default]
            if adaptive:
                raise ValueError(f"{adaptive[0]} is read by adaptive clipping only; clipping is fixed")
        elif self.count_noise_multiplier is not None and self.target_epsilon is not None:
            raise ValueError("count_noise_multiplier with target_epsilon: the calibrated noise multiplier is not known "
                             "before the run, so neither is the count noise it needs; leave count_noise_multiplier unset")
        elif (self.count_noise_multiplier is not None and self.noise_multiplier is not None
              and 2 * self.count_noise_multiplier <= self.noise_multiplier):
            raise ValueError(f"count_noise_multiplier {self.count_noise_multiplier:g} must exceed half of "
                             f"noise_multiplier {self.noise_multiplier:g}, or the count takes the whole budget")
        if self.clipping == "adaptive" and self.mechanism != "central":
            raise ValueError(f"clipping adaptive tracks a noisy count the server aggregates; mechanism "
                             f"{self.mechanism} has none (use central, or clipping fixed)")
        return self


def delta_warning(cfg: ExperimentConfig, client_examples: Sequence[int]) -> str | None:
    """One line when ``privacy.delta`` is not below 1 / the units protected (clients; training
    records under DP-SGD): a mechanism publishing one unit's data outright meets such a delta."""
    privacy = cfg.privacy
    if privacy.mechanism == "none":
        return None
    units, unit = ((sum(client_examples), "training records") if privacy.mechanism == "sample"
                   else (cfg.partition.num_clients, "clients"))
    if privacy.delta < 1 / units:
        return None
    return (f"privacy.delta: {privacy.delta:g} is not below 1 / {units} {unit}; a mechanism that publishes one "
            "of them outright meets it")

"""FedLEx server side: the guidance matrix built from an exploration phase.

Reference
---------
FedLEx (federated learning with an exploration phase that builds a guidance matrix), as
specified in fedsim's ALGORITHMS.md ("seed 002"); title and arXiv id not verified here.
The client half is :func:`fedsim.clients.fedlex.apply_guidance`.

Definition implemented
----------------------
Phase 1: scout clients train from the base model ``w``. For every parameter tensor ``p``,
with scouts ``w^(1)..w^(S)``::

    drift_p = (1/S) sum_s (w^(s)_p - w_p)^2                      (elementwise)
    M_p     = (drift_p - min drift_p) / (max drift_p - min drift_p)

so each tensor's guidance lies in ``[0, 1]`` with minimum 0 and maximum 1. A tensor whose
drift is the same everywhere (e.g. the scouts never moved it) carries no information on
which coordinates matter; its guidance is all ones, so it trains as in plain FedAvg instead
of being frozen. Phase 2: every client multiplies its gradients by ``M`` elementwise before
the optimizer step. The authors' public code builds a mask that is all ones (the guidance
never applies); this implementation follows the paper.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from flwr.app import ArrayRecord

from fedsim.seeding import derive_seed
from fedsim.strategies.base import FedsimStrategy
from fedsim.strategies.replies import ClientUpdate

__all__ = ["guidance_matrix"]


def guidance_matrix(
    base: Mapping[str, torch.Tensor], scouts: Sequence[Mapping[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """Per-tensor min-max normalised mean squared drift of the scouts from the base model.

    Parameters
    ----------
    base : mapping of str to torch.Tensor
        The base model's state (e.g. ``model.state_dict()``) the scouts started from.
    scouts : sequence of mapping of str to torch.Tensor
        The scouts' states after exploration, each with every floating-point key of ``base``.

    Returns
    -------
    dict of str to torch.Tensor
        One guidance tensor in ``[0, 1]`` per floating-point entry of ``base`` (integer
        buffers such as BatchNorm's ``num_batches_tracked`` are skipped), same shape, dtype
        and device as the base tensor.
    """
    if len(scouts) == 0:
        raise ValueError("guidance_matrix: at least one scout state is required")
    guidance = {}
    for name, start in base.items():
        if not start.is_floating_point():
            continue
        drift = torch.zeros_like(start)
        for index, scout in enumerate(scouts):
            if name not in scout:
                raise ValueError(f"guidance_matrix: scout {index} has no entry {name!r}")
            moved = scout[name].to(device=start.device, dtype=start.dtype)
            if moved.shape != start.shape:
                raise ValueError(f"guidance_matrix: scout {index} entry {name!r} has shape "
                                 f"{tuple(moved.shape)}, base has {tuple(start.shape)}")
            drift += (moved - start).square()
        drift /= len(scouts)
        low, high = drift.min(), drift.max()
        if bool(high > low):
            guidance[name] = (drift - low) / (high - low)
        else:
            guidance[name] = torch.ones_like(start)
    return guidance


class FedLEx(FedsimStrategy):
    """Flower adapter of FedLEx's two phases.

    Exploration (rounds ``1..explore_rounds``): only the ``scouts`` (a fixed, seeded set of
    clients) train, aggregated by FedAvg. At the end of the last exploration round the
    guidance matrix is computed from that round's scout models against the round's base
    model (:func:`guidance_matrix`). Afterwards every training message carries the
    guidance, and each client multiplies its gradients by it before the optimizer step
    (:func:`fedsim.clients.fedlex.apply_guidance`); the server applies FedAvg with the
    configured server optimizer (momentum 0.9 by default, as in the paper).
    """

    def __init__(self, exp, spec, node_of, sampler) -> None:
        super().__init__(exp, spec, node_of, sampler)
        rng = torch.Generator().manual_seed(derive_seed(exp.seed, "fedlex-scouts"))
        count = min(self.cfg.scouts, self.num_clients)
        self.scouts = sorted(torch.randperm(self.num_clients, generator=rng)[:count].tolist())
        self.guidance: dict[str, torch.Tensor] | None = None

    def participants(self, server_round: int) -> list[int]:
        if server_round <= self.cfg.explore_rounds:
            return self.scouts
        return super().participants(server_round)

    def extra_content(self, server_round: int) -> dict[str, ArrayRecord]:
        if self.guidance is None:
            return {}
        return {"guidance": ArrayRecord({k: v.contiguous() for k, v in self.guidance.items()})}

    def observe(self, server_round: int, accepted: list[ClientUpdate]) -> None:
        if server_round != self.cfg.explore_rounds or not accepted:
            return
        base = self.spec.unflatten(self._global)
        scouts = [self.spec.unflatten(self._global + u.update) for u in accepted]
        self.guidance = guidance_matrix(base, scouts)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "guidance": self.guidance}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.guidance = state.get("guidance")

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

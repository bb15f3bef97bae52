"""FedLEx: an exploration phase builds a guidance matrix that masks every client's gradients.

Reference
---------
FedLEx (federated learning with an exploration phase that builds a guidance matrix), as
specified in fedsim's ALGORITHMS.md ("seed 002"); title and arXiv id not verified here.
The client half is :func:`apply_guidance` (between ``loss.backward()`` and
``optimizer.step()``: ``grad_p <- M_p * grad_p``).

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

import logging
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Literal

import torch
from flwr.app import ArrayRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import sample_nodes
from pydantic import Field

from fedsim.algorithms.api import ServerOptConfig, SyncStrategyBase
from fedsim.clients.features import ClientContext, ClientFeature
from fedsim.clients.hooks import ClientHook
from fedsim.records import to_state_dict
from fedsim.seeding import derive_seed
from fedsim.strategies.base import FedsimStrategy
from fedsim.strategies.replies import ClientUpdate

__all__ = ["GUIDANCE_KEY", "FedLEx", "FedLExConfig", "GuidanceMask", "apply_guidance", "guidance_matrix"]

GUIDANCE_KEY = "guidance"
"""The ArrayRecord of a training message that carries the guidance matrix."""


class FedLExConfig(SyncStrategyBase):
    """FedLEx: scouts explore for ``explore_rounds`` rounds; their drift gives a guidance
    matrix that masks every client's gradients afterwards; server momentum 0.9."""

    name: Literal["fedlex"] = "fedlex"
    explore_rounds: int = Field(2, ge=1)
    scouts: int = Field(5, ge=1)
    server_opt: ServerOptConfig = ServerOptConfig(name="momentum", lr=1.0, momentum=0.9)


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


# ------------------------------------------------------------------ client half
def apply_guidance(
    parameters: torch.nn.Module | Iterable[tuple[str, torch.nn.Parameter]],
    guidance: Mapping[str, torch.Tensor],
) -> None:
    """Multiply every parameter's ``.grad`` in place by its guidance tensor.

    Parameters
    ----------
    parameters : torch.nn.Module or iterable of (str, torch.nn.Parameter)
        A model (its ``named_parameters()`` are used) or ``(name, parameter)`` pairs.
    guidance : mapping of str to torch.Tensor
        Guidance per parameter name, each the parameter's shape (extra entries, e.g. for
        buffers, are ignored).

    Raises
    ------
    ValueError
        If a parameter with a gradient has no guidance entry or one of another shape.
    """
    named = parameters.named_parameters() if isinstance(parameters, torch.nn.Module) else parameters
    for name, param in named:
        if param.grad is None:
            continue
        if name not in guidance:
            raise ValueError(f"apply_guidance: no guidance for parameter {name!r}")
        scale = guidance[name]
        if scale.shape != param.grad.shape:
            raise ValueError(f"apply_guidance: guidance for {name!r} has shape {tuple(scale.shape)}, "
                             f"gradient has {tuple(param.grad.shape)}")
        param.grad.mul_(scale.to(device=param.grad.device, dtype=param.grad.dtype))


class GuidanceMask(ClientHook):
    """FedLEx's client side as a hook: gradients times the guidance matrix before each step.

    The guidance covers the global model's parameters; the parameters a training wrapper
    adds to the client's model (QAT's learned step sizes) are the client's own and train
    unmasked."""

    def __init__(self, guidance: Mapping[str, torch.Tensor]) -> None:
        self.guidance = guidance

    def before_step(self, model: torch.nn.Module) -> None:
        apply_guidance(((n, p) for n, p in model.named_parameters() if n in self.guidance), self.guidance)

    def stacked_before_step(self, params: dict[str, torch.Tensor]) -> None:
        """The same mask on K clients' stacked gradients ``(K, *shape)``."""
        for name, param in params.items():
            if param.grad is not None and name in self.guidance:
                param.grad.mul_(self.guidance[name].to(device=param.grad.device, dtype=param.grad.dtype))


class GuidanceClient(ClientFeature):
    """FedLEx's client half: the guidance the message carries, once exploration is over."""

    def key(self, ctx: ClientContext) -> Hashable:
        return id(ctx.content.get(GUIDANCE_KEY))

    def hooks(self, ctx: ClientContext, start: dict[str, torch.Tensor]) -> tuple[ClientHook, ...]:
        if GUIDANCE_KEY not in ctx.content:
            return ()
        return (GuidanceMask(to_state_dict(ctx.content[GUIDANCE_KEY])),)


class FedLEx(FedsimStrategy):
    """FedLEx's two phases.

    Exploration (rounds ``1..explore_rounds``): only the ``scouts`` (a fixed, seeded set of
    the clients) train, aggregated by FedAvg. At the end of the last exploration round the
    guidance matrix is computed from that round's scout models against the round's base
    model (:func:`guidance_matrix`). Afterwards every training message carries the guidance
    as the ArrayRecord ``"guidance"`` (:data:`GUIDANCE_KEY`, one entry per floating-point
    array, keyed like the model's arrays), and each client multiplies its gradients by it
    before the optimizer step (:func:`apply_guidance`; in a Flower app the ClientApp does::

        if "guidance" in msg.content:
            apply_guidance(model, msg.content["guidance"].to_torch_state_dict())

    with the model's arrays sent as its ``state_dict``). The server applies FedAvg with the
    configured server optimizer (momentum 0.9 by default, as in the paper).

    Parameters
    ----------
    *args, **kwargs
        Flower FedAvg's arguments, ``min_successful`` and ``server_opt`` (default: momentum
        0.9, lr 1).
    explore_rounds : int, default 2
        Rounds of the exploration phase.
    scouts : int, default 5
        Number of scouts (at most the number of clients).
    """

    name = "fedlex"
    Config = FedLExConfig
    description = "FedLEx: scouts explore, their drift becomes a guidance matrix masking every client's gradients"
    client = GuidanceClient()

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.scouts: list[int] | None = None
        self.guidance: dict[str, torch.Tensor] | None = None

    def participants(self, server_round: int, grid: Grid) -> list[int]:
        if server_round > self.cfg.explore_rounds:
            return super().participants(server_round, grid)
        if self.scouts is None:
            if not self.engine:  # wait for the nodes a Flower app asks for
                self._nodes = sorted(sample_nodes(grid, self.min_available_nodes, 0)[1])
            clients = self.clients()
            rng = torch.Generator().manual_seed(derive_seed(self.seed, "fedlex-scouts"))
            count = min(self.cfg.scouts, len(clients))
            self.scouts = sorted(clients[i] for i in torch.randperm(len(clients), generator=rng)[:count].tolist())
        self.log(logging.INFO, "FedLEx: exploration round %d of %d, %d scouts", server_round, self.cfg.explore_rounds,
                 len(self.scouts))
        return self.scouts

    def extra_content(self, server_round: int) -> dict[str, ArrayRecord]:
        if self.guidance is None:
            return {}
        return {GUIDANCE_KEY: ArrayRecord({k: v.contiguous() for k, v in self.guidance.items()})}

    def observe(self, server_round: int, accepted: Iterable[ClientUpdate]) -> None:
        accepted = list(accepted)
        if server_round != self.cfg.explore_rounds or not accepted:
            return
        base = self.spec.unflatten(self._global)
        scouts = [self.spec.unflatten(self._global + u.update) for u in accepted]
        self.guidance = guidance_matrix(base, scouts)
        self.log(logging.INFO, "FedLEx: guidance matrix built from %d scouts", len(scouts))

    def state_dict(self) -> dict:
        return {**super().state_dict(), "guidance": self.guidance, "fedlex_scouts": self.scouts}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.guidance = state.get("guidance")
        self.scouts = state.get("fedlex_scouts")

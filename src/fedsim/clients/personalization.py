"""Personalized FL: a personal model per client beside the global one (``personalization:``).

The global aggregator is untouched: every method is a client feature
(:class:`~fedsim.clients.features.ClientFeature`) whose personal state lives in the client's
Context state (``personal``, an ArrayRecord), so checkpoints carry it and a resumed run ends
where an uninterrupted one would. Federated evaluation scores each client's personalised
model on its own test split (``personal_accuracy``) beside the global model.

- ``finetune``: FedAvg-FT, the field's baseline and evaluation protocol ("Federated Learning
  with Only Positive Labels"-era practice; PFLlib's fine-tuning protocol): training is the
  aggregator's own; before evaluation each client fine-tunes the global model for
  ``finetune_steps`` steps on its train split.
- ``fedper``: "Federated Learning with Personalization Layers", Arivazhagan et al., arXiv
  1912.00818. The ``head`` layers are personal: a client trains from the global body and its
  own head (the global head the first time), keeps the trained head, and sends zeros on the
  head's coordinates, so the server's average moves the body only. The global model's head
  stays where the server has it (its initialisation under FedAvg); its ``client_accuracy_*``
  is therefore not a meaningful score under fedper, the ``personal_accuracy_*`` is.
- ``fedrep``: "Exploiting Shared Representations for Personalized Federated Learning",
  Collins et al., arXiv 2102.07078. As fedper, but the local run is split: ``head_steps``
  steps train the head with the body frozen, the remaining steps train the body with the head
  frozen (a frozen parameter's gradient is dropped, so the optimizer leaves it, its momentum
  and its weight decay alone).
- ``ditto``: "Ditto: Fair and Robust Federated Learning Through Personalization", Li et al.,
  arXiv 2012.04221. The client's global update is the aggregator's own (any aggregator,
  robust ones included); beside it the client trains its personal model ``v`` as many steps,
  from its last ``v`` (the global model the first time), on ``loss + lam / 2 ||v - w||^2``
  with ``w`` the global model it received.
- ``fedbn``: "FedBN: Federated Learning on Non-IID Features via Local Batch Normalization",
  Li et al., arXiv 2102.07623. As fedper with the model's normalisation layers (their affine
  parameters and running statistics) as the personal part, trained jointly with the rest.
- ``apfl``: "Adaptive Personalized Federated Learning", Deng et al., arXiv 2003.13461. As
  ditto, the client's global update is the aggregator's own; beside it the client trains its
  personal model ``v`` and its mixing weight ``alpha`` (``alpha`` at first, stepped by
  ``alpha_lr``) as many steps on ``f(alpha v + (1 - alpha) w)`` (:mod:`fedsim.clients.apfl`),
  and is evaluated with ``alpha v + (1 - alpha) w`` for the global model ``w`` it is sent.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING, ClassVar

import torch
from flwr.app import ArrayRecord

from fedsim.clients.apfl import APFLStep, apfl_mix
from fedsim.clients.features import ClientContext, ClientFeature, PersonalRun
from fedsim.clients.hooks import ClientHook
from fedsim.config_checks import norm_layers
from fedsim.records import to_state_dict

if TYPE_CHECKING:
    from torch import nn

    from fedsim.config import ExperimentConfig

__all__ = ["ALPHA_KEY", "PERSONAL_KEY", "FedRepPhases", "PersonalPull", "Personalization", "in_layers"]

LOCAL_LAYERS = ("fedper", "fedrep", "fedbn")
"""The methods that keep some layers of the one model personal."""

PERSONAL_KEY = "personal"
"""Where a client keeps its personal tensors: the head (fedper, fedrep) or its whole model (ditto, apfl)."""

ALPHA_KEY = "personal-alpha"
"""Where an APFL client keeps its mixing weight ``alpha``."""


def in_layers(name: str, layers: list[str] | tuple[str, ...]) -> bool:
    """Whether the state-dict entry ``name`` belongs to one of the modules ``layers``."""
    return any(name == layer or name.startswith(layer + ".") for layer in layers)


class FedRepPhases(ClientHook):
    """FedRep's alternating local run: the first ``head_steps`` optimizer steps update the
    head only, the rest the body only. The gradients of the frozen part are dropped
    (``grad = None``), so the optimizer skips those parameters entirely.

    Parameters
    ----------
    head : tuple of str
        The personal layers (module names).
    head_steps : int
        Steps of the head phase, from the start of the local run.

    Its stacked form freezes the same part of every row: the clients of a stack start
    together, so all are in the same phase at each step.
    """

    def __init__(self, head: tuple[str, ...], head_steps: int) -> None:
        self.head = head
        self.head_steps = head_steps
        self.step = 0

    def before_step(self, model: nn.Module) -> None:
        self._freeze(dict(model.named_parameters()))

    def stacked_before_step(self, params: dict[str, torch.Tensor]) -> None:
        # every row of the stack is at the same step of its run: one phase for the whole stack
        self._freeze(params)

    def _freeze(self, params: dict[str, torch.Tensor]) -> None:
        train_head = self.step < self.head_steps
        for name, param in params.items():
            if in_layers(name, self.head) != train_head:
                param.grad = None
        self.step += 1


class PersonalPull(ClientHook):
    """Ditto's pull of the personal model toward the global one, ``lam / 2 * ||v - w||^2``.

    Parameters
    ----------
    lam : float
        Strength of the pull.
    global_params : dict[str, torch.Tensor]
        The global model's parameters by name (detached copies); stacked ``(K, *shape)`` for the
        stacked form, one row per client (:meth:`stack`).
    """

    def __init__(self, lam: float, global_params: dict[str, torch.Tensor]) -> None:
        self.lam = lam
        self.global_params = global_params

    def extra_loss(self, model: nn.Module, logits: torch.Tensor) -> torch.Tensor | None:
        if self.lam == 0:
            return None
        params = dict(model.named_parameters())
        return 0.5 * self.lam * sum(((params[name] - w) ** 2).sum() for name, w in self.global_params.items())

    def stacked_extra_loss(self, params: dict[str, torch.Tensor], logits: torch.Tensor,
                           mask: torch.Tensor) -> torch.Tensor | None:
        if self.lam == 0:
            return None
        # the stacked trainer passes the rows of the clients still training, the first ones
        return 0.5 * self.lam * sum(((params[name] - w[: len(params[name])].to(params[name].device)) ** 2)
                                    .flatten(1).sum(1) for name, w in self.global_params.items())

    @classmethod
    def stack(cls, hooks: Sequence[PersonalPull]) -> PersonalPull:
        return cls(hooks[0].lam, {name: torch.stack([hook.global_params[name] for hook in hooks])
                                  for name in hooks[0].global_params})


class Personalization(ClientFeature):
    """The client half of ``personalization.method`` (see the module docstring)."""

    state_keys: ClassVar[tuple[str, ...]] = (PERSONAL_KEY, ALPHA_KEY)

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.method = cfg.personalization.method
        self.settings = cfg.personalization
        # the personal layers of the methods that keep layers local
        self.head = tuple(norm_layers(cfg) if self.method == "fedbn" else cfg.personalization.head)

    @staticmethod
    def applies(cfg: ExperimentConfig) -> bool:
        return cfg.personalization.method != "none"

    def key(self, ctx: ClientContext) -> Hashable:
        return self.method

    # ------------------------------------------------------------- training
    def start(self, ctx: ClientContext, start: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.method in LOCAL_LAYERS and PERSONAL_KEY in ctx.state:
            start = {**start, **to_state_dict(ctx.state[PERSONAL_KEY])}
        ctx.scratch["start"] = start
        return start

    def hooks(self, ctx: ClientContext, start: dict[str, torch.Tensor]) -> tuple[ClientHook, ...]:
        return (FedRepPhases(self.head, self.settings.head_steps),) if self.method == "fedrep" else ()

    def sent_update(self, ctx: ClientContext, update: torch.Tensor) -> torch.Tensor:
        """The personal layers' trained values are kept; their coordinates are sent as zeros, so
        what the server and the other features' ``finish`` see (SCAFFOLD's ``dc_i``) is the body's."""
        if self.method not in LOCAL_LAYERS:
            return update
        start = ctx.scratch["start"]
        trained = ctx.spec.unflatten(ctx.spec.flatten(start) + update)
        # the float entries (integer buffers such as num_batches_tracked stay the server's)
        ctx.state[PERSONAL_KEY] = ArrayRecord({name: value.contiguous() for name, value in trained.items()
                                               if in_layers(name, self.head)})
        personal = torch.cat([torch.full((size,), in_layers(name, self.head))
                              for name, size in zip(ctx.spec.names, ctx.spec.sizes, strict=True)])
        return update.masked_fill(personal, 0.0)

    def personal_run(self, ctx: ClientContext) -> PersonalRun | None:
        """Ditto's and APFL's personal model, trained as many steps after the global update."""
        if self.method not in ("ditto", "apfl"):
            return None
        global_state = ctx.scratch["start"]
        personal = to_state_dict(ctx.state[PERSONAL_KEY]) if PERSONAL_KEY in ctx.state else global_state
        w = {name: global_state[name].detach().clone() for name in ctx.spec.names if name not in ctx.spec.buffers}

        def keep(trained: dict[str, torch.Tensor]) -> None:
            ctx.state[PERSONAL_KEY] = ArrayRecord({k: v.contiguous() for k, v in trained.items()})

        if self.method == "ditto":
            return PersonalRun(personal, (PersonalPull(self.settings.lam, w),), None, "ditto", keep)
        step = APFLStep({name: personal[name].detach().clone() for name in w}, w, self._alpha(ctx),
                        ctx.cfg.client.lr, self.settings.alpha_lr)

        def keep_apfl(trained: dict[str, torch.Tensor]) -> None:
            keep({**trained, **step.personal})
            ctx.state[ALPHA_KEY] = ArrayRecord({"alpha": torch.tensor([step.alpha], dtype=torch.float64)})

        return PersonalRun({**personal, **apfl_mix(step.personal, w, step.alpha)}, (step,), None, "apfl", keep_apfl)

    def _alpha(self, ctx: ClientContext) -> float:
        """An APFL client's mixing weight: its own, else ``personalization.alpha``."""
        return float(to_state_dict(ctx.state[ALPHA_KEY])["alpha"]) if ALPHA_KEY in ctx.state else self.settings.alpha

    # ----------------------------------------------------------- evaluation
    def personal_model(self, ctx: ClientContext, global_state: dict[str, torch.Tensor]
                       ) -> dict[str, torch.Tensor] | PersonalRun | None:
        if self.method == "finetune":
            return PersonalRun(global_state, (), self.settings.finetune_steps, "finetune")
        if PERSONAL_KEY not in ctx.state:  # a client that never trained: the global model
            return global_state
        personal = to_state_dict(ctx.state[PERSONAL_KEY])
        if self.method == "apfl":
            w = {name: global_state[name] for name in ctx.spec.names if name not in ctx.spec.buffers}
            return {**global_state, **personal, **apfl_mix(personal, w, self._alpha(ctx))}
        return {**global_state, **personal}

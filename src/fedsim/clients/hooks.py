"""Client hooks: extra loss terms and gradient transforms a client feature adds to training.

A client feature (:mod:`fedsim.clients.features`: an algorithm's client half, e.g.
FedProx's proximal term) provides them; the local loop calls every hook at three points of
each step: ``perturb_inputs`` replaces the batch's inputs before the forward pass (an
adversarial attack), ``extra_loss`` is added to the objective (it gets the batch's logits,
and its embeddings, ``model.features(x)``, too when the hook sets ``reads_embeddings``), ``before_step``
runs after ``backward`` and before ``optimizer.step``, ``after_step`` after it (it may
move the weights the step produced).

Each hook also has a *stacked* form for :mod:`fedsim.clients.batched`, which trains K
clients at once with every parameter stacked to shape ``(K, *shape)``:
``stacked_perturb_inputs`` replaces the ``(K, B, ...)`` inputs given
``forward(client_params, x) -> logits``, one client's functional forward to ``vmap`` over the
rows; ``stacked_extra_loss`` returns the K clients' terms as a ``(K,)`` tensor (``mask`` marks the
real rows of the padded ``(K, B)`` batch; ``embeddings``, ``(K, B, d)``, when it reads them), ``stacked_before_step`` transforms the stacked
gradients, ``stacked_after_step`` the stacked weights. Both forms compute the same formula; a hook that overrides one form of a pair
but not the other cannot be vectorised (:func:`vectorises`), and its clients train one at
a time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn


class ClientHook:
    """Base hook: adds nothing and changes nothing.

    A hook with ``per_sample_gradients`` (DP-SGD, :mod:`fedsim.privacy.dp_sgd`) makes the
    stacked engine hand it the per-sample losses of a client's batch and the model instead of
    back-propagating the batch: its ``stacked_gradients`` returns the stacked gradients the
    optimizer steps with.
    """

    per_sample_gradients = False
    reads_embeddings = False
    """Whether ``extra_loss`` and ``stacked_extra_loss`` take the batch's embeddings, the
    model's features before the head, as the keyword ``embeddings`` (:func:`extra_term`,
    :func:`stacked_extra_term`); hooks that leave it False keep the two-argument form."""

    def perturb_inputs(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x

    def stacked_perturb_inputs(self, forward: Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor],
                               params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                               mask: torch.Tensor) -> torch.Tensor:
        return x

    def extra_loss(self, model: nn.Module, logits: torch.Tensor) -> torch.Tensor | None:
        return None

    def before_step(self, model: nn.Module) -> None:
        return None

    def after_step(self, model: nn.Module) -> None:
        return None

    def stacked_extra_loss(self, params: dict[str, torch.Tensor], logits: torch.Tensor,
                           mask: torch.Tensor) -> torch.Tensor | None:
        return None

    def stacked_before_step(self, params: dict[str, torch.Tensor]) -> None:
        return None

    def stacked_after_step(self, params: dict[str, torch.Tensor]) -> None:
        return None

    @classmethod
    def stack(cls, hooks: Sequence[ClientHook]) -> ClientHook | None:
        """One hook whose stacked form computes each of ``hooks`` (one client's each, rows in
        their order), or None when they cannot train as one stack (the default)."""
        return None


def extra_term(hook: ClientHook, model: nn.Module, logits: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor | None:
    """``hook``'s extra loss term of one batch, given its logits and embeddings (the latter
    passed only to a hook that ``reads_embeddings``)."""
    if hook.reads_embeddings:
        return hook.extra_loss(model, logits, embeddings=embeddings)
    return hook.extra_loss(model, logits)


def stacked_extra_term(hook: ClientHook, params: dict[str, torch.Tensor], logits: torch.Tensor, mask: torch.Tensor,
                       embeddings: torch.Tensor) -> torch.Tensor | None:
    """:func:`extra_term`'s stacked form: ``(K,)`` terms of the stacked ``(K, B, ...)`` batch."""
    if hook.reads_embeddings:
        return hook.stacked_extra_loss(params, logits, mask, embeddings=embeddings)
    return hook.stacked_extra_loss(params, logits, mask)


def vectorises(hook: ClientHook) -> bool:
    """Whether ``hook`` has a stacked form for each per-client form it overrides."""
    cls = type(hook)
    return all((getattr(cls, one) is getattr(ClientHook, one)) == (getattr(cls, stacked) is getattr(ClientHook, stacked))
               for one, stacked in (("perturb_inputs", "stacked_perturb_inputs"), ("extra_loss", "stacked_extra_loss"),
                                    ("before_step", "stacked_before_step"), ("after_step", "stacked_after_step")))

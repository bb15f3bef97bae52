"""Client hooks: extra loss terms and gradient transforms a client feature adds to training.

A client feature (:mod:`fedsim.clients.features`: an algorithm's client half, e.g.
FedProx's proximal term) provides them; the local loop calls every hook at two points of
each step: ``extra_loss`` is added to the objective, ``before_step``
runs after ``backward`` and before ``optimizer.step``.

Each hook also has a *stacked* form for :mod:`fedsim.clients.batched`, which trains K
clients at once with every parameter stacked to shape ``(K, *shape)``:
``stacked_extra_loss`` returns the K clients' terms as a ``(K,)`` tensor (``mask`` marks the
real rows of the padded ``(K, B)`` batch), ``stacked_before_step`` transforms the stacked
gradients. Both forms compute the same formula; a hook that overrides one form of a pair
but not the other cannot be vectorised (:func:`vectorises`), and its clients train one at
a time.
"""

from __future__ import annotations

import torch
from torch import nn


class ClientHook:
    """Base hook: adds nothing and changes nothing.

    A hook with ``per_sample_gradients`` (DP-SGD, :mod:`fedsim.privacy.dp_sgd`) makes the
    stacked engine hand it the loss of one sample instead of back-propagating the batch: its
    ``stacked_gradients`` returns the stacked gradients the optimizer steps with.
    """

    per_sample_gradients = False

    def extra_loss(self, model: nn.Module, logits: torch.Tensor) -> torch.Tensor | None:
        return None

    def before_step(self, model: nn.Module) -> None:
        return None

    def stacked_extra_loss(self, params: dict[str, torch.Tensor], logits: torch.Tensor,
                           mask: torch.Tensor) -> torch.Tensor | None:
        return None

    def stacked_before_step(self, params: dict[str, torch.Tensor]) -> None:
        return None


def vectorises(hook: ClientHook) -> bool:
    """Whether ``hook`` has a stacked form for each per-client form it overrides."""
    cls = type(hook)
    return all((getattr(cls, one) is getattr(ClientHook, one)) == (getattr(cls, stacked) is getattr(ClientHook, stacked))
               for one, stacked in (("extra_loss", "stacked_extra_loss"), ("before_step", "stacked_before_step")))

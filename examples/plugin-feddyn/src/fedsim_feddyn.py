"""FedDyn: federated learning with dynamic regularisation, as a fedsim algorithm plug-in.

Reference
---------
D. A. E. Acar, Y. Zhao, R. Matas Navarro, M. Mattina, P. N. Whatmough, V. Saligrama,
"Federated Learning Based on Dynamic Regularization", ICLR 2021, arXiv 2111.04263,
Algorithm 1.

Client
------
Client ``i`` keeps its gradient state ``h_i`` (the paper's ``grad L_i(theta_i^{t-1})``, 0
before its first round). Sent the server model ``theta^{t-1}``, it minimises the dynamically
regularised objective::

    L_i(theta) - <h_i, theta> + (alpha / 2) ||theta - theta^{t-1}||^2     (dynamic_regulariser)

over the model's parameters, and afterwards updates its state from its model update
``Delta_i = theta_i^t - theta^{t-1}``::

    h_i <- h_i - alpha * Delta_i                                            (feddyn_client_step)

It replies with ``Delta_i`` as every fedsim client does; ``h_i`` never leaves the client.

Server
------
The server keeps ``h`` (0 at the start). With ``P_t`` the clients whose replies it accepted
in round ``t`` and ``N`` all clients, sampled or not::

    h <- h - alpha * (1/N) * sum_{i in P_t} Delta_i                         (feddyn_server_step)
    theta^t = theta^{t-1} + mean_{i in P_t}(Delta_i) - h / alpha            (feddyn_model_update)

The mean is plain (the paper's ``1/|P_t|``), not weighted by examples; ``h`` takes the
round's updates first. fedsim's server optimizer applies the model update: with
``server_opt`` at its default (sgd, lr 1) this is the paper's step. Starting from 0, ``h``
stays the mean of all clients' ``h_i`` as long as every reply is accepted.

Where the state lives
---------------------
``h`` in the strategy (its ``state_dict``, so in every checkpoint); each ``h_i`` in client
``i``'s own Context state under :data:`GRADIENT_STATE_KEY`, one array per parameter, which
fedsim's simulation checkpoints carry, so a resumed run ends as an uninterrupted one. Buffers
(BatchNorm statistics) are not parameters: their entries of ``h_i`` and ``h`` stay 0, and
they take the plain mean. A reply the server drops (a crashed client, NaN) leaves its
client's ``h_i`` moved and ``h`` not; under a lossy uplink codec the server's ``h`` takes
the decoded updates, the clients' ``h_i`` their exact ones. In a deployment the SuperNodes
keep their ``h_i`` themselves (a resumed deployed run continues with the ones they hold).

In a Flower app
---------------
``fedsim.flower.FedDyn`` is the class below. Every training message carries ``alpha`` as
the config entry ``"feddyn-alpha"`` (:data:`ALPHA_KEY`); the ClientApp adds the term with
:class:`DynamicRegulariser` and keeps ``h_i`` with :func:`gradient_state`,
:func:`feddyn_client_step` and :func:`keep_gradient_state`::

    alpha = msg.content["config"][ALPHA_KEY]
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    h = gradient_state(context.state, start)
    term = DynamicRegulariser(alpha, h, start)
    ...  # loss = cross_entropy(model(x), y) + term.extra_loss(model, logits) at every step
    keep_gradient_state(context.state, {name: feddyn_client_step(h[name], p.detach() - start[name], alpha)
                                        for name, p in model.named_parameters()})
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, MutableMapping, Sequence
from typing import Literal

import torch
from flwr.app import ArrayRecord, Message
from pydantic import Field
from torch import nn

from fedsim.algorithms.api import SyncStrategyBase
from fedsim.clients.features import ClientContext, ClientFeature
from fedsim.clients.hooks import ClientHook
from fedsim.records import to_record, to_state_dict
from fedsim.strategies.aggregate import check_updates
from fedsim.strategies.base import FedsimStrategy
from fedsim.strategies.replies import ClientUpdate

__all__ = ["ALPHA_KEY", "GRADIENT_STATE_KEY", "DynamicRegulariser", "FedDyn", "FedDynConfig",
           "dynamic_regulariser", "feddyn_client_step", "feddyn_model_update", "feddyn_server_step", "gradient_state",
           "keep_gradient_state", "stacked_dynamic_regulariser"]

ALPHA_KEY = "feddyn-alpha"
"""Config entry of every training message: ``alpha``, for a Flower app's ClientApp."""
GRADIENT_STATE_KEY = "feddyn-gradient"
"""Where a client keeps its ``h_i`` in its Context state (an ArrayRecord, one array per parameter)."""


class FedDynConfig(SyncStrategyBase):
    """FedDyn (Acar et al., arXiv 2111.04263): clients add -<h_i, w> + alpha/2 ||w - w_global||^2;
    the server steps by mean(Delta_i) - h/alpha."""

    name: Literal["feddyn"] = "feddyn"
    alpha: float = Field(0.01, gt=0, description="strength of the dynamic regulariser")


# ------------------------------------------------------------------ server math
def feddyn_server_step(h: torch.Tensor, updates: torch.Tensor, alpha: float, num_clients: int) -> torch.Tensor:
    """The server's new state ``h - alpha * (1/N) * sum_{i in P_t} Delta_i``.

    Parameters
    ----------
    h : torch.Tensor
        The server state ``h``, shape ``(D,)``.
    updates : torch.Tensor
        The round's accepted updates ``Delta_i``, shape ``(|P_t|, D)``.
    alpha : float
        The regulariser's strength.
    num_clients : int
        ``N``, all clients, sampled or not.
    """
    check_updates(updates, "feddyn_server_step")
    if updates.shape[1:] != h.shape:
        raise ValueError(f"feddyn_server_step: updates of shape {tuple(updates.shape)} do not match h of "
                         f"shape {tuple(h.shape)}")
    if num_clients < updates.shape[0]:
        raise ValueError(f"feddyn_server_step: {updates.shape[0]} updates from {num_clients} clients")
    return h - alpha * updates.sum(dim=0) / num_clients


def feddyn_model_update(updates: torch.Tensor, h: torch.Tensor, alpha: float) -> torch.Tensor:
    """FedDyn's model update ``mean_{i in P_t}(Delta_i) - h / alpha``, with ``h`` already
    updated by this round's replies (:func:`feddyn_server_step`).

    Parameters
    ----------
    updates : torch.Tensor
        The round's accepted updates ``Delta_i``, shape ``(|P_t|, D)``.
    h : torch.Tensor
        The server state ``h``, shape ``(D,)``.
    alpha : float
        The regulariser's strength.
    """
    check_updates(updates, "feddyn_model_update")
    return updates.mean(dim=0) - h.to(updates.dtype) / alpha


# ------------------------------------------------------------------ client math
def feddyn_client_step(h: torch.Tensor, update: torch.Tensor, alpha: float) -> torch.Tensor:
    """A client's new gradient state ``h_i - alpha * Delta_i`` (any matching shapes).

    Parameters
    ----------
    h : torch.Tensor
        ``h_i``.
    update : torch.Tensor
        The client's model update ``Delta_i = theta_i^t - theta^{t-1}``.
    alpha : float
        The regulariser's strength.
    """
    return h - alpha * update.to(h.dtype)


def dynamic_regulariser(params: Mapping[str, torch.Tensor], h: Mapping[str, torch.Tensor],
                        start: Mapping[str, torch.Tensor], alpha: float) -> torch.Tensor:
    """FedDyn's client term ``-<h_i, theta> + (alpha / 2) ||theta - theta^{t-1}||^2``.

    Parameters
    ----------
    params : mapping of str to torch.Tensor
        The model's parameters ``theta`` by name (at least those of ``h``).
    h : mapping of str to torch.Tensor
        The client's gradient state ``h_i``, per parameter; its names are the ones regularised.
    start : mapping of str to torch.Tensor
        The model the client started from, ``theta^{t-1}``, per parameter.
    alpha : float
        The regulariser's strength.

    Returns
    -------
    torch.Tensor
        A scalar, differentiable in ``params``.
    """
    return sum(-(h[name] * params[name]).sum() + 0.5 * alpha * ((params[name] - start[name]) ** 2).sum()
               for name in h)


def stacked_dynamic_regulariser(params: Mapping[str, torch.Tensor], h: Mapping[str, torch.Tensor],
                                start: Mapping[str, torch.Tensor], alpha: float) -> torch.Tensor:
    """:func:`dynamic_regulariser` of K clients at once.

    Parameters
    ----------
    params : mapping of str to torch.Tensor
        The first ``K`` clients' parameters, stacked ``(K, *shape)``.
    h, start : mapping of str to torch.Tensor
        Their ``h_i`` and start models, stacked ``(K', *shape)`` with ``K' >= K``: row ``k``
        is the client of row ``k`` of ``params`` (the stacked trainer passes the rows of the
        clients still training, the first ones).
    alpha : float
        The regulariser's strength.

    Returns
    -------
    torch.Tensor
        Shape ``(K,)``: each client's term.
    """
    terms = []
    for name in h:
        theta = params[name]
        rows = len(theta)
        linear = (h[name][:rows] * theta).flatten(1).sum(1)
        proximal = ((theta - start[name][:rows]) ** 2).flatten(1).sum(1)
        terms.append(-linear + 0.5 * alpha * proximal)
    return sum(terms)


def gradient_state(state: Mapping, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A client's ``h_i`` from its Context ``state``: per parameter of ``like`` (names,
    shapes, device), 0 before the client's first round.

    Parameters
    ----------
    state : mapping
        The client's Context state (``context.state`` in a Flower ClientApp).
    like : mapping of str to torch.Tensor
        The parameters ``h_i`` is kept for, e.g. the model's start.
    """
    kept = to_state_dict(state[GRADIENT_STATE_KEY]) if GRADIENT_STATE_KEY in state else {}
    return {name: kept[name].to(device=p.device, dtype=p.dtype) if name in kept else torch.zeros_like(p)
            for name, p in like.items()}


def keep_gradient_state(state: MutableMapping, h: Mapping[str, torch.Tensor]) -> None:
    """Keep a client's ``h_i`` (per parameter) in its Context ``state``."""
    state[GRADIENT_STATE_KEY] = to_record({name: value.detach().cpu().contiguous().numpy()
                                           for name, value in h.items()})


class DynamicRegulariser(ClientHook):
    """FedDyn's client term as a hook: :func:`dynamic_regulariser` of the model's parameters,
    and its stacked form.

    Parameters
    ----------
    alpha : float
        The regulariser's strength.
    h : dict of str to torch.Tensor
        ``h_i`` per parameter name; stacked ``(K, *shape)`` for K clients, one row each.
    start : dict of str to torch.Tensor
        ``theta^{t-1}`` per parameter name (detached), stacked like ``h``.
    """

    def __init__(self, alpha: float, h: dict[str, torch.Tensor], start: dict[str, torch.Tensor]) -> None:
        self.alpha, self.h, self.start = alpha, h, start

    def extra_loss(self, model: nn.Module, logits: torch.Tensor | None) -> torch.Tensor:
        return dynamic_regulariser(dict(model.named_parameters()), self.h, self.start, self.alpha)

    def stacked_extra_loss(self, params: dict[str, torch.Tensor], logits: torch.Tensor,
                           mask: torch.Tensor) -> torch.Tensor:
        return stacked_dynamic_regulariser(params, self.h, self.start, self.alpha)


class FedDynClient(ClientFeature):
    """FedDyn's client half: the dynamic regulariser from the client's ``h_i``, and ``h_i``
    updated after training. Stacked, each row is regularised with its own client's ``h_i``."""

    state_keys = (GRADIENT_STATE_KEY,)

    def key(self, ctx: ClientContext) -> Hashable:
        return ctx.cfg.strategy.alpha

    @staticmethod
    def _parameters(ctx: ClientContext, start: Mapping[str, torch.Tensor]) -> list[str]:
        """The federated model's parameters (not its buffers, nor what a training wrapper adds)."""
        return [name for name in start if name in ctx.spec.names and name not in ctx.spec.buffers]

    def _gradient(self, ctx: ClientContext, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        h = gradient_state(ctx.state, like)
        ctx.scratch["feddyn"] = {name: value.cpu() for name, value in h.items()}
        return h

    def hooks(self, ctx: ClientContext, start: dict[str, torch.Tensor]) -> tuple[ClientHook, ...]:
        start = {name: start[name] for name in self._parameters(ctx, start)}
        return (DynamicRegulariser(ctx.cfg.strategy.alpha, self._gradient(ctx, start), start),)

    def stacked_hooks(self, ctxs: Sequence[ClientContext], start: dict[str, torch.Tensor]) -> tuple[ClientHook, ...]:
        start = {name: start[name] for name in self._parameters(ctxs[0], start)}
        rows = [self._gradient(ctx, {name: s[0] for name, s in start.items()}) for ctx in ctxs]
        h = {name: torch.stack([row[name] for row in rows]) for name in start}
        return (DynamicRegulariser(ctxs[0].cfg.strategy.alpha, h, start),)

    def finish(self, ctx: ClientContext, update: torch.Tensor, steps: int) -> dict[str, ArrayRecord]:
        h, deltas = ctx.scratch["feddyn"], ctx.spec.unflatten(update)
        keep_gradient_state(ctx.state, {name: feddyn_client_step(h[name], deltas[name], ctx.cfg.strategy.alpha)
                                        for name in h})
        return {}


# ------------------------------------------------------------------ server half
class FedDyn(FedsimStrategy):
    """FedDyn (see the module docstring): the server keeps ``h``; clients keep ``h_i`` and
    add the dynamic regulariser.

    Every training message carries ``alpha`` as the config entry ``"feddyn-alpha"``
    (:data:`ALPHA_KEY`). The aggregate is the plain mean of the accepted updates minus
    ``h / alpha``, ``h`` having taken this round's updates (also in a round skipped for
    too few replies: those clients have moved their ``h_i``).

    Parameters
    ----------
    *args, **kwargs
        Flower FedAvg's arguments, ``min_successful`` and ``server_opt`` (sgd with lr 1 by
        default: the paper's server step); ``weighted_by_key`` weighs the metrics only.
    alpha : float, default 0.01
        The strength of the dynamic regulariser (> 0), in the clients' objective and in the
        server's correction ``-h / alpha``.
    """

    name = "feddyn"
    Config = FedDynConfig
    description = ("FedDyn (Acar et al. 2021): clients add -<h_i, w> + alpha/2 ||w - w_global||^2; "
                   "the server corrects the mean update by -h/alpha")
    client = FedDynClient()
    reads_round_replies = "updates its state h with the round's own replies"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.h: torch.Tensor | None = None

    def prepare_messages(self, server_round: int, messages: list[Message], clients: list[int]) -> None:
        for message in messages:
            message.content["config"][ALPHA_KEY] = self.cfg.alpha

    def observe(self, server_round: int, accepted: list[ClientUpdate]) -> None:
        if not accepted:
            return
        updates = torch.stack([u.update for u in accepted]) * self.spec.parameter_mask()  # buffers keep no state
        if self.h is None:
            self.h = torch.zeros(updates.shape[1], dtype=updates.dtype)
        # a node that replied and then left a Flower app's grid still counts among the N clients
        self.h = feddyn_server_step(self.h, updates, self.cfg.alpha, max(self.num_clients, len(accepted)))

    def aggregate_updates(self, server_round: int, updates: list[ClientUpdate]) -> torch.Tensor:
        return feddyn_model_update(torch.stack([u.update for u in updates]), self.h, self.cfg.alpha)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "feddyn_h": self.h}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.h = state["feddyn_h"]

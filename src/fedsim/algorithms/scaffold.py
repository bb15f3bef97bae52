"""SCAFFOLD: control variates correct every local gradient for the client drift.

Reference
---------
S. P. Karimireddy, S. Kale, M. Mohri, S. J. Reddi, S. U. Stich, A. T. Suresh, "SCAFFOLD:
Stochastic Controlled Averaging for Federated Learning", ICML 2020, arXiv 1910.06378,
Algorithm 1 (option II).

Server
------
Every training message carries ``c`` beside the model ``x``; each sampled client ``i`` in
``S`` replies with ``dy_i = y_i - x`` and ``dc_i = c_i+ - c_i``. With ``N`` clients in all::

    x <- x + eta_g * (1/|S|) sum_{i in S} dy_i        (scaffold_model_update; eta_g is server_opt.lr)
    c <- c + (1/N) sum_{i in S} dc_i = c + (|S|/N) mean(dc)      (scaffold_control_step)

so ``c`` stays the mean of all clients' ``c_i`` (all start at 0). As in the paper the model
update is the plain mean over the sampled clients, not example-weighted.

Where the state lives: ``c`` here (checkpointed); each ``c_i`` in client ``i``'s Flower
Context. The server also keeps every ``c_i`` as the sum of the deltas it accepted, in the
checkpoint: it resends that copy to a client whose Context may disagree (after a resume,
which starts fresh Contexts, or after a reply it rejected, whose client had already moved
on), so a resumed run continues exactly and a dropped reply cannot split ``c`` from the
mean of the ``c_i``. That copy costs ``N x D`` floats of server memory. Bytes: ``c`` (and a
resent ``c_i``) count on the downlink, ``dc_i`` on the uplink, float32 each.

Under central DP (``privacy.mechanism: central``) the server clips each joint ``(dy_i,
dc_i)`` and noises their sum (:meth:`Scaffold.private_aggregate`); under secure aggregation
(``secagg.enabled``) the clients mask the joint vector, the server keeps no ``c_i``, and a
client whose ``dc_i`` did not enter ``c`` goes back to its earlier ``c_i``
(:meth:`Scaffold.secure_aggregate`).

Client
------
The server sends the global model ``x`` and its control variate ``c``. Client ``i`` starts
from ``y_i = x`` and, at every local step, corrects its mini-batch gradient before the
optimizer sees it::

    g <- g - c_i + c                                     (corrected_gradients)

After ``K`` steps of learning rate ``eta_l`` it updates its control variate (option II)::

    c_i+ = c_i - c + (x - y_i) / (a eta_l)               (control_variate_update)

with ``a = K`` for plain SGD, as in the paper. With heavy-ball momentum ``rho`` the same
model difference comes from ``a(K, rho)`` effective steps
(:func:`fedsim.clients.local_steps.momentum_steps`), so fedsim divides by that: with a
constant corrected gradient ``g'`` the client moves ``x - y_i = eta_l a(K, rho) g'``, and
option II's estimate ``(x - y_i) / (a eta_l)`` stays the average corrected gradient it is
without momentum (``rho = 0`` gives the paper's ``K``). The client replies with its model
update ``y_i - x`` and ``dc_i = c_i+ - c_i``, and keeps ``c_i <- c_i+``. ``c_i`` starts at 0.

Where the correction enters (``strategy.correction``)
------------------------------------------------------
``gradient`` (default, above): the corrected gradient goes through the client optimizer, so
with momentum the correction is accumulated in the momentum buffer too, and ``a = a(K, rho)``.
``weights``: NIID-Bench's implementation (Li et al., ICDE 2022, arXiv 2102.02079,
``experiments.py``, ``train_net_scaffold``): the optimizer steps on the plain gradient and,
after every step, the weights move by the correction (:func:`corrected_weights`)::

    y_i <- y_i - eta_l (c - c_i)

and option II divides by the steps taken, ``a = K``, whatever the momentum. Without momentum
the two are the same algorithm (the paper's); with momentum they differ.

The correction is a pure tensor operation on the gradients, so a backend that trains many
clients at once applies the same formula to stacked gradients and control variates.
Control variates are flat vectors in the model's :class:`~fedsim.params.ParamSpec` layout;
entries of buffers (BatchNorm statistics, which have no gradient) stay 0.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, MutableMapping, Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from pydantic import Field
from torch import nn

from fedsim.algorithms.api import SyncStrategyBase
from fedsim.clients.features import ClientContext, ClientFeature
from fedsim.clients.hooks import ClientHook
from fedsim.clients.local_steps import momentum_steps
from fedsim.params import ParamSpec
from fedsim.quant import codecs
from fedsim.strategies.aggregate import check_updates
from fedsim.strategies.base import FedsimStrategy
from fedsim.strategies.replies import (
    IDENTITY,
    ClientUpdate,
    Failure,
    decode_record,
)

if TYPE_CHECKING:
    from fedsim.config import ClientConfig
    from fedsim.privacy.server import ServerPrivacy

__all__ = ["Scaffold", "ScaffoldConfig", "ScaffoldControl", "control_variate_update", "corrected_gradients",
           "corrected_weights", "scaffold_control_step", "scaffold_model_update"]

STATE_KEY = "scaffold-control"
"""Where a client keeps its ``c_i`` in its Context state."""


class ScaffoldConfig(SyncStrategyBase):
    """SCAFFOLD (Karimireddy et al., arXiv 1910.06378), option II control variates: clients
    step with g - c_i + c; the server's learning rate eta_g is ``server_opt.lr``.

    Parameters
    ----------
    correction : {"gradient", "weights"}, default "gradient"
        Where the correction enters: the gradient before the optimizer step (so through
        momentum; option II divides by the momentum-weighted steps), or the weights after
        every step, ``y <- y - lr (c - c_i)``, with option II dividing by ``K lr``
        (NIID-Bench's code). The same without momentum.
    """

    name: Literal["scaffold"] = "scaffold"
    correction: Literal["gradient", "weights"] = Field(
        "gradient", description="gradient: g - c_i + c before each step; weights: y -= lr (c - c_i) after it "
                                "(NIID-Bench's code)")


# ------------------------------------------------------------------ server math
def scaffold_model_update(updates: torch.Tensor) -> torch.Tensor:
    """SCAFFOLD's aggregated model update ``(1/|S|) sum_i dy_i`` (the server optimizer then
    applies ``x <- x + eta_g * it``).

    Parameters
    ----------
    updates : torch.Tensor
        The sampled clients' ``dy_i = y_i - x``, shape ``(|S|, D)``.
    """
    check_updates(updates, "scaffold_model_update")
    return updates.mean(dim=0)


def scaffold_control_step(control: torch.Tensor, deltas: torch.Tensor, num_clients: int) -> torch.Tensor:
    """The new server control variate ``c + (1/N) sum_{i in S} dc_i``.

    Parameters
    ----------
    control : torch.Tensor
        ``c``, shape ``(D,)``.
    deltas : torch.Tensor
        The sampled clients' ``dc_i``, shape ``(|S|, D)``.
    num_clients : int
        ``N``, all clients, sampled or not.
    """
    check_updates(deltas, "scaffold_control_step")
    if deltas.shape[1:] != control.shape:
        raise ValueError(f"scaffold_control_step: deltas of shape {tuple(deltas.shape)} do not match "
                         f"c of shape {tuple(control.shape)}")
    if num_clients < deltas.shape[0]:
        raise ValueError(f"scaffold_control_step: {deltas.shape[0]} deltas from {num_clients} clients")
    return control + deltas.sum(dim=0) / num_clients


# ------------------------------------------------------------------ client math
CONTROL_RECORD = "scaffold-control"
"""Message record of the server's control variate ``c``."""
LOCAL_RECORD = "scaffold-local-control"
"""Message record of the client's own ``c_i`` as the server holds it (resent after a resume
or a failed reply; the client adopts it)."""
DELTA_RECORD = "scaffold-delta"
"""Reply record of the client's ``dc_i = c_i+ - c_i``."""
PREVIOUS_KEY = "scaffold-previous-control"
"""Secure aggregation: where a client keeps its ``c_i`` from before its last training round,
and that round (``"round"``), to go back to if its ``dc_i`` did not enter ``c``."""
REVERT_KEY = "scaffold-revert"
"""Secure aggregation: the training config's key naming the round whose ``dc_i`` did not
enter ``c``; the client takes back the ``c_i`` it had before that round."""

_IDENTITY = codecs.build("identity")


def corrected_gradients(grads: Sequence[torch.Tensor], c_local: Sequence[torch.Tensor],
                        c_global: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """SCAFFOLD's corrected gradients ``g - c_i + c``, tensor by tensor.

    Parameters
    ----------
    grads, c_local, c_global : sequence of torch.Tensor
        The mini-batch gradients, the client's control variate and the server's, in the same
        order and shapes (any leading batch dimension broadcasts).

    Returns
    -------
    list[torch.Tensor]
        ``grads[k] - c_local[k] + c_global[k]`` for every ``k``.
    """
    return [g - ci + c for g, ci, c in zip(grads, c_local, c_global, strict=True)]


def corrected_weights(weights: Sequence[torch.Tensor], c_local: Sequence[torch.Tensor],
                      c_global: Sequence[torch.Tensor], lr: float) -> list[torch.Tensor]:
    """NIID-Bench's SCAFFOLD step on the weights after an optimizer step,
    ``w - lr (c - c_i)``, tensor by tensor (``correction: weights``).

    Parameters
    ----------
    weights, c_local, c_global : sequence of torch.Tensor
        The weights after the optimizer step, ``c_i`` and ``c``, in the same order and shapes
        (any leading batch dimension broadcasts).
    lr : float
        The local learning rate ``eta_l``.
    """
    return [w - lr * (c - ci) for w, ci, c in zip(weights, c_local, c_global, strict=True)]


def control_variate_update(c_local: torch.Tensor, c_global: torch.Tensor, update: torch.Tensor,
                           steps: int, lr: float, momentum: float = 0.0) -> torch.Tensor:
    """Option II's new client control variate ``c_i+ = c_i - c + (x - y_i) / (a lr)``.

    Parameters
    ----------
    c_local, c_global : torch.Tensor
        ``c_i`` and ``c``, flat.
    update : torch.Tensor
        The client's model update ``y_i - x`` (so ``x - y_i = -update``), flat.
    steps : int
        Local steps ``K``.
    lr : float
        Local learning rate ``eta_l``.
    momentum : float, default 0.0
        The client optimizer's heavy-ball momentum; ``a = momentum_steps(K, momentum)``
        (``K`` without momentum).

    Returns
    -------
    torch.Tensor
        ``c_i+``.
    """
    return c_local - c_global - update / (momentum_steps(steps, momentum) * lr)


def encode_vector(vector: torch.Tensor) -> tuple[ArrayRecord, int]:
    """A flat float32 vector as an ArrayRecord (identity payload) and its bytes on the wire."""
    payload = _IDENTITY.encode(vector)
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in payload.to_arrays().items()}), payload.nbytes


def decode_vector(record: ArrayRecord) -> torch.Tensor:
    """Inverse of :func:`encode_vector`."""
    return _IDENTITY.decode(_IDENTITY.from_arrays({k: v.numpy() for k, v in record.items()}))


class ScaffoldCorrection(ClientHook):
    """The correction as a client hook: ``before_step`` replaces each parameter's gradient by
    :func:`corrected_gradients` of it.

    Parameters
    ----------
    c_local, c_global : dict of str to torch.Tensor
        ``c_i`` and ``c`` per parameter name; for a stack of K clients ``c_local`` holds
        ``(K, *shape)`` rows.
    """

    def __init__(self, c_local: dict[str, torch.Tensor], c_global: dict[str, torch.Tensor]) -> None:
        self.c_local = c_local
        self.c_global = c_global

    def before_step(self, model: nn.Module) -> None:
        self._correct([(n, p) for n, p in model.named_parameters() if p.grad is not None and n in self.c_local])

    def stacked_before_step(self, params: dict[str, torch.Tensor]) -> None:
        """The same correction on K clients' stacked gradients ``(K, *shape)``: ``c_local``
        is stacked too, one row per client (the trainer passes the first rows, of the
        clients still training), ``c_global`` broadcasts."""
        self._correct([(n, p) for n, p in params.items() if p.grad is not None and n in self.c_local])

    def _correct(self, params: list[tuple[str, torch.Tensor]]) -> None:
        new = corrected_gradients([p.grad for _, p in params], self._rows(params),
                                  [self.c_global[n] for n, p in params])
        for (_, p), grad in zip(params, new, strict=True):
            p.grad.copy_(grad.to(p.grad.device))

    def _rows(self, params: list[tuple[str, torch.Tensor]]) -> list[torch.Tensor]:
        """``c_i`` per parameter; stacked, the rows of the clients still training."""
        return [self.c_local[n][: len(p)] if self.c_local[n].dim() > self.c_global[n].dim() else self.c_local[n]
                for n, p in params]


class ScaffoldWeightCorrection(ScaffoldCorrection):
    """``correction: weights`` as a client hook: ``after_step`` moves each parameter by
    :func:`corrected_weights`; the gradients are left alone.

    Parameters
    ----------
    c_local, c_global : dict of str to torch.Tensor
        As for :class:`ScaffoldCorrection`.
    lr : float
        The local learning rate.
    """

    def __init__(self, c_local: dict[str, torch.Tensor], c_global: dict[str, torch.Tensor], lr: float) -> None:
        super().__init__(c_local, c_global)
        self.lr = lr

    def before_step(self, model: nn.Module) -> None:
        return None

    def stacked_before_step(self, params: dict[str, torch.Tensor]) -> None:
        return None

    def after_step(self, model: nn.Module) -> None:
        self._move([(n, p) for n, p in model.named_parameters() if n in self.c_local])

    def stacked_after_step(self, params: dict[str, torch.Tensor]) -> None:
        self._move([(n, p) for n, p in params.items() if n in self.c_local])

    @torch.no_grad()
    def _move(self, params: list[tuple[str, torch.Tensor]]) -> None:
        new = corrected_weights([p for _, p in params], self._rows(params), [self.c_global[n] for n, p in params],
                                self.lr)
        for (_, p), weight in zip(params, new, strict=True):
            p.copy_(weight.to(p.device))


def correction_hook(c_local: dict[str, torch.Tensor], c_global: dict[str, torch.Tensor],
                    correction: Literal["gradient", "weights"], lr: float) -> ScaffoldCorrection:
    """The client hook of ``strategy.correction``: :class:`ScaffoldCorrection` on the
    gradients, or :class:`ScaffoldWeightCorrection` on the weights at learning rate ``lr``."""
    return ScaffoldCorrection(c_local, c_global) if correction == "gradient" else \
        ScaffoldWeightCorrection(c_local, c_global, lr)


class ScaffoldControl:
    """One SCAFFOLD client call: reads ``c`` (and ``c_i``), provides the hook, and after
    training computes ``dc_i`` and keeps ``c_i+``.

    Parameters
    ----------
    c_global, c_local : torch.Tensor
        ``c`` and ``c_i``, flat in ``spec``'s layout.
    spec : ParamSpec
        The model's flat layout.
    partition_id : int
        The client, the key of ``c_i`` in its Context state.
    correction : {"gradient", "weights"}, default "gradient"
        ``strategy.correction``: which hook corrects the training, and whether option II
        divides by the momentum-weighted steps (``gradient``) or by ``K`` (``weights``).
    """

    def __init__(self, c_global: torch.Tensor, c_local: torch.Tensor, spec: ParamSpec, partition_id: int,
                 correction: Literal["gradient", "weights"] = "gradient") -> None:
        if c_global.shape != (spec.dim,) or c_local.shape != (spec.dim,):
            raise ValueError(f"scaffold: control variates of shapes {tuple(c_global.shape)} and "
                             f"{tuple(c_local.shape)}; the model has ({spec.dim},)")
        self.c_global, self.c_local, self.spec, self.partition_id = c_global, c_local, spec, partition_id
        self.correction = correction

    @classmethod
    def from_content(cls, content: RecordDict, state: MutableMapping, spec: ParamSpec, partition_id: int,
                     correction: Literal["gradient", "weights"] = "gradient") -> ScaffoldControl | None:
        """The client's control state for a SCAFFOLD training message's ``content``, None for
        any other message.

        ``c_i`` is the one the message carries (the server resends it), else the one in the
        client's Context ``state``, else 0 (a client's first round).
        """
        if CONTROL_RECORD not in content.array_records:
            return None
        c_global = decode_vector(content[CONTROL_RECORD])
        if LOCAL_RECORD in content.array_records:
            c_local = decode_vector(content[LOCAL_RECORD])
        elif STATE_KEY in state:
            c_local = decode_vector(state[STATE_KEY])
        else:
            c_local = torch.zeros(spec.dim)
        return cls(c_global, c_local, spec, partition_id, correction)

    def hook(self, parameters: Iterable[str], lr: float) -> ScaffoldCorrection:
        """The correction of the named parameters (those of the flat layout: a quantized
        model's step sizes are not part of the federated model), at local learning rate ``lr``."""
        names = set(parameters) & set(self.spec.names)
        local, glob = self.spec.unflatten(self.c_local), self.spec.unflatten(self.c_global)
        return correction_hook({n: local[n] for n in names}, {n: glob[n] for n in names}, self.correction, lr)

    def finish(self, update: torch.Tensor, steps: int, client: ClientConfig, state: MutableMapping) -> ArrayRecord:
        """Keep ``c_i+`` in ``state`` (0 on buffers, which have no gradient) and return the
        reply record of ``dc_i``.

        Parameters
        ----------
        update : torch.Tensor
            The local model update ``y_i - x``, flat.
        steps : int
            Local steps taken.
        client : ClientConfig
            The client optimizer's ``lr`` and ``momentum``.
        state : MutableMapping
            The client's Context state (its slice, on a node serving several clients).
        """
        momentum = client.momentum if self.correction == "gradient" else 0.0  # weights: a = K (NIID-Bench)
        c_new = control_variate_update(self.c_local, self.c_global, update, steps, client.lr, momentum)
        c_new = c_new * self.spec.parameter_mask()
        state[STATE_KEY] = encode_vector(c_new)[0]
        return encode_vector(c_new - self.c_local)[0]


def reverted_control(state: MutableMapping, server_round: int) -> torch.Tensor | None:
    """The ``c_i`` kept before round ``server_round`` (:data:`PREVIOUS_KEY`), None when the
    client did not move its ``c_i`` in that round."""
    kept = state.get(PREVIOUS_KEY)
    if kept is None or int(kept["round"].numpy()[0]) != server_round:
        return None
    return decode_vector(ArrayRecord({k: v for k, v in kept.items() if k != "round"}))


def kept_control(c_local: torch.Tensor, server_round: int) -> ArrayRecord:
    """``c_i`` as kept before training in ``server_round`` (:data:`PREVIOUS_KEY`)."""
    record = encode_vector(c_local)[0]
    record["round"] = Array(np.array([server_round], dtype=np.int64))
    return record


class ScaffoldClient(ClientFeature):
    """SCAFFOLD's client half: the correction hook from ``c`` and ``c_i``, and ``dc_i`` in
    the reply; ``c_i`` is the client's own state. Stacked, each row corrects with its own
    client's ``c_i``. Under secure aggregation it also keeps the ``c_i`` from before its last
    round, and goes back to it when the server says that round's ``dc_i`` did not enter ``c``
    (:data:`REVERT_KEY`)."""

    state_keys = (STATE_KEY, PREVIOUS_KEY)

    def hooks(self, ctx: ClientContext, start: dict[str, torch.Tensor]) -> tuple[ClientHook, ...]:
        control = ScaffoldControl.from_content(ctx.content, ctx.state, ctx.spec, ctx.partition_id,
                                               ctx.cfg.strategy.correction)
        previous = reverted_control(ctx.state, int(ctx.config[REVERT_KEY])) if REVERT_KEY in ctx.config else None
        if previous is not None:
            control.c_local = previous
        ctx.scratch["scaffold"] = control
        return (control.hook(start, ctx.cfg.client.lr),)

    def stacked_hooks(self, ctxs: Sequence[ClientContext], start: dict[str, torch.Tensor]) -> tuple[ClientHook, ...]:
        hooks = [self.hooks(ctx, start)[0] for ctx in ctxs]
        local = {n: torch.stack([h.c_local[n] for h in hooks]).to(start[n].device) for n in hooks[0].c_local}
        glob = {n: c.to(start[n].device) for n, c in hooks[0].c_global.items()}
        return (correction_hook(local, glob, ctxs[0].cfg.strategy.correction, ctxs[0].cfg.client.lr),)

    def finish(self, ctx: ClientContext, update: torch.Tensor, steps: int) -> dict[str, ArrayRecord]:
        control = ctx.scratch["scaffold"]
        if ctx.cfg.secagg.enabled:
            ctx.state[PREVIOUS_KEY] = kept_control(control.c_local, ctx.server_round)
        return {DELTA_RECORD: control.finish(update, steps, ctx.cfg.client, ctx.state)}


class Scaffold(FedsimStrategy):
    """SCAFFOLD (see the module docstring).

    Every training message carries ``c`` as the ArrayRecord ``"scaffold-control"`` (and a
    resent ``c_i`` as ``"scaffold-local-control"``); every reply must carry ``dc_i`` as
    ``"scaffold-delta"`` beside the update (a reply without it is dropped). The records hold
    one flat float32 vector of the model's floating-point arrays in order
    (:func:`encode_vector`); in a Flower app the ClientApp applies
    :func:`corrected_gradients` (or, for ``correction: weights``, :func:`corrected_weights`
    after each step) and :func:`control_variate_update` itself.

    Parameters
    ----------
    *args, **kwargs
        Flower FedAvg's arguments, ``min_successful`` and ``server_opt``
        (``server_opt.lr`` is the global learning rate ``eta_g``, 1 by default); in fedsim
        ``client.lr`` and ``client.momentum`` enter the clients' option II update.
    """

    name = "scaffold"
    Config = ScaffoldConfig
    description = "SCAFFOLD (Karimireddy et al. 2020), option II control variates correcting the client drift"
    client = ScaffoldClient()
    sgd_steps = "option II control variate (x - y_i) / (K lr)"
    reads_round_replies = "pairs each reply with the control-variate delta of the same round"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.control: torch.Tensor | None = None
        self.local_controls: dict[int, torch.Tensor] = {}
        self._in_sync: set[int] = set()
        self._contacted: set[int] = set()
        self._deltas: dict[int, tuple[torch.Tensor, int]] = {}
        self._summed: set[int] = set()  # secure aggregation: the clients whose dc_i entered c this round
        self._revert: dict[int, int] = {}  # secure aggregation: client -> the round whose dc_i c lacks

    def prepare_messages(self, server_round: int, messages: list[Message], clients: list[int]) -> None:
        if self.control is None:
            self.control = torch.zeros(self.spec.dim)
        record, control_bytes = encode_vector(self.control)
        for client, msg in zip(clients, messages, strict=True):
            msg.content[CONTROL_RECORD] = record
            self.report.bytes_down += control_bytes
            if client in self._revert:
                msg.content[self.configrecord_key][REVERT_KEY] = self._revert.pop(client)
            if not self._secure and client not in self._in_sync and (client in self.local_controls
                                                                     or client in self._contacted):
                local, local_bytes = encode_vector(self.local_controls.get(client, torch.zeros_like(self.control)))
                msg.content[LOCAL_RECORD] = local
                self.report.bytes_down += local_bytes
            self._contacted.add(client)

    def screen(self, replies: list[Message]) -> tuple[list[ClientUpdate], list[Failure]]:
        """Training replies need a finite ``dc_i`` of the model's size beside the update."""
        accepted, failures = super().screen(replies)
        self._deltas = {}
        reply_of = {msg.metadata.src_node_id: msg for msg in replies}
        node_of = {client: node for node, client in self._sent.items()}
        kept = []
        for update in accepted:
            delta = decode_record(reply_of[node_of[update.partition_id]], update.partition_id, DELTA_RECORD,
                                  self.spec.dim, IDENTITY)
            if isinstance(delta, Failure):
                failures.append(delta)
            else:
                self._deltas[update.partition_id] = delta
                kept.append(update)
        return kept, sorted(failures, key=lambda f: f.partition_id)

    @property
    def _secure(self) -> bool:
        """``secagg.enabled``: the server learns only the sum of the ``(dy_i, dc_i)``."""
        return bool(self.engine and self.engine.secagg)

    @property
    def _central(self) -> bool:
        """``privacy.mechanism: central``: ``c`` takes the noisy sum of clipped deltas."""
        return self.privacy is not None and self.privacy.settings.mechanism == "central"

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        self._summed = set()
        result = super().aggregate_train(server_round, replies)
        accepted = set(self.report.accepted)
        if self._secure:  # dc_i counted in the masked uploads; a client whose dc_i c lacks goes back
            self._revert.update(dict.fromkeys(set(self.report.sampled) - self._summed, server_round))
        else:
            self.report.bytes_up += sum(self._deltas[pid][1] for pid in accepted)
        self._in_sync = (self._in_sync - set(self.report.sampled)) | accepted
        return result

    def observe(self, server_round: int, accepted: list[ClientUpdate]) -> None:
        """``c`` and the server's copy of each ``c_i`` take the accepted deltas, also in a
        round skipped for too few replies (those clients have moved their ``c_i``). Under
        central DP ``c`` takes the noisy sum instead (:meth:`private_aggregate`); under secure
        aggregation the server sees no ``dc_i`` (:meth:`secure_aggregate`)."""
        if not accepted or self._secure:
            return
        deltas = torch.stack([self._deltas[u.partition_id][0] for u in accepted])
        if not self._central:
            self.control = scaffold_control_step(self.control, deltas, self.num_clients)
        for u, delta in zip(accepted, deltas, strict=True):
            self.local_controls[u.partition_id] = self.local_controls.get(
                u.partition_id, torch.zeros_like(delta)) + delta

    def aggregate_updates(self, server_round: int, updates: list[ClientUpdate]) -> torch.Tensor:
        return scaffold_model_update(torch.stack([u.update for u in updates]))

    def _joint(self, updates: list[ClientUpdate]) -> torch.Tensor:
        """The rows ``(dy_i, dc_i)``, shape ``(|S|, 2 D)``."""
        return torch.stack([torch.cat([u.update, self._deltas[u.partition_id][0].to(u.update.dtype)])
                            for u in updates])

    def private_aggregate(self, server_round: int, updates: list[ClientUpdate]) -> torch.Tensor:
        """SCAFFOLD under central DP: each client's joint vector ``v_i = (dy_i, dc_i)`` is
        clipped to ``C`` (``privacy.clip_norm``) on the server, as fedsim's DP-FedAvg clips,
        and one Gaussian noise vector goes on their sum (:meth:`ServerPrivacy.noisy_sum`)::

            s = sum_{i in S} clip(v_i, C) + N(0, (z S_C)^2 I_{2D})
            x <- x + eta_g s_dy / m,        c <- c + s_dc / N

        with ``m`` the expected clients per round (DP-FedAvg's fixed denominator; the plain
        mean's ``|S|`` would tell who took part) and ``S_C = C`` (``2 C`` under fixed-size
        sampling). One client moves ``s`` by at most ``C``, so the pair of means
        ``(s_dy / m, s_dc / N)`` has sensitivity at most ``C / m`` (``N >= m``): the model
        update carries noise of std ``z S_C / m`` per coordinate, ``c``'s step ``z S_C / N``, and
        both are post-processing of the one release accounted per round. Each client keeps its
        own unclipped ``c_i`` (its data, never released), so ``c`` is the mean of the
        ``c_i`` only up to the clipping and the noise."""
        total = self.privacy.noisy_sum(server_round, self._joint(updates))
        dim = self.spec.dim
        self.control = scaffold_control_step(self.control, total[None, dim:], self.num_clients)
        return total[:dim] / self.privacy.sampling.expected_clients

    def sum_coefficients(self, server_round: int, updates: list[ClientUpdate]) -> torch.Tensor:
        """``1 / |S|``: SCAFFOLD's model update is the plain mean (secure aggregation, which
        sums ``dc_i`` beside it: :meth:`secure_aggregate`)."""
        return torch.full((len(updates),), 1.0 / len(updates), dtype=torch.float64)

    def secure_aggregate(self, server_round: int, updates: list[ClientUpdate],
                         privacy: ServerPrivacy | None) -> torch.Tensor | None:
        """SCAFFOLD under secure aggregation: the joint vectors ``(dy_i, dc_i)`` go through one
        masked modular sum, so the server learns only ``mean(dy)`` and ``sum(dc)`` over the
        clients whose input entered it (``n`` of them)::

            x <- x + eta_g mean_i dy_i,        c <- c + n mean_i dc_i / N

        The masked uploads (``2 D`` values each) count in ``bytes_up`` in place of the
        update's and ``dc_i``'s payloads. The server keeps no copy of the ``c_i`` (it never
        sees one): a client sampled in a round whose ``dc_i`` did not enter ``c`` (a failed
        reply, a withheld input, a skipped or refused round) is told so in its next training
        message (:data:`REVERT_KEY`) and takes back the ``c_i`` it kept from before that round,
        so ``c`` stays the mean of the ``c_i``."""
        joint = [dataclasses.replace(u, update=row) for u, row in zip(updates, self._joint(updates), strict=True)]
        total = super().secure_aggregate(server_round, joint, privacy)
        if total is None:
            return None
        self._summed = {u.partition_id for u in updates} - set(self.engine.secagg.withheld)
        dim = self.spec.dim
        self.control = scaffold_control_step(self.control, total[None, dim:] * len(self._summed), self.num_clients)
        return total[:dim]

    def state_dict(self) -> dict:
        return {**super().state_dict(), "scaffold_control": self.control,
                "scaffold_local_controls": dict(self.local_controls), "scaffold_in_sync": sorted(self._in_sync),
                "scaffold_contacted": sorted(self._contacted),
                "scaffold_revert": {str(c): r for c, r in self._revert.items()}}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.control = state["scaffold_control"]
        self.local_controls = dict(state["scaffold_local_controls"])
        self._in_sync = set(state.get("scaffold_in_sync", ()))
        self._contacted = set(state.get("scaffold_contacted", ()))
        self._revert = {int(c): int(r) for c, r in state.get("scaffold_revert", {}).items()}

    def clients_lost_state(self) -> None:
        """Every client is sent its ``c_i`` again with its next training message."""
        super().clients_lost_state()
        self._in_sync.clear()

"""SCAFFOLD client side: the control-variate correction of every local gradient, and the
client's control variate ``c_i``, kept in its Flower ``Context.state``.

Reference
---------
S. P. Karimireddy, S. Kale, M. Mohri, S. J. Reddi, S. U. Stich, A. T. Suresh, "SCAFFOLD:
Stochastic Controlled Averaging for Federated Learning", ICML 2020, arXiv 1910.06378,
Algorithm 1 with option II. The server half is :mod:`fedsim.strategies.scaffold`.

Definition implemented
----------------------
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

The correction is a pure tensor operation on the gradients, so a backend that trains many
clients at once applies the same formula to stacked gradients and control variates.
Control variates are flat vectors in the model's :class:`~fedsim.params.ParamSpec` layout;
entries of buffers (BatchNorm statistics, which have no gradient) stay 0.
"""

from __future__ import annotations

from collections.abc import MutableMapping, Sequence

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, RecordDict
from torch import nn

from fedsim.clients.hooks import ClientHook
from fedsim.clients.local_steps import momentum_steps
from fedsim.config import ClientConfig
from fedsim.params import ParamSpec
from fedsim.quant import codecs

__all__ = ["ScaffoldControl", "control_variate_update", "corrected_gradients"]

CONTROL_RECORD = "scaffold-control"
"""Message record of the server's control variate ``c``."""
LOCAL_RECORD = "scaffold-local-control"
"""Message record of the client's own ``c_i`` as the server holds it (resent after a resume
or a failed reply; the client adopts it)."""
DELTA_RECORD = "scaffold-delta"
"""Reply record of the client's ``dc_i = c_i+ - c_i``."""

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


def state_key(partition_id: int) -> str:
    """Where client ``partition_id`` keeps ``c_i`` in its Context state."""
    return f"scaffold-control-{partition_id}"


class ScaffoldCorrection(ClientHook):
    """The correction as a client hook: ``before_step`` replaces each parameter's gradient by
    :func:`corrected_gradients` of it.

    Parameters
    ----------
    c_local, c_global : dict of str to torch.Tensor
        ``c_i`` and ``c`` per parameter name.
    """

    def __init__(self, c_local: dict[str, torch.Tensor], c_global: dict[str, torch.Tensor]) -> None:
        self.c_local = c_local
        self.c_global = c_global

    def before_step(self, model: nn.Module) -> None:
        params = [(n, p) for n, p in model.named_parameters() if p.grad is not None and n in self.c_local]
        new = corrected_gradients([p.grad for _, p in params],
                                  [self.c_local[n].to(p.grad.device) for n, p in params],
                                  [self.c_global[n].to(p.grad.device) for n, p in params])
        for (_, p), grad in zip(params, new, strict=True):
            p.grad.copy_(grad)


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
    """

    def __init__(self, c_global: torch.Tensor, c_local: torch.Tensor, spec: ParamSpec, partition_id: int) -> None:
        if c_global.shape != (spec.dim,) or c_local.shape != (spec.dim,):
            raise ValueError(f"scaffold: control variates of shapes {tuple(c_global.shape)} and "
                             f"{tuple(c_local.shape)}; the model has ({spec.dim},)")
        self.c_global, self.c_local, self.spec, self.partition_id = c_global, c_local, spec, partition_id

    @classmethod
    def from_content(cls, content: RecordDict, state: MutableMapping, spec: ParamSpec,
                     partition_id: int) -> ScaffoldControl | None:
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
        elif state_key(partition_id) in state:
            c_local = decode_vector(state[state_key(partition_id)])
        else:
            c_local = torch.zeros(spec.dim)
        return cls(c_global, c_local, spec, partition_id)

    def hook(self, model: nn.Module) -> ScaffoldCorrection:
        """The gradient correction for ``model``'s parameters (those of the flat layout:
        a quantized model's step sizes are not part of the federated model)."""
        names = {n for n, _ in model.named_parameters()} & set(self.spec.names)
        local, glob = self.spec.unflatten(self.c_local), self.spec.unflatten(self.c_global)
        return ScaffoldCorrection({n: local[n] for n in names}, {n: glob[n] for n in names})

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
        c_new = control_variate_update(self.c_local, self.c_global, update, steps, client.lr, client.momentum)
        c_new = c_new * self.spec.parameter_mask()
        state[state_key(self.partition_id)] = encode_vector(c_new)[0]
        return encode_vector(c_new - self.c_local)[0]

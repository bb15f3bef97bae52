"""SCAFFOLD server side: the global model and the server control variate ``c``.

Reference
---------
S. P. Karimireddy, S. Kale, M. Mohri, S. J. Reddi, S. U. Stich, A. T. Suresh, "SCAFFOLD:
Stochastic Controlled Averaging for Federated Learning", ICML 2020, arXiv 1910.06378,
Algorithm 1 (option II). The client half is :mod:`fedsim.clients.scaffold`.

Definition implemented
----------------------
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
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

from fedsim.clients.scaffold import CONTROL_RECORD, DELTA_RECORD, LOCAL_RECORD, encode_vector
from fedsim.strategies.aggregate import check_updates
from fedsim.strategies.base import FedsimStrategy
from fedsim.strategies.replies import (
    IDENTITY,
    ClientUpdate,
    Failure,
    decode_record,
    screen_replies,
    screen_train_reply,
)

__all__ = ["Scaffold", "scaffold_control_step", "scaffold_model_update"]


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


class Scaffold(FedsimStrategy):
    """Flower adapter of SCAFFOLD (see the module docstring).

    Parameters
    ----------
    exp : ExperimentConfig
        ``strategy.server_opt.lr`` is the global learning rate ``eta_g`` (1 by default);
        ``client.lr`` and ``client.momentum`` enter the clients' option II update.
    """

    def __init__(self, exp, spec, node_of, sampler) -> None:
        super().__init__(exp, spec, node_of, sampler)
        self.control = torch.zeros(spec.dim)
        self.local_controls: dict[int, torch.Tensor] = {}
        self._in_sync: set[int] = set()
        self._contacted: set[int] = set()
        self._deltas: dict[int, tuple[torch.Tensor, int]] = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        messages = list(super().configure_train(server_round, arrays, config, grid))
        record, control_bytes = encode_vector(self.control)
        for msg in messages:
            pid = self._sent[msg.metadata.dst_node_id]
            msg.content[CONTROL_RECORD] = record
            self.report.bytes_down += control_bytes
            if pid not in self._in_sync and (pid in self.local_controls or pid in self._contacted):
                local, local_bytes = encode_vector(self.local_controls.get(pid, torch.zeros_like(self.control)))
                msg.content[LOCAL_RECORD] = local
                self.report.bytes_down += local_bytes
            self._contacted.add(pid)
        return messages

    def screen(self, replies: list[Message]) -> tuple[list[ClientUpdate], list[Failure]]:
        """Training replies need a finite ``dc_i`` of the model's size beside the update."""
        self._deltas = {}

        def screen_one(msg: Message, pid: int) -> ClientUpdate | Failure:
            result = screen_train_reply(msg, pid, self.spec.dim, self.uplink)
            if isinstance(result, Failure):
                return result
            delta = decode_record(msg, pid, DELTA_RECORD, self.spec.dim, IDENTITY)
            if isinstance(delta, Failure):
                return delta
            self._deltas[pid] = delta
            return result

        return screen_replies(replies, self._sent, screen_one)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        result = super().aggregate_train(server_round, replies)
        accepted = set(self.report.accepted)
        self.report.bytes_up += sum(self._deltas[pid][1] for pid in accepted)
        self._in_sync = (self._in_sync - set(self.report.sampled)) | accepted
        return result

    def observe(self, server_round: int, accepted: list[ClientUpdate]) -> None:
        """``c`` and the server's copy of each ``c_i`` take the accepted deltas, also in a
        round skipped for too few replies (those clients have moved their ``c_i``)."""
        if not accepted:
            return
        deltas = torch.stack([self._deltas[u.partition_id][0] for u in accepted])
        self.control = scaffold_control_step(self.control, deltas, self.num_clients)
        for u, delta in zip(accepted, deltas, strict=True):
            self.local_controls[u.partition_id] = self.local_controls.get(
                u.partition_id, torch.zeros_like(delta)) + delta

    def aggregate_updates(self, server_round: int, updates: list[ClientUpdate]) -> torch.Tensor:
        return scaffold_model_update(torch.stack([u.update for u in updates]))

    def state_dict(self) -> dict:
        return {**super().state_dict(), "scaffold_control": self.control,
                "scaffold_local_controls": dict(self.local_controls), "scaffold_in_sync": sorted(self._in_sync),
                "scaffold_contacted": sorted(self._contacted)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.control = state["scaffold_control"]
        self.local_controls = dict(state["scaffold_local_controls"])
        self._in_sync = set(state.get("scaffold_in_sync", ()))
        self._contacted = set(state.get("scaffold_contacted", ()))

    def clients_lost_state(self) -> None:
        """Every client is sent its ``c_i`` again with its next training message."""
        super().clients_lost_state()
        self._in_sync.clear()

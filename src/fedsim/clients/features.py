"""Client-side features: what an algorithm or a training feature adds to a client's call.

A :class:`ClientFeature` declares, for the client runtime (:mod:`fedsim.sim.client_app`)
to compose, with no name of a feature known there:

- ``hooks``: training hooks (:mod:`fedsim.clients.hooks`: loss terms, gradient transforms)
  for one client, and ``stacked_hooks`` for K clients trained as one stack by the batched
  backend;
- ``key``: clients whose every feature gives equal keys may train in one stack;
- ``stacked_reason``: why this feature's clients cannot train stacked at all (None: they can);
- ``train_set``: the data the client trains on (a data-poisoning attack flips labels);
- ``start``: the parameters the client trains from, given the global ones (a personal head
  in place of the global one);
- ``sent_update``: the update the client sends, given its trained one (personal coordinates
  kept by the client and zeroed);
- ``finish``: after training, records added to the reply (SCAFFOLD's ``dc_i``), from the
  update the client sends, with the client's own state updated;
- ``personal_run``: more training of the client's own after its global update, as a
  :class:`PersonalRun` the runtime trains (Ditto's personal model; the batched backend
  trains the runs of a stack as one stack where their hooks have a stacked form);
- ``personal_model``: the client's personalised model, or the :class:`PersonalRun` that
  trains it (FedAvg-FT's fine-tuning), which evaluation scores beside the global one
  (``personal_accuracy``);
- ``state_keys``: the keys of the per-client state it keeps in the client's Context state,
  which checkpoints carry.

Algorithms declare theirs as their ``client`` attribute (:mod:`fedsim.algorithms.api`);
fedsim's own training features, and the composition of a run's features, are in
:mod:`fedsim.clients.training_features`; third-party ones register in the entry-point group
``fedsim.client_features``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Iterable, MutableMapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedsim.clients.hooks import ClientHook

if TYPE_CHECKING:
    from fedsim.config import ExperimentConfig
    from fedsim.data import ArrayDataset
    from fedsim.params import ParamSpec

@dataclasses.dataclass
class PersonalRun:
    """A local training run of a client's own model on its train split: from the full state
    dict ``start``, with ``hooks``, for ``steps`` optimizer steps (None: the client's configured
    steps), seeded from (run seed, ``purpose``, round, partition id); the runtime's own loop,
    optimizer and loss. ``keep(trained)`` receives the trained state dict (None: nothing to keep).
    Runs of equal ``purpose`` and ``steps`` whose hooks stack (:meth:`ClientHook.stack`) train as
    one stack in the batched backend."""

    start: dict[str, torch.Tensor]
    hooks: tuple[ClientHook, ...]
    steps: int | None
    purpose: str
    keep: Callable[[dict[str, torch.Tensor]], None] | None = None


@dataclasses.dataclass
class ClientContext:
    """One client's training call, as features see it.

    Attributes
    ----------
    cfg : ExperimentConfig
        The experiment.
    partition_id : int
        The client.
    server_round : int
        The round (or, in the asynchronous loops, the client's dispatch count).
    content : RecordDict
        The training message's content (arrays, config, the algorithm's own records).
    state : MutableMapping
        The client's own Context state (its slice, on a node serving several clients).
    spec : ParamSpec
        The federated model's flat layout.
    scratch : dict
        Room for a feature to keep what its ``hooks`` computed until its ``finish``.
    train_loss : callable, optional
        ``train_loss(state) -> float``: the mean cross-entropy of the model with the full state
        dict ``state`` on the client's train split, in eval mode (IFCA's cluster choice).
    """

    cfg: ExperimentConfig
    partition_id: int
    server_round: int
    content: RecordDict
    state: MutableMapping
    spec: ParamSpec
    scratch: dict[str, Any] = dataclasses.field(default_factory=dict)
    train_loss: Callable[[dict[str, torch.Tensor]], float] | None = None

    @property
    def config(self) -> ConfigRecord:
        return self.content["config"]


class ClientFeature:
    """A client-side feature; every method's default adds nothing (see the module docstring).

    A training feature (fedsim's own, or a third-party one registered in the entry-point group
    ``fedsim.client_features``) is constructed with the experiment config when
    ``applies(cfg)``; its ``rules(cfg)`` are checked by ``fedsim validate`` beside the generic
    ones, each problem one line naming both keys. An algorithm's client half is an instance
    its algorithm holds, and its rules are the algorithm's.
    """

    state_keys: ClassVar[tuple[str, ...]] = ()
    stacked_only: bool = False
    """Whether its hooks work stacked only: a client alone in its group trains as a stack of one."""

    @staticmethod
    def applies(cfg: ExperimentConfig) -> bool:
        """Whether a run of ``cfg`` uses this (training) feature."""
        return False

    @classmethod
    def rules(cls, cfg: ExperimentConfig) -> Iterable[str | None]:
        """What cannot combine with this feature: ``None`` or one line naming both keys each."""
        return ()

    def stacked_reason(self, cfg: ExperimentConfig) -> str | None:
        """Why clients with this feature train one at a time, or None when they stack."""
        return None

    def key(self, ctx: ClientContext) -> Hashable:
        """Clients of equal keys (for every feature) get the same stacked hooks."""
        return None

    def hooks(self, ctx: ClientContext, start: dict[str, torch.Tensor]) -> tuple[ClientHook, ...]:
        """Hooks for one client; ``start`` holds detached copies of the parameters it starts from."""
        return ()

    def stacked_hooks(self, ctxs: Sequence[ClientContext], start: dict[str, torch.Tensor]) -> tuple[ClientHook, ...]:
        """Hooks for clients trained as one stack (equal keys), rows in ``ctxs``'s order;
        ``start`` is stacked ``(K, *shape)``. By default the first client's hooks, whose
        stacked forms compute every row."""
        return self.hooks(ctxs[0], start)

    def start(self, ctx: ClientContext, start: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The full state dict this client trains from, given the global one (never changed
        in place: clients of one delivery share it)."""
        return start

    def train_set(self, ctx: ClientContext, data: ArrayDataset) -> ArrayDataset:
        """The data this client trains on."""
        return data

    def finish(self, ctx: ClientContext, update: torch.Tensor, steps: int) -> dict[str, ArrayRecord | MetricRecord]:
        """Records to add to the reply, given the flat update the client sends (after every
        ``sent_update``) and its local steps."""
        return {}

    def sends_records(self) -> bool:
        """Whether this client half adds records of its own to the reply (:meth:`finish`
        overridden): what the server then reads besides the update, which privacy and
        secure aggregation must cover too."""
        return type(self).finish is not ClientFeature.finish

    def sent_update(self, ctx: ClientContext, update: torch.Tensor) -> torch.Tensor:
        """The flat update the client sends, given its trained one (before every ``finish``)."""
        return update

    def personal_run(self, ctx: ClientContext) -> PersonalRun | None:
        """More local training of the client's own after its global update (e.g. a personal model)."""
        return None

    def personal_model(self, ctx: ClientContext, global_state: dict[str, torch.Tensor]
                       ) -> dict[str, torch.Tensor] | PersonalRun | None:
        """The client's personalised model (a full state dict) for evaluation, the run that
        trains it (its result is the model), or None."""
        return None

"""What an algorithm plug-in declares: its arguments, its family, its client half, its rules.

An algorithm is one module. It defines a config section (a subclass of
:class:`SyncStrategyBase`, :class:`AsyncStrategyBase` or :class:`StrategySection`) that
holds its own arguments, and one class that implements :class:`Algorithm`:

- a synchronous algorithm's class is its server half: a Flower Message-API strategy
  (a subclass of :class:`fedsim.strategies.base.FedsimStrategy`), the same class a plain
  Flower app imports from :mod:`fedsim.flower`;
- an asynchronous algorithm's class is a rule of the asynchronous loop
  (:class:`fedsim.strategies.asynchronous.AsyncRule`);
- a decentralised algorithm's class serves the gossip loop;
- an algorithm of the ``custom`` family brings its own server loop (``loop``), for work that
  is not a round of client training (sequential gradient coding simulates its workers).

Its client half (``client``, a :class:`fedsim.clients.features.ClientFeature`) adds
training hooks, keeps per-client state, and says whether it trains stacked. Its
``rules(cfg)`` are checked by ``fedsim validate`` beside the generic ones. The class is
registered under ``name`` in the entry-point group ``fedsim.algorithms``
(:mod:`fedsim.algorithms.registry`); nothing outside its module names it.

This module imports neither torch nor the simulation layer: configs validate without them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, model_validator

from fedsim.sections import Section

if TYPE_CHECKING:
    from fedsim.clients.features import ClientFeature
    from fedsim.config import ExperimentConfig

Family = Literal["sync", "async", "gossip", "custom"]

BACKENDS: dict[str, tuple[str, ...]] = {
    "sync": ("inprocess", "batched", "ray", "deployment"),
    "async": ("inprocess", "batched", "ray", "deployment (wall clock)"),
    "gossip": ("inprocess", "batched", "ray", "deployment (server-relayed)"),
    "custom": ("inprocess", "batched", "ray"),
}
"""Where each family's server loop runs."""


class ServerOptConfig(Section):
    """Server optimizer applied to the aggregated update (FedAvgM; FedAdam, FedAdagrad and
    FedYogi, Reddi et al. 2021; :mod:`fedsim.strategies.server_opt`).

    ``lr`` unset takes the optimizer's own default (:data:`SERVER_LR`): 1.0 for sgd (FedAvg)
    and momentum (FedAvgM); 0.01 for adam (fedsim's choice: Flower's FedAdam defaults to
    ``eta`` 0.1); 0.01 for yogi and 0.1 for adagrad (Flower's FedYogi and FedAdagrad
    defaults). ``beta1`` 0.9, ``beta2`` 0.99 and ``eps`` 1e-3 are Flower's ``beta_1``,
    ``beta_2`` and ``tau`` for FedAdam and FedYogi; Flower's FedAdagrad fixes ``beta_1`` at 0
    where fedsim's adagrad keeps 0.9, the paper's momentum (``beta1: 0`` gives Flower's).
    Flower's FedAdam corrects its step for bias, lr * sqrt(1 - b2^(t+1)) / (1 - b1^(t+1)) in
    round t; fedsim's adam does with ``bias_correction: true`` (off by default). Flower's
    ``eta_l`` (client learning rate; 0.1, 0.0316 for FedYogi) is ``client.lr`` here. The
    adaptive ones divide by sqrt(v): their step is about lr per coordinate whatever the
    update's scale, so FedAvg's 1.0 makes them diverge; Reddi et al. ("Adaptive Federated
    Optimization", arXiv 2003.00295, Fig. 2 and App. D) find their best server learning rates
    between 10^-2.5 and 10^-1 (Adagrad's a little higher).
    """

    SERVER_LR: ClassVar[dict[str, float]] = {"sgd": 1.0, "momentum": 1.0, "adam": 0.01, "yogi": 0.01,
                                             "adagrad": 0.1}
    # the fields besides lr that each optimizer reads; another one set off its default is refused
    READS: ClassVar[dict[str, tuple[str, ...]]] = {
        "sgd": (), "momentum": ("momentum",), "adam": ("beta1", "beta2", "eps", "bias_correction"),
        "yogi": ("beta1", "beta2", "eps"), "adagrad": ("beta1", "eps")}

    name: Literal["sgd", "momentum", "adam", "adagrad", "yogi"] = "sgd"
    lr: float = Field(1.0, gt=0, description="unset: 1.0 for sgd and momentum, 0.01 for adam and yogi, "
                                             "0.1 for adagrad")
    momentum: float = Field(0.9, ge=0, lt=1)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.99, ge=0, lt=1)
    eps: float = Field(1e-3, gt=0)
    bias_correction: bool = Field(False, description="adam: Flower's FedAdam step, "
                                                     "lr * sqrt(1 - beta2^(t+1)) / (1 - beta1^(t+1)) at step t")

    @model_validator(mode="before")
    @classmethod
    def _default_lr(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("lr") is None:
            name = data.get("name", "sgd")
            data = {**data, "lr": cls.SERVER_LR.get(name, 1.0)} if isinstance(name, str) else data
        return data

    @model_validator(mode="after")
    def _only_what_the_optimizer_reads(self) -> ServerOptConfig:
        unread = [f"server_opt.{field} {value}" for field in type(self).model_fields
                  if field not in ("name", "lr", *self.READS[self.name])
                  and (value := getattr(self, field)) != type(self).model_fields[field].default]
        if unread:
            verb, pronoun = ("is", "it") if len(unread) == 1 else ("are", "them")
            raise ValueError(f"{', '.join(unread)} {verb} not read by server_opt.name {self.name}; "
                             f"leave {pronoun} unset")
        return self


class StrategySection(Section):
    """Base of every algorithm's config section (``strategy:`` in an experiment)."""

    family: ClassVar[Family]
    name: str


class SyncStrategyBase(StrategySection):
    """Fields every synchronous strategy shares."""

    family: ClassVar[Family] = "sync"
    fraction_train: float = Field(1.0, gt=0, le=1)
    fraction_evaluate: float = Field(1.0, ge=0, le=1, description="0 turns federated eval off")
    min_successful: int = Field(1, ge=1, description="fewer valid replies skip the round")
    server_opt: ServerOptConfig = ServerOptConfig()


class AsyncStrategyBase(StrategySection):
    """Fields of the asynchronous strategies (virtual clock; see fedsim.loops.asynchronous).

    Times are in units of the slowest client's time for one local update, so a run with
    ``horizon: 20`` takes as long as 20 rounds of synchronous FedAvg waiting for the slowest.
    """

    family: ClassVar[Family] = "async"
    horizon: float = Field(20.0, gt=0, description="virtual time budget")
    eval_every: float = Field(1.0, gt=0, description="virtual time between evaluations")


class Algorithm:
    """The declarations every registered algorithm makes (class attributes).

    Attributes
    ----------
    name : str
        The name users write as ``strategy.name`` (and the entry point's name).
    Config : type of StrategySection
        Its config section: its own arguments, their defaults and ranges.
    description : str
        One line for ``fedsim algorithms``.
    client : ClientFeature or None
        Its client half, or None when clients train plainly.
    sgd_steps : str or None
        What its math reads of plain SGD client steps, if anything (refuses other optimizers).
    reads_round_replies : str or None
        How its aggregation reads the round's own replies, if it does (refuses EF21-PP,
        which aggregates every client's stale estimate instead).
    requires : dict
        Settings of other sections it needs to run at all (FedKA: ``partition.scheme:
        domains``), which ``fedsim algorithms`` adds to the base experiment it probes.
    loop : callable or None
        The ``custom`` family's server loop, ``loop(grid, cfg, run, resume, show_progress)
        -> summary``, called as :mod:`fedsim.runner` calls the other families' loops.
    """

    name: ClassVar[str]
    Config: ClassVar[type[StrategySection]]
    description: ClassVar[str] = ""
    client: ClassVar[ClientFeature | None] = None
    sgd_steps: ClassVar[str | None] = None
    reads_round_replies: ClassVar[str | None] = None
    requires: ClassVar[dict[str, Any]] = {}
    loop: ClassVar[Callable[..., dict[str, Any]] | None] = None

    @classmethod
    def family(cls) -> Family:
        return cls.Config.family

    @classmethod
    def sends_client_records(cls) -> bool:
        """Whether its clients send records of their own beside the update (SCAFFOLD's control
        variate delta): :meth:`fedsim.clients.features.ClientFeature.sends_records`."""
        return cls.client is not None and cls.client.sends_records()

    @classmethod
    def rules(cls, cfg: ExperimentConfig) -> Iterable[str | None]:
        """This algorithm's own combination rules: ``None`` or one line naming both keys each."""
        return ()

    @classmethod
    def participation_revealed(cls, cfg: ExperimentConfig) -> str | None:
        """Why this algorithm's aggregate depends on which clients took part in earlier rounds,
        or None. Central DP then claims no amplification by sampling (which assumes a round's
        participation hidden): it accounts participation as public."""
        return None

    @classmethod
    def backends(cls) -> tuple[str, ...]:
        """Where it runs; under ``batched`` its clients train stacked unless its client half
        says otherwise."""
        return BACKENDS[cls.family()]

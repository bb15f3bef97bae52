"""The Flower FedAvg that fedsim's strategies for Flower apps extend.

:class:`ScreenedFedAvg` is Flower's own ``flwr.serverapp.strategy.FedAvg``, with the same
constructor arguments, sampling, messages and ``start``, and two changes:

- every reply is screened on its own (:mod:`fedsim.flower.screening`): a bad one is dropped
  with a logged warning and the round goes on, where Flower's consistency check would end
  the run;
- aggregation works on the clients' *updates*. The global arrays sent in
  ``configure_train`` are remembered; each accepted reply's floating-point arrays minus
  them, flattened, is one row ``Delta_i`` of an ``(N, D)`` tensor (float32, or float64
  when the model has float64 arrays, so no precision is lost); a subclass's
  :meth:`ScreenedFedAvg.aggregate_updates` turns that into one ``(D,)`` update (a fedsim
  pure function), and :meth:`ScreenedFedAvg.apply_update` adds it to the global model.
  Rules that are not translation-equivariant (the Flag Aggregator normalises each update,
  FedLD takes its SVD, FedAU scales by 1/N) need the updates, not the models that Flower's
  FedAvg averages. Integer arrays (BatchNorm's ``num_batches_tracked``) are not aggregated:
  they keep the global model's value, as in fedsim's engine. The new arrays have the global
  model's keys, order and dtypes.

The clients of a Flower app do not change: they reply with their trained arrays in one
ArrayRecord and a MetricRecord holding ``weighted_by_key``, as for Flower's FedAvg.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log
from pydantic import BaseModel, ValidationError

from fedsim.config import format_validation_error
from fedsim.flower.screening import screen_evaluate_replies, screen_train_replies
from fedsim.params import ParamSpec
from fedsim.strategies.aggregate import weighted_mean

__all__ = ["ScreenedFedAvg", "StackedUpdates", "check_settings", "float_layout"]


def check_settings(section: type[BaseModel], owner: str, **values: Any) -> None:
    """Validate a strategy's own arguments with the fedsim config section that defines the
    same keys (one place for their ranges), or raise one ``ValueError`` naming them."""
    try:
        section(**values)
    except ValidationError as exc:
        raise ValueError(f"{owner}: {'; '.join(format_validation_error(exc).splitlines())}") from None


def float_layout(arrays: ArrayRecord) -> tuple[ParamSpec, torch.dtype]:
    """Names and shapes of the floating-point arrays of ``arrays`` in their order, and the
    dtype to aggregate them in: float64 if one of them is float64, else float32."""
    floats = [(name, tuple(array.shape)) for name, array in arrays.items() if np.dtype(array.dtype).kind == "f"]
    wide = any(np.dtype(arrays[name].dtype) == np.float64 for name, _ in floats)
    spec = ParamSpec(tuple(name for name, _ in floats), tuple(shape for _, shape in floats))
    return spec, torch.float64 if wide else torch.float32


def _flatten(spec: ParamSpec, arrays: dict[str, np.ndarray], dtype: torch.dtype) -> torch.Tensor:
    """The floating-point arrays of ``spec`` concatenated into one ``(D,)`` vector of ``dtype``."""
    return torch.cat([torch.as_tensor(arrays[name]).reshape(-1).to(dtype) for name in spec.names])


@dataclass(frozen=True)
class StackedUpdates:
    """The accepted updates of one round, ready for a pure aggregation function.

    Attributes
    ----------
    node_ids : list of int
        The Flower node of each row, ascending.
    updates : torch.Tensor
        ``(N, D)``, row ``i`` is ``Delta_i = w_i - w`` (trained minus global); float32, or
        float64 when the model has float64 arrays.
    weights : torch.Tensor
        ``(N,)`` float64, each reply's ``weighted_by_key`` value.
    model : torch.Tensor
        ``(D,)``, the global model ``w`` the round started from, dtype of ``updates``.
    spec : ParamSpec
        The layout of ``D``: names and shapes of the global model's floating-point arrays.
    """

    node_ids: list[int]
    updates: torch.Tensor
    weights: torch.Tensor
    model: torch.Tensor
    spec: ParamSpec


class ScreenedFedAvg(FedAvg):
    """Flower's FedAvg with per-reply screening, aggregating the clients' updates.

    Takes exactly the arguments of ``flwr.serverapp.strategy.FedAvg`` (``fraction_train``,
    ``fraction_evaluate``, ``min_train_nodes``, ``min_evaluate_nodes``,
    ``min_available_nodes``, ``weighted_by_key``, ``arrayrecord_key``, ``configrecord_key``,
    ``train_metrics_aggr_fn``, ``evaluate_metrics_aggr_fn``), positionally or by keyword.
    Its own aggregation is FedAvg's example-weighted mean of the updates
    (:func:`fedsim.strategies.aggregate.weighted_mean`), which equals Flower's weighted mean
    of the models; subclasses override :meth:`aggregate_updates`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._global: ArrayRecord | None = None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Flower's FedAvg sampling and messages; the arrays sent are kept to form updates."""
        self._global = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_updates(self, server_round: int, stacked: StackedUpdates) -> torch.Tensor | None:
        """Combine the round's updates into one ``(D,)`` update: the weighted mean here.

        A subclass returns ``None`` (after logging why) when its rule cannot aggregate this
        round's replies; the global model then stays as it is.
        """
        return weighted_mean(stacked.updates, stacked.weights)

    def apply_update(self, model: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        """The new global model from the old one and the aggregated update: ``w + delta``."""
        return model + update

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen the replies, aggregate the accepted updates, aggregate their metrics with
        ``train_metrics_aggr_fn``. With no usable reply (or a rule that cannot aggregate the
        ones there are) the global model stays as it is."""
        if self._global is None:
            raise RuntimeError(f"{type(self).__name__}.aggregate_train: no global arrays; "
                               "configure_train sends them, call it first (strategy.start does)")
        replies = list(replies)
        accepted, rejected = screen_train_replies(replies, self._global, self.weighted_by_key)
        log(INFO, "aggregate_train: %d replies accepted, %d dropped", len(accepted), len(rejected))
        if not accepted:
            log(WARNING, "round %d: no usable training reply; the global model is unchanged", server_round)
            return None, None
        spec, dtype = float_layout(self._global)
        if not spec.names:
            raise ValueError(f"{type(self).__name__}.aggregate_train: the global arrays hold no floating-point "
                             "array to aggregate")
        model = _flatten(spec, {name: self._global[name].numpy() for name in spec.names}, dtype)
        stacked = StackedUpdates(
            node_ids=[reply.node_id for reply in accepted],
            updates=torch.stack([_flatten(spec, reply.arrays, dtype) for reply in accepted]) - model,
            weights=torch.tensor([reply.weight for reply in accepted], dtype=torch.float64),
            model=model,
            spec=spec,
        )
        update = self.aggregate_updates(server_round, stacked)
        metrics = self.train_metrics_aggr_fn([reply.content for reply in accepted], self.weighted_by_key)
        if update is None:
            return None, metrics
        return self._pack(spec, self.apply_update(model, update)), metrics

    def _pack(self, spec: ParamSpec, vector: torch.Tensor) -> ArrayRecord:
        """The global arrays with their floating-point entries replaced from ``vector``."""
        values = spec.unflatten(vector)
        packed = {}
        for name, array in self._global.items():
            if name in values:
                packed[name] = Array(np.ascontiguousarray(values[name].numpy().astype(np.dtype(array.dtype))))
            else:
                packed[name] = array
        return ArrayRecord(packed)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Screen the replies and aggregate the accepted ones with ``evaluate_metrics_aggr_fn``."""
        accepted, rejected = screen_evaluate_replies(list(replies), self.weighted_by_key)
        log(INFO, "aggregate_evaluate: %d replies accepted, %d dropped", len(accepted), len(rejected))
        if not accepted:
            return None
        return self.evaluate_metrics_aggr_fn([reply.content for reply in accepted], self.weighted_by_key)

"""Clients never seen in training (``eval.new_clients``): a held-out fraction of the clients
that no round samples, evaluated each time the others are, after personalising from the
global model as their method does.

PFLlib's protocol for new clients (Zhang et al., "PFLlib: Personalized Federated Learning
Algorithm Library", arXiv 2312.04992): a client that took no part in training adapts the
global model on its own train split, then is scored on its test split. In fedsim a new
client runs what one training round of its method runs (from the global model, with a state
of its own that it then forgets: fedper's and fedrep's head, ditto's and apfl's personal
model, ifca's cluster choice), and is scored with the personal model that leaves it
(finetune: ``finetune_steps`` of fine-tuning); without a personalization method it is scored
with the global model only. Their rows are the evaluation's keys with the prefix ``new_``
(``new_federated_accuracy``, ``new_client_accuracy_p50``, ``new_personal_accuracy_mean``, ...).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedsim.seeding import derive_seed
from fedsim.strategies.evaluation import ClientEvaluation, federated_metrics

__all__ = ["NEW_CLIENT", "held_out_clients", "new_client_metrics"]

NEW_CLIENT = "new-client"
"""The key of an evaluation message's config that marks a held-out client."""


def held_out_clients(num_clients: int, fraction: float, seed: int) -> frozenset[int]:
    """``round(fraction * num_clients)`` partition ids drawn at random under the run's seed."""
    generator = torch.Generator().manual_seed(derive_seed(seed, "new-clients"))
    count = round(fraction * num_clients)
    return frozenset(torch.randperm(num_clients, generator=generator)[:count].tolist())


def new_client_metrics(evaluations: Sequence[ClientEvaluation]) -> dict[str, float]:
    """The held-out clients' evaluation (:func:`federated_metrics`), every key prefixed ``new_``."""
    return {f"new_{key}": value for key, value in federated_metrics(evaluations).items()}

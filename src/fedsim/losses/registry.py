"""Loss registry: names used in configs -> loss classes, and :func:`build`."""

from __future__ import annotations

import inspect

from torch import nn

from .anyloss import AnyLoss
from .auc import AUCMWLoss
from .centroid_triplet import CentroidTripletLoss
from .compsum import CompSumLoss
from .contrastive import InfoNCELoss, ISogCLRLoss, SogCLRLoss
from .cross_entropy import CrossEntropyLoss, PaLMZLoss
from .dice import DiceLoss
from .ensloss import EnsLoss
from .harmonic import HarmonicLoss
from .ldr import ALDRKLLoss, LDRKLLoss
from .linear_cross_entropy import LinearCrossEntropy
from .multi_similarity import MultiSimilarityLoss
from .orthogonal_projection import OrthogonalProjectionLoss
from .spherical_z_loss import SphericalZLoss

REGISTRY: dict[str, type[nn.Module]] = {
    "cross_entropy": CrossEntropyLoss,
    "palm_z_loss": PaLMZLoss,
    "spherical_z_loss": SphericalZLoss,
    "compsum": CompSumLoss,
    "ldr_kl": LDRKLLoss,
    "aldr_kl": ALDRKLLoss,
    "multi_similarity": MultiSimilarityLoss,
    "infonce": InfoNCELoss,
    "sogclr": SogCLRLoss,
    "isogclr": ISogCLRLoss,
    "orthogonal_projection": OrthogonalProjectionLoss,
    "harmonic": HarmonicLoss,
    "centroid_triplet": CentroidTripletLoss,
    "auc_mw": AUCMWLoss,
    "dice": DiceLoss,
    "anyloss": AnyLoss,
    "ensloss": EnsLoss,
    "linear_cross_entropy": LinearCrossEntropy,
}

RENAMED: dict[str, str] = {
    "z_loss": "palm_z_loss",
    "zloss": "spherical_z_loss",
}
"""Former registry names and the names that replaced them. ``z_loss`` (PaLM's auxiliary
``lambda * logsumexp^2``) and ``zloss`` (de Brebisson & Vincent's standardised-logit loss) were
two different losses one underscore apart; the old names are refused with the new one."""

INPUTS = ("logits", "targets", "embeddings", "embeddings2", "indices", "classifier")
"""The keyword arguments a loss's ``forward`` may take, as named in its ``inputs`` attribute."""

TASKS = ("classification", "embedding", "binary")
"""What a loss trains: class predictions from the logits (argmax, or the sign of the score for
"binary"), or features evaluated by nearest-centroid / kNN ("embedding")."""


def available() -> list[str]:
    """Names of all registered losses, sorted."""
    return sorted(REGISTRY)


def unknown_loss_message(name: str) -> str:
    """Why ``name`` is not a loss: a former name says which name replaced it."""
    if name in RENAMED:
        return f"{name!r} was renamed {RENAMED[name]!r}; use loss name {RENAMED[name]!r}"
    return f"{name!r} is not a loss; known: {', '.join(available())}"


def build(name: str, **kwargs: object) -> nn.Module:
    """Instantiate the loss registered as ``name`` with constructor arguments ``kwargs``.

    Raises
    ------
    ValueError
        If ``name`` is not registered (a former name says its new one), or an argument has
        a value the loss does not allow.
    TypeError
        If an argument is unknown to the loss, or a required one (``num_samples`` of the
        stateful losses) is missing.
    """
    if name not in REGISTRY:
        raise ValueError(f"loss.name: {unknown_loss_message(name)}")
    loss_class = REGISTRY[name]
    parameters = inspect.signature(loss_class).parameters
    unknown = sorted(set(kwargs) - set(parameters))
    if unknown:
        raise TypeError(
            f"loss {name!r}: unknown argument(s) {', '.join(unknown)}; accepted: {', '.join(parameters) or 'none'}"
        )
    missing = [p for p, spec in parameters.items() if spec.default is inspect.Parameter.empty and p not in kwargs]
    if missing:
        raise TypeError(f"loss {name!r}: missing required argument(s) {', '.join(missing)}")
    return loss_class(**kwargs)

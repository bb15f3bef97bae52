"""fedsim.losses: a library of classification, metric-learning and contrastive losses.

Pure PyTorch; nothing here knows about federation. Every loss is an ``nn.Module`` with a
functional twin, a registry name (:data:`REGISTRY`, :func:`build`, :func:`available`) and two
class attributes the training loop relies on:

- ``inputs``: the keyword arguments its ``forward`` takes, from ``logits`` (B, C),
  ``targets`` (B,) int64, ``embeddings`` (B, d), ``embeddings2`` (B, d) (a second augmented
  view), ``indices`` (B,) int64 global sample indices, ``classifier`` (C, d) head weight. A
  client calls ``loss(**{k: available[k] for k in loss.inputs})``.
- ``task``: ``"classification"``, ``"embedding"`` or ``"binary"``.

A loss whose ``reduction="none"`` gives one term per sample, and that runs under
``torch.func.vmap``, says so with ``per_sample = True``: the batched trainer
(:mod:`fedsim.clients.batched`) averages such terms over the real rows of padded batches.

Stateful losses (:class:`ALDRKLLoss`, :class:`SogCLRLoss`, :class:`ISogCLRLoss`) take
``num_samples`` and keep per-sample state in buffers, saved by ``state_dict()``.
"""

from .anyloss import AnyLoss, any_loss
from .auc import AUCMWLoss, auc_mw_loss
from .centroid_triplet import CentroidTripletLoss, centroid_triplet_loss
from .compsum import CompSumLoss, compsum_loss
from .contrastive import (
    InfoNCELoss,
    ISogCLRLoss,
    SogCLRLoss,
    info_nce_loss,
    isogclr_loss,
    sogclr_loss,
)
from .cross_entropy import CrossEntropyLoss, PaLMZLoss, palm_z_loss
from .dice import DiceLoss, dice_loss
from .ensloss import EnsLoss, ens_loss, random_calibrated_derivative
from .harmonic import HarmonicLoss, harmonic_loss
from .ldr import ALDRKLLoss, LDRKLLoss, aldr_kl_loss, ldr_kl_loss
from .linear_cross_entropy import LinearCrossEntropy, linear_cross_entropy
from .multi_similarity import (
    MultiSimilarityLoss,
    multi_similarity_loss,
    multi_similarity_mine,
)
from .orthogonal_projection import OrthogonalProjectionLoss, orthogonal_projection_loss
from .registry import INPUTS, REGISTRY, RENAMED, TASKS, available, build
from .spherical_z_loss import SphericalZLoss, spherical_z_loss

__all__ = [
    "INPUTS",
    "REGISTRY",
    "RENAMED",
    "TASKS",
    "ALDRKLLoss",
    "AUCMWLoss",
    "AnyLoss",
    "CentroidTripletLoss",
    "CompSumLoss",
    "CrossEntropyLoss",
    "DiceLoss",
    "EnsLoss",
    "HarmonicLoss",
    "ISogCLRLoss",
    "InfoNCELoss",
    "LDRKLLoss",
    "LinearCrossEntropy",
    "MultiSimilarityLoss",
    "OrthogonalProjectionLoss",
    "PaLMZLoss",
    "SogCLRLoss",
    "SphericalZLoss",
    "aldr_kl_loss",
    "any_loss",
    "auc_mw_loss",
    "available",
    "build",
    "centroid_triplet_loss",
    "compsum_loss",
    "dice_loss",
    "ens_loss",
    "harmonic_loss",
    "info_nce_loss",
    "isogclr_loss",
    "ldr_kl_loss",
    "linear_cross_entropy",
    "multi_similarity_loss",
    "multi_similarity_mine",
    "orthogonal_projection_loss",
    "palm_z_loss",
    "random_calibrated_derivative",
    "sogclr_loss",
    "spherical_z_loss",
]

"""Multi-similarity loss and its pair miner (Wang et al., 2019)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import check_embeddings, check_non_negative, check_positive, check_targets


def multi_similarity_mine(similarity: Tensor, targets: Tensor, epsilon: float = 0.1) -> tuple[Tensor, Tensor]:
    """Multi-similarity pair mining; returns boolean (B, B) masks of the kept positive and negative pairs.

    For anchor i with positives P_i (same label, j != i) and negatives N_i (other labels):
    a positive pair is kept if ``S_ij - epsilon < max_{k in N_i} S_ik`` and a negative pair if
    ``S_ij + epsilon > min_{k in P_i} S_ik``. An anchor without negatives keeps no positive
    and an anchor without positives keeps no negative.

    Parameters
    ----------
    similarity : Tensor
        (B, B) cosine similarities.
    targets : Tensor
        (B,) labels.
    epsilon : float, default 0.1
        Mining margin.
    """
    with torch.no_grad():
        same = targets.unsqueeze(0) == targets.unsqueeze(1)
        eye = torch.eye(same.shape[0], dtype=torch.bool, device=same.device)
        positive, negative = same & ~eye, ~same
        inf = torch.tensor(float("inf"), dtype=similarity.dtype, device=similarity.device)
        hardest_negative = torch.where(negative, similarity, -inf).amax(dim=1, keepdim=True)
        hardest_positive = torch.where(positive, similarity, inf).amin(dim=1, keepdim=True)
        kept_positive = positive & (similarity - epsilon < hardest_negative)
        kept_negative = negative & (similarity + epsilon > hardest_positive)
    return kept_positive, kept_negative


def _log1p_sum_exp(values: Tensor, mask: Tensor) -> Tensor:
    """Row-wise ``log(1 + sum_{j in mask} exp(values_ij))``, computed stably."""
    masked = values.masked_fill(~mask, float("-inf"))
    return torch.logsumexp(torch.cat([masked, torch.zeros_like(values[:, :1])], dim=1), dim=1)


def multi_similarity_loss(
    embeddings: Tensor,
    targets: Tensor,
    alpha: float = 2.0,
    beta: float = 50.0,
    base: float = 0.5,
    epsilon: float | None = None,
) -> Tensor:
    """Multi-similarity loss on cosine similarities; see :class:`MultiSimilarityLoss`."""
    normalized = F.normalize(embeddings, p=2, dim=1)
    similarity = normalized @ normalized.T
    same = targets.unsqueeze(0) == targets.unsqueeze(1)
    eye = torch.eye(same.shape[0], dtype=torch.bool, device=same.device)
    if epsilon is None:
        positive, negative = same & ~eye, ~same
    else:
        positive, negative = multi_similarity_mine(similarity, targets, epsilon)
    positive_term = _log1p_sum_exp(-alpha * (similarity - base), positive) / alpha
    negative_term = _log1p_sum_exp(beta * (similarity - base), negative) / beta
    return (positive_term + negative_term).mean()


class MultiSimilarityLoss(nn.Module):
    """Multi-similarity loss (Wang et al., 2019), optionally with multi-similarity pair mining.

    "Multi-Similarity Loss with General Pair Weighting for Deep Metric Learning", CVPR 2019,
    arXiv:1904.06627. With cosine similarities ``S_ij`` of the L2-normalised embeddings, for
    each anchor i with positive pairs P_i and negative pairs N_i:

        loss_i = 1/alpha * log(1 + sum_{j in P_i} exp(-alpha (S_ij - base)))
               + 1/beta  * log(1 + sum_{j in N_i} exp( beta (S_ij - base))),

    averaged over all B anchors (an anchor without pairs contributes 0). With ``epsilon=None``
    P_i and N_i are all pairs; with a number they are the pairs kept by
    :func:`multi_similarity_mine` with that margin (the paper uses 0.1). This matches
    pytorch-metric-learning's ``MultiSimilarityLoss`` (alone, and fed by
    ``MultiSimilarityMiner(epsilon)``) with its default cosine similarity and mean reduction,
    except that pytorch-metric-learning returns 0 when at most one positive and one negative
    pair are left in the whole batch, where this computes the formula.

    Parameters
    ----------
    alpha : float, default 2.0
        Weight of positive pairs (> 0).
    beta : float, default 50.0
        Weight of negative pairs (> 0).
    base : float, default 0.5
        Similarity offset lambda in the paper.
    epsilon : float or None, default None
        Mining margin; None uses all pairs.
    """

    inputs = ("embeddings", "targets")
    task = "embedding"

    def __init__(self, alpha: float = 2.0, beta: float = 50.0, base: float = 0.5, epsilon: float | None = None) -> None:
        super().__init__()
        self.alpha = check_positive("alpha", alpha)
        self.beta = check_positive("beta", beta)
        self.base = float(base)
        self.epsilon = None if epsilon is None else check_non_negative("epsilon", epsilon)

    def forward(self, embeddings: Tensor, targets: Tensor) -> Tensor:
        check_embeddings(embeddings, "MultiSimilarityLoss")
        check_targets(targets, embeddings.shape[0], "MultiSimilarityLoss")
        return multi_similarity_loss(embeddings, targets, self.alpha, self.beta, self.base, self.epsilon)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}, base={self.base}, epsilon={self.epsilon}"

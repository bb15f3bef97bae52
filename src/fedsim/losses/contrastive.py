"""Self-supervised contrastive losses on two views: InfoNCE (SimCLR), SogCLR and iSogCLR.

All three treat, for an anchor (sample i in view a or b), the other view of the same sample
as the positive and the other 2B - 2 embeddings of the batch as negatives, on cosine
similarities of the L2-normalised embeddings, and average over the 2B anchors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import check_embeddings, check_indices, check_num_samples, check_positive


def _check_views(embeddings: Tensor, embeddings2: Tensor, where: str) -> None:
    check_embeddings(embeddings, where)
    check_embeddings(embeddings2, where, name="embeddings2")
    if embeddings.shape != embeddings2.shape:
        raise ValueError(
            f"{where}: the two views must have the same shape, got {tuple(embeddings.shape)} and "
            f"{tuple(embeddings2.shape)}"
        )
    if embeddings.shape[0] < 2:
        raise ValueError(f"{where}: needs a batch of at least 2 samples to have negatives")


def _anchor_similarities(embeddings: Tensor, embeddings2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Similarities of the 2B anchors (rows: view a then view b) to all 2B embeddings.

    Returns ``(similarity, positive, negative)``: (2B, 2B) cosine similarities, the (2B,)
    similarity of each anchor to its other view, and the (2B, 2B) boolean mask of negatives.
    """
    views = torch.cat([F.normalize(embeddings, dim=1), F.normalize(embeddings2, dim=1)], dim=0)
    similarity = views @ views.T
    two_b = views.shape[0]
    rows = torch.arange(two_b, device=views.device)
    partner = (rows + two_b // 2) % two_b
    positive = similarity.gather(1, partner.unsqueeze(1)).squeeze(1)
    negative = torch.ones_like(similarity, dtype=torch.bool)
    negative[rows, rows] = False
    negative[rows, partner] = False
    return similarity, positive, negative


def info_nce_loss(embeddings: Tensor, embeddings2: Tensor, temperature: float = 0.1) -> Tensor:
    """InfoNCE / NT-Xent loss of two views; see :class:`InfoNCELoss`."""
    similarity, positive, negative = _anchor_similarities(embeddings, embeddings2)
    logits = (similarity / temperature).masked_fill(~negative, float("-inf"))
    log_denominator = torch.logaddexp(torch.logsumexp(logits, dim=1), positive / temperature)
    return (log_denominator - positive / temperature).mean()


class InfoNCELoss(nn.Module):
    """InfoNCE / NT-Xent contrastive loss of SimCLR.

    Oord et al., 2018, "Representation Learning with Contrastive Predictive Coding",
    arXiv:1807.03748; Chen et al., 2020, "A Simple Framework for Contrastive Learning of Visual
    Representations" (SimCLR), arXiv:2002.05709. For anchor i with positive i+ and negatives
    N_i (the other 2B - 2 embeddings of the two views), with cosine similarity s:

        loss_i = -log( exp(s(i, i+)/tau) / (exp(s(i, i+)/tau) + sum_{k in N_i} exp(s(i, k)/tau)) ),

    averaged over the 2B anchors.

    Parameters
    ----------
    temperature : float, default 0.1
        tau > 0 (SimCLR's value for its main experiments).
    """

    inputs = ("embeddings", "embeddings2")
    task = "embedding"

    def __init__(self, temperature: float = 0.1) -> None:
        super().__init__()
        self.temperature = check_positive("temperature", temperature)

    def forward(self, embeddings: Tensor, embeddings2: Tensor) -> Tensor:
        _check_views(embeddings, embeddings2, "InfoNCELoss")
        return info_nce_loss(embeddings, embeddings2, self.temperature)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


def _moving_average(u: Tensor, batch_estimate: Tensor, gamma: float) -> Tensor:
    """``(1 - gamma) * u + gamma * g``; a never-seen sample (u == 0) starts at g."""
    return torch.where(u > 0, (1.0 - gamma) * u + gamma * batch_estimate, batch_estimate)


def _global_contrastive_terms(
    embeddings: Tensor, embeddings2: Tensor, u: Tensor, tau: Tensor, gamma: float
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Shared core of SogCLR and iSogCLR for per-anchor temperatures ``tau`` (2B, 1).

    Returns the per-anchor surrogate loss (2B,) whose value is ``tau * log(u_new) - s_pos`` and
    whose gradient is SogCLR's ``tau / u_new * grad(g) - grad(s_pos)``, the new estimator
    ``u_new`` (2B,), the negatives' similarities, their mask, and the detached batch weights
    ``exp(s / tau) / u_new``.
    """
    similarity, positive, negative = _anchor_similarities(embeddings, embeddings2)
    num_negatives = negative.shape[1] - 2
    exp_negatives = torch.exp(similarity / tau) * negative
    batch_estimate = exp_negatives.sum(dim=1) / num_negatives
    u_new = _moving_average(u.to(similarity.dtype), batch_estimate.detach(), gamma)
    tau_flat = tau.squeeze(1)
    surrogate = tau_flat * (torch.log(u_new) + (batch_estimate - batch_estimate.detach()) / u_new) - positive
    weights = (exp_negatives / u_new.unsqueeze(1)).detach()
    return surrogate, u_new, similarity.detach(), negative, weights


def _views_state(state: Tensor) -> Tensor:
    """(B, 2) per-sample state -> (2B,) per-anchor state (view a anchors first)."""
    return torch.cat([state[:, 0], state[:, 1]])


def _samples_state(anchor_state: Tensor) -> Tensor:
    """(2B,) per-anchor state -> (B, 2) per-sample state."""
    return torch.stack(anchor_state.chunk(2), dim=1)


def sogclr_loss(
    embeddings: Tensor, embeddings2: Tensor, u: Tensor, temperature: float = 0.1, gamma: float = 0.9
) -> tuple[Tensor, Tensor]:
    """SogCLR loss for one batch and the samples' updated estimators; see :class:`SogCLRLoss`.

    Parameters
    ----------
    embeddings, embeddings2 : Tensor
        (B, d) the two views.
    u : Tensor
        (B, 2) the samples' moving-average estimators for anchors in view a and view b
        (0 for a sample never seen).
    temperature, gamma
        As in :class:`SogCLRLoss`.

    Returns
    -------
    (Tensor, Tensor)
        The scalar loss and the (B, 2) new estimators (detached).
    """
    tau = torch.full((2 * embeddings.shape[0], 1), temperature, dtype=embeddings.dtype, device=embeddings.device)
    surrogate, u_new, *_ = _global_contrastive_terms(embeddings, embeddings2, _views_state(u), tau, gamma)
    return surrogate.mean(), _samples_state(u_new)


class SogCLRLoss(nn.Module):
    """SogCLR: global contrastive loss with a per-sample moving-average estimator (Yuan et al., 2022).

    "Provable Stochastic Optimization for Global Contrastive Learning: Small Batch Does Not Harm
    Performance", ICML 2022, arXiv:2202.12387. The global contrastive objective is

        F(w) = mean_i  tau * log( g_i(w) ),  g_i = mean_{z in S_i^-} exp((s(i, z) - s(i, i+)) / tau)
             = mean_i  tau * log( mean_{z in S_i^-} exp(s(i, z) / tau) ) - s(i, i+),

    over all negatives in the dataset. Its gradient ``tau / g_i * grad(g_i)`` is estimated with
    the batch's negatives and a moving average ``u_i <- (1 - gamma) u_i + gamma g_i(batch)``
    per anchor, so small batches do not bias it. The returned value is the running estimate
    ``mean_i tau * log(u_i) - s(i, i+)`` and its gradient is SogCLR's
    ``mean_i tau / u_i * grad(g_i(batch)) - grad(s(i, i+))``. A sample seen for the first
    time starts with ``u_i = g_i(batch)``, as in the authors' code. With ``gamma = 1`` the
    loss is the mini-batch loss and its gradient is exact.

    State: the buffer ``u`` (num_samples, 2), one estimator per sample and view, indexed by the
    batch's global sample ``indices``; ``state_dict()`` / ``load_state_dict()`` save and
    restore it so a federated client keeps it between rounds.

    Parameters
    ----------
    num_samples : int
        Number of samples tracked (the client's dataset size).
    temperature : float, default 0.1
        tau > 0.
    gamma : float, default 0.9
        Moving-average weight of the new batch estimate, in (0, 1].
    """

    inputs = ("embeddings", "embeddings2", "indices")
    task = "embedding"

    def __init__(self, num_samples: int, temperature: float = 0.1, gamma: float = 0.9) -> None:
        super().__init__()
        self.num_samples = check_num_samples(num_samples)
        self.temperature = check_positive("temperature", temperature)
        if not 0.0 < gamma <= 1.0:
            raise ValueError(f"gamma must be in (0, 1], got {gamma!r}")
        self.gamma = float(gamma)
        self.register_buffer("u", torch.zeros(num_samples, 2))

    def forward(self, embeddings: Tensor, embeddings2: Tensor, indices: Tensor) -> Tensor:
        _check_views(embeddings, embeddings2, "SogCLRLoss")
        check_indices(indices, embeddings.shape[0], self.num_samples, "SogCLRLoss")
        loss, u_new = sogclr_loss(embeddings, embeddings2, self.u[indices], self.temperature, self.gamma)
        self.u[indices] = u_new.to(self.u.dtype)
        return loss

    def extra_repr(self) -> str:
        return f"num_samples={self.num_samples}, temperature={self.temperature}, gamma={self.gamma}"


def isogclr_loss(
    embeddings: Tensor,
    embeddings2: Tensor,
    u: Tensor,
    tau: Tensor,
    tau_grad: Tensor,
    rho: float = 0.3,
    gamma: float = 0.9,
    eta: float = 0.01,
    beta: float = 0.9,
    tau_min: float = 0.05,
    tau_max: float = 0.7,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """iSogCLR loss for one batch and the samples' updated state; see :class:`ISogCLRLoss`.

    Parameters
    ----------
    embeddings, embeddings2 : Tensor
        (B, d) the two views.
    u : Tensor
        (B, 2) moving-average estimators per sample and view (0 for a sample never seen).
    tau : Tensor
        (B,) the samples' temperatures.
    tau_grad : Tensor
        (B,) moving average of the temperatures' gradients.
    rho, gamma, eta, beta, tau_min, tau_max
        As in :class:`ISogCLRLoss`.

    Returns
    -------
    (Tensor, Tensor, Tensor, Tensor)
        The scalar loss, then the new ``u`` (B, 2), ``tau`` (B,) and ``tau_grad`` (B,), detached.
    """
    tau = tau.to(embeddings.dtype)
    anchor_tau = torch.cat([tau, tau]).unsqueeze(1)
    surrogate, u_new, similarity, negative, weights = _global_contrastive_terms(
        embeddings, embeddings2, _views_state(u), anchor_tau, gamma
    )
    with torch.no_grad():
        num_negatives = negative.shape[1] - 2
        weighted_scaled = (weights * torch.where(negative, similarity, 0.0) / anchor_tau).sum(dim=1) / num_negatives
        anchor_grad = torch.log(u_new) + rho - weighted_scaled
        grad = anchor_grad.view(2, -1).mean(dim=0)
        tau_grad_new = (1.0 - beta) * tau_grad.to(grad.dtype) + beta * grad
        tau_new = (tau - eta * tau_grad_new).clamp(tau_min, tau_max)
    loss = (surrogate + anchor_tau.squeeze(1).detach() * rho).mean()
    return loss, _samples_state(u_new), tau_new, tau_grad_new


class ISogCLRLoss(nn.Module):
    """iSogCLR: SogCLR with an individual, learned temperature per sample (Qiu et al., 2023).

    "Not All Semantics are Created Equal: Contrastive Self-supervised Learning with Automatic
    Temperature Individualization", ICML 2023, arXiv:2305.11965. The robust global contrastive
    objective (a KL-constrained DRO over each anchor's negatives) is

        F(w, tau) = mean_i  tau_i * log( mean_{z in S_i^-} exp((s(i, z) - s(i, i+)) / tau_i) ) + tau_i * rho,

    minimised over the network w and over each tau_i in [tau_min, tau_max]. The w-gradient is
    estimated as in SogCLR with a per-anchor moving average u_i of the inner mean; each tau_i
    takes a step of momentum SGD on the estimated partial derivative
    ``log(u_i) + rho - mean_z (exp(s(i, z)/tau_i) / u_i) * s(i, z) / tau_i`` (averaged over the
    sample's two views), ``m_i <- (1 - beta) m_i + beta * grad``,
    ``tau_i <- clip(tau_i - eta * m_i, tau_min, tau_max)``. The returned value is
    ``mean_i tau_i * (log(u_i) + rho) - s(i, i+)``. Defaults are those of the authors' LibAUC
    implementation for unimodal data.

    State: buffers ``u`` (num_samples, 2), ``tau`` (num_samples,) (initialised to
    ``temperature``) and ``tau_grad`` (num_samples,), indexed by the batch's global sample
    ``indices``; ``state_dict()`` / ``load_state_dict()`` save and restore them so a federated
    client keeps them between rounds.

    Parameters
    ----------
    num_samples : int
        Number of samples tracked (the client's dataset size).
    temperature : float, default 0.1
        Initial temperature of every sample.
    rho : float, default 0.3
        KL radius of the DRO (>= 0); larger rho -> larger temperatures.
    gamma : float, default 0.9
        Moving-average weight of the new batch estimate, in (0, 1].
    eta : float, default 0.01
        Step size of the temperature update (> 0).
    beta : float, default 0.9
        Weight of the new gradient in the temperature momentum, in (0, 1].
    tau_min, tau_max : float, default 0.05, 0.7
        Bounds of the temperatures.
    """

    inputs = ("embeddings", "embeddings2", "indices")
    task = "embedding"

    def __init__(
        self,
        num_samples: int,
        temperature: float = 0.1,
        rho: float = 0.3,
        gamma: float = 0.9,
        eta: float = 0.01,
        beta: float = 0.9,
        tau_min: float = 0.05,
        tau_max: float = 0.7,
    ) -> None:
        super().__init__()
        self.num_samples = check_num_samples(num_samples)
        self.tau_min = check_positive("tau_min", tau_min)
        if not tau_min <= temperature <= tau_max:
            raise ValueError(
                f"temperature must lie in [tau_min, tau_max] = [{tau_min}, {tau_max}], got {temperature!r}"
            )
        self.temperature = float(temperature)
        self.tau_max = float(tau_max)
        if not rho >= 0.0:
            raise ValueError(f"rho must be >= 0, got {rho!r}")
        self.rho = float(rho)
        for name, value in (("gamma", gamma), ("beta", beta)):
            if not 0.0 < value <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {value!r}")
        self.gamma = float(gamma)
        self.beta = float(beta)
        self.eta = check_positive("eta", eta)
        self.register_buffer("u", torch.zeros(num_samples, 2))
        self.register_buffer("tau", torch.full((num_samples,), self.temperature))
        self.register_buffer("tau_grad", torch.zeros(num_samples))

    def forward(self, embeddings: Tensor, embeddings2: Tensor, indices: Tensor) -> Tensor:
        _check_views(embeddings, embeddings2, "ISogCLRLoss")
        check_indices(indices, embeddings.shape[0], self.num_samples, "ISogCLRLoss")
        loss, u_new, tau_new, tau_grad_new = isogclr_loss(
            embeddings,
            embeddings2,
            self.u[indices],
            self.tau[indices],
            self.tau_grad[indices],
            self.rho,
            self.gamma,
            self.eta,
            self.beta,
            self.tau_min,
            self.tau_max,
        )
        self.u[indices] = u_new.to(self.u.dtype)
        self.tau[indices] = tau_new.to(self.tau.dtype)
        self.tau_grad[indices] = tau_grad_new.to(self.tau_grad.dtype)
        return loss

    def extra_repr(self) -> str:
        return (
            f"num_samples={self.num_samples}, temperature={self.temperature}, rho={self.rho}, gamma={self.gamma}, "
            f"eta={self.eta}, beta={self.beta}, tau_min={self.tau_min}, tau_max={self.tau_max}"
        )

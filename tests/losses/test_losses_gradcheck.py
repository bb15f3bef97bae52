"""torch.autograd.gradcheck in float64 on small inputs for every differentiable loss.

Stateful losses are checked through their functional twins with the state as a fixed input
(SogCLR and iSogCLR at gamma = 1, where the surrogate gradient is the exact one). EnsLoss is
left out by design: its gradient is a random loss-derivative, not the derivative of its value.
"""

import pytest
import torch

from fedsim.losses import (
    AnyLoss,
    AUCMWLoss,
    CentroidTripletLoss,
    CompSumLoss,
    CrossEntropyLoss,
    DiceLoss,
    HarmonicLoss,
    InfoNCELoss,
    LDRKLLoss,
    MultiSimilarityLoss,
    OrthogonalProjectionLoss,
    PaLMZLoss,
    SphericalZLoss,
    isogclr_loss,
    ldr_kl_loss,
    sogclr_loss,
)

GENERATOR_SEED = 0


def _random(*shape):
    generator = torch.Generator().manual_seed(GENERATOR_SEED + sum(shape))
    return torch.randn(*shape, generator=generator, dtype=torch.float64).requires_grad_()


TARGETS = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
BINARY_TARGETS = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])

LOGIT_LOSSES = {
    "cross_entropy": CrossEntropyLoss(label_smoothing=0.1),
    "spherical_z_loss": SphericalZLoss(a=1.0, b=2.0),
    "compsum_tau0": CompSumLoss(tau=0.0),
    "compsum_tau0.5": CompSumLoss(tau=0.5),
    "compsum_tau2": CompSumLoss(tau=2.0),
    "ldr_kl": LDRKLLoss(lam=0.8, margin=1.0),
    "auc_mw_one_vs_rest": AUCMWLoss(),
    "dice_multi_class": DiceLoss(),
}


@pytest.mark.parametrize("name", sorted(LOGIT_LOSSES))
def test_gradcheck_logit_losses(name):
    assert torch.autograd.gradcheck(lambda logits: LOGIT_LOSSES[name](logits, TARGETS), (_random(8, 3),))


def test_gradcheck_palm_z_loss():
    assert torch.autograd.gradcheck(PaLMZLoss(weight=0.1), (_random(8, 3),))


@pytest.mark.parametrize(
    "loss", [AUCMWLoss(), DiceLoss(), AnyLoss("f_beta", amplifier=5.0), AnyLoss("balanced_accuracy", amplifier=5.0)]
)
def test_gradcheck_binary_losses(loss):
    assert torch.autograd.gradcheck(lambda scores: loss(scores, BINARY_TARGETS), (_random(8),))


def test_gradcheck_anyloss_at_the_paper_amplifier():
    scores = (0.05 * _random(8)).detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda s: AnyLoss("accuracy")(s, BINARY_TARGETS), (scores,))


def test_gradcheck_ldr_kl_with_per_sample_lambdas_as_aldr_kl_uses():
    lambdas = torch.linspace(0.5, 1.0, 8, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda logits: ldr_kl_loss(logits, TARGETS, lambdas, 2.0), (_random(8, 3),))


EMBEDDING_LOSSES = {
    "multi_similarity": MultiSimilarityLoss(),
    "multi_similarity_mined": MultiSimilarityLoss(epsilon=0.3),
    "orthogonal_projection": OrthogonalProjectionLoss(),
    "centroid_triplet": CentroidTripletLoss(margin=2.0),
}


@pytest.mark.parametrize("name", sorted(EMBEDDING_LOSSES))
def test_gradcheck_embedding_losses(name):
    assert torch.autograd.gradcheck(lambda e: EMBEDDING_LOSSES[name](e, TARGETS), (_random(8, 4),))


def test_gradcheck_harmonic_wrt_embeddings_and_centres():
    assert torch.autograd.gradcheck(lambda e, c: HarmonicLoss()(e, c, TARGETS), (_random(8, 4), _random(3, 4)))


def test_gradcheck_infonce():
    assert torch.autograd.gradcheck(lambda a, b: InfoNCELoss(0.5)(a, b), (_random(6, 4), _random(6, 5)[:, :4]))


def test_gradcheck_sogclr_at_gamma_one():
    state = torch.zeros(6, 2, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda a, b: sogclr_loss(a, b, state, temperature=0.5, gamma=1.0)[0], (_random(6, 4), _random(6, 5)[:, :4])
    )


def test_gradcheck_isogclr_at_gamma_one():
    u, tau_grad = torch.zeros(6, 2, dtype=torch.float64), torch.zeros(6, dtype=torch.float64)
    tau = torch.linspace(0.2, 0.6, 6, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda a, b: isogclr_loss(a, b, u, tau, tau_grad, gamma=1.0)[0], (_random(6, 4), _random(6, 5)[:, :4])
    )

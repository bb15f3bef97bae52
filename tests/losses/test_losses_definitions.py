"""Each loss computes its paper's formula: invariances, closed forms, hand values, references."""

import math

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners

from fedsim.losses import (
    ALDRKLLoss,
    AnyLoss,
    AUCMWLoss,
    CentroidTripletLoss,
    CompSumLoss,
    CrossEntropyLoss,
    DiceLoss,
    EnsLoss,
    HarmonicLoss,
    InfoNCELoss,
    LDRKLLoss,
    MultiSimilarityLoss,
    OrthogonalProjectionLoss,
    PaLMZLoss,
    SphericalZLoss,
    aldr_kl_loss,
    isogclr_loss,
    ldr_kl_loss,
    palm_z_loss,
    random_calibrated_derivative,
    sogclr_loss,
)


def _logits_and_targets(batch=16, classes=5, seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, classes, generator=generator, dtype=dtype),
        torch.randint(0, classes, (batch,), generator=generator),
    )


# --- cross-entropy and PaLM z-loss -------------------------------------------------------------


def test_cross_entropy_wrapper_matches_torch_with_label_smoothing():
    logits, targets = _logits_and_targets()
    expected = F.cross_entropy(logits, targets, label_smoothing=0.1)
    torch.testing.assert_close(CrossEntropyLoss(label_smoothing=0.1)(logits, targets), expected)


def test_palm_z_loss_hand_value():
    logits = torch.tensor([[0.0, math.log(3.0)], [math.log(2.0), math.log(2.0)]], dtype=torch.float64)
    # logsumexp: log(1 + 3) = log 4 for both rows
    torch.testing.assert_close(palm_z_loss(logits, weight=0.5), torch.tensor(0.5 * math.log(4.0) ** 2, dtype=torch.float64))


def test_palm_z_loss_module_is_the_weighted_squared_log_normaliser():
    logits, _ = _logits_and_targets()
    expected = 1e-2 * torch.logsumexp(logits, dim=1).square().mean()
    torch.testing.assert_close(PaLMZLoss(weight=1e-2)(logits), expected)


# --- Z-loss (de Brebisson & Vincent) -----------------------------------------------------------


def test_spherical_z_loss_is_unchanged_by_per_sample_shift_and_positive_scale():
    logits, targets = _logits_and_targets()
    generator = torch.Generator().manual_seed(1)
    shift = torch.randn(16, 1, generator=generator, dtype=torch.float64) * 10
    scale = torch.rand(16, 1, generator=generator, dtype=torch.float64) * 5 + 0.1
    loss = SphericalZLoss(a=1.5, b=2.0, reduction="none")
    torch.testing.assert_close(loss(logits * scale + shift, targets), loss(logits, targets))


def test_spherical_z_loss_hand_value():
    logits = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)  # z = (-sqrt(1.5), 0, sqrt(1.5))
    expected = F.softplus(torch.tensor(2.0 * (1.0 - math.sqrt(1.5)), dtype=torch.float64)) / 2.0
    torch.testing.assert_close(SphericalZLoss(a=1.0, b=2.0)(logits, torch.tensor([2])), expected)


# --- CompSum (Mao, Mohri, Zhong) ---------------------------------------------------------------

# logits (log 1, log 2, log 3) with true class 0: u = 2 + 3 = 5
COMPSUM_LOGITS = torch.tensor([[0.0, math.log(2.0), math.log(3.0)]], dtype=torch.float64)
COMPSUM_TARGET = torch.tensor([0])


@pytest.mark.parametrize(
    "tau, expected",
    [(0.0, 5.0), (0.5, 2.0 * (math.sqrt(6.0) - 1.0)), (1.0, math.log(6.0)), (2.0, 1.0 - 1.0 / 6.0)],
)
def test_compsum_closed_forms_on_hand_computed_values(tau, expected):
    value = CompSumLoss(tau=tau)(COMPSUM_LOGITS, COMPSUM_TARGET)
    torch.testing.assert_close(value, torch.tensor(expected, dtype=torch.float64))


def test_compsum_at_tau_one_is_cross_entropy():
    logits, targets = _logits_and_targets()
    torch.testing.assert_close(CompSumLoss(tau=1.0)(logits, targets), F.cross_entropy(logits, targets))


# --- LDR-KL / ALDR-KL (Zhu, Ying, Yang) --------------------------------------------------------


def test_ldr_kl_with_zero_margin_is_scaled_cross_entropy_minus_log_k():
    logits, targets = _logits_and_targets()
    lam = 0.7
    expected = lam * (F.cross_entropy(logits / lam, targets) - math.log(5))
    torch.testing.assert_close(LDRKLLoss(lam=lam, margin=0.0)(logits, targets), expected)


def test_ldr_kl_margin_hand_value():
    logits = torch.tensor([[2.0, 0.0]], dtype=torch.float64)
    # scores (0, margin + 0 - 2) = (0, -1) with margin 1: log((1 + e^-1) / 2)
    expected = torch.tensor(math.log((1.0 + math.exp(-1.0)) / 2.0), dtype=torch.float64)
    torch.testing.assert_close(LDRKLLoss(lam=1.0, margin=1.0)(logits, torch.tensor([0])), expected)


def test_aldr_kl_lambda_moves_from_lambda0_within_its_bounds():
    logits, targets = _logits_and_targets(batch=32)
    loss = ALDRKLLoss(num_samples=32, lam0=1.0, alpha=2.0)
    loss(logits, targets, torch.arange(32))
    assert torch.all(loss.lambdas <= 1.0) and torch.all(loss.lambdas >= 0.5)
    assert not torch.allclose(loss.lambdas, torch.ones(32))


def test_aldr_kl_is_ldr_kl_at_the_updated_lambda_minus_the_penalty():
    logits, targets = _logits_and_targets()
    lam_prev = torch.full((16,), 1.0, dtype=torch.float64)
    value, lam = aldr_kl_loss(logits, targets, lam_prev, lam0=1.0, alpha=2.0, margin=2.0, reduction="none")
    penalty = 2.0 * math.log(5) / 2.0 * (lam - 1.0).square()
    torch.testing.assert_close(value, ldr_kl_loss(logits, targets, lam, 2.0, reduction="none") - penalty)


# --- multi-similarity (Wang et al.) vs pytorch-metric-learning ---------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_ms_loss_matches_reference_without_miner(seed):
    embeddings, targets = _logits_and_targets(batch=48, classes=8, seed=seed, dtype=torch.float32)
    targets = targets % 6
    expected = pml_losses.MultiSimilarityLoss(alpha=2, beta=50, base=0.5)(embeddings, targets)
    torch.testing.assert_close(MultiSimilarityLoss()(embeddings, targets), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("epsilon", [0.1, 0.3])
def test_ms_loss_matches_reference_with_miner(seed, epsilon):
    embeddings, targets = _logits_and_targets(batch=48, classes=8, seed=seed, dtype=torch.float32)
    targets = targets % 6
    pairs = pml_miners.MultiSimilarityMiner(epsilon=epsilon)(embeddings, targets)
    expected = pml_losses.MultiSimilarityLoss()(embeddings, targets, pairs)
    torch.testing.assert_close(MultiSimilarityLoss(epsilon=epsilon)(embeddings, targets), expected, rtol=0, atol=1e-5)


# --- contrastive -------------------------------------------------------------------------------


def _views(batch=8, dim=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, dim, generator=generator, dtype=torch.float64),
        torch.randn(batch, dim, generator=generator, dtype=torch.float64),
    )


def test_infonce_equals_cross_entropy_over_the_other_2b_minus_1_embeddings():
    view_a, view_b = _views()
    both = F.normalize(torch.cat([view_a, view_b]), dim=1)
    logits = (both @ both.T / 0.2).fill_diagonal_(float("-inf"))
    partners = torch.cat([torch.arange(8, 16), torch.arange(0, 8)])
    torch.testing.assert_close(InfoNCELoss(temperature=0.2)(view_a, view_b), F.cross_entropy(logits, partners))


def test_sogclr_with_gamma_one_is_the_mini_batch_global_contrastive_loss():
    view_a, view_b = _views()
    both = F.normalize(torch.cat([view_a, view_b]), dim=1)
    similarity = both @ both.T
    partners = torch.cat([torch.arange(8, 16), torch.arange(0, 8)])
    positive = similarity[torch.arange(16), partners]
    negative = torch.ones(16, 16, dtype=torch.bool)
    negative[torch.arange(16), torch.arange(16)] = False
    negative[torch.arange(16), partners] = False
    mean_exp = (torch.exp(similarity / 0.1) * negative).sum(1) / 14
    expected = (0.1 * torch.log(mean_exp) - positive).mean()
    value, u = sogclr_loss(view_a, view_b, torch.zeros(8, 2, dtype=torch.float64), temperature=0.1, gamma=1.0)
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(u, torch.stack(mean_exp.chunk(2), dim=1))


def test_sogclr_moving_average_mixes_the_stored_estimate():
    view_a, view_b = _views()
    _, fresh = sogclr_loss(view_a, view_b, torch.zeros(8, 2, dtype=torch.float64), gamma=1.0)
    stored = torch.full((8, 2), 3.0, dtype=torch.float64)
    _, mixed = sogclr_loss(view_a, view_b, stored, gamma=0.9)
    torch.testing.assert_close(mixed, 0.1 * stored + 0.9 * fresh)


def test_isogclr_temperatures_move_against_their_gradient_and_stay_in_bounds():
    view_a, view_b = _views(batch=16)
    tau = torch.full((16,), 0.3, dtype=torch.float64)
    _, _, tau_new, tau_grad = isogclr_loss(
        view_a, view_b, torch.zeros(16, 2, dtype=torch.float64), tau, torch.zeros(16, dtype=torch.float64), eta=0.5
    )
    torch.testing.assert_close(tau_new, (tau - 0.5 * tau_grad).clamp(0.05, 0.7))
    assert not torch.allclose(tau_new, tau)


# --- OPL, harmonic, centroid triplet -----------------------------------------------------------


def test_opl_hand_value():
    embeddings = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0], [1.0, 1.0]], dtype=torch.float64)
    targets = torch.tensor([0, 0, 1, 1])
    # same-class cosines: (0,1)=1, (2,3)=1/sqrt2; different-class: (0,2)=0,(0,3)=1/sqrt2,(1,2)=0,(1,3)=1/sqrt2
    s = (1.0 + 1.0 / math.sqrt(2)) / 2
    d = (2.0 / math.sqrt(2)) / 4
    expected = torch.tensor(1.0 - s + 0.5 * abs(d), dtype=torch.float64)
    torch.testing.assert_close(OrthogonalProjectionLoss(gamma=0.5)(embeddings, targets), expected)


def test_harmonic_probabilities_are_inverse_distance_powers():
    embeddings = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    centres = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-4.0, 0.0]], dtype=torch.float64)
    n = 3.0
    weights = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64) ** -n
    expected = -torch.log(weights[1] / weights.sum())
    torch.testing.assert_close(HarmonicLoss(exponent=n)(embeddings, centres, torch.tensor([1])), expected)


def test_harmonic_predict_is_the_nearest_centre():
    generator = torch.Generator().manual_seed(0)
    embeddings, centres = torch.randn(20, 4, generator=generator), torch.randn(6, 4, generator=generator)
    expected = torch.cdist(embeddings, centres).argmin(dim=1)
    assert torch.equal(HarmonicLoss().predict(embeddings, centres), expected)


def test_centroid_triplet_hand_value():
    embeddings = torch.tensor([[0.0], [1.0], [3.0], [5.0]], dtype=torch.float64)
    targets = torch.tensor([0, 0, 1, 1])
    # anchor 0: d(c+ = 1) = 1, d(c_1 = 4) = 4 -> 0; anchor 1: 1 - 3 + m -> 0
    # anchor 2: d(c+ = 5) = 2, d(c_0 = 0.5) = 2.5 -> 2 - 2.5 + 1 = 0.5; anchor 3: 2 - 4.5 + 1 -> 0
    expected = torch.tensor(0.5 / 4, dtype=torch.float64)
    torch.testing.assert_close(CentroidTripletLoss(margin=1.0)(embeddings, targets), expected, atol=1e-6, rtol=0)


# --- AUC, Dice, AnyLoss, EnsLoss ---------------------------------------------------------------


def test_auc_squared_hinge_hand_value():
    scores = torch.tensor([2.0, 0.5, 0.0, 1.0], dtype=torch.float64)
    targets = torch.tensor([1, 1, 0, 0])
    # pairs (p, n): (2,0) gap 2 -> 0; (2,1) gap 1 -> 0; (0.5,0) gap .5 -> .25; (0.5,1) gap -.5 -> 2.25
    expected = torch.tensor((0.25 + 2.25) / 4, dtype=torch.float64)
    torch.testing.assert_close(AUCMWLoss(margin=1.0)(scores, targets), expected)


def test_auc_one_vs_rest_averages_the_per_class_binary_losses():
    logits, targets = _logits_and_targets(batch=20, classes=3)
    loss = AUCMWLoss()
    per_class = [loss(logits[:, k], (targets == k).long()) for k in range(3)]
    torch.testing.assert_close(loss(logits, targets), torch.stack(per_class).mean())


def test_dice_binary_hand_value():
    logits = torch.tensor([0.0, 0.0, 0.0], dtype=torch.float64)  # p = 0.5
    targets = torch.tensor([1, 0, 1])
    dice = (2 * 1.0 + 1.0) / (0.75 + 2.0 + 1.0)
    torch.testing.assert_close(DiceLoss()(logits, targets), torch.tensor(1.0 - dice, dtype=torch.float64))


def test_dice_multi_class_is_near_zero_for_confident_correct_predictions():
    targets = torch.tensor([0, 1, 2, 1])
    logits = F.one_hot(targets, 3).to(torch.float64) * 30.0
    assert float(DiceLoss(smooth=0.0)(logits, targets)) < 1e-6


@pytest.mark.parametrize("metric", ["f_beta", "accuracy", "balanced_accuracy"])
def test_anyloss_is_near_zero_when_right_and_near_one_when_wrong(metric):
    targets = torch.tensor([1, 0, 1, 1, 0])
    right = (2.0 * targets - 1.0).to(torch.float64) * 10.0
    loss = AnyLoss(metric=metric)
    assert float(loss(right, targets)) < 1e-3
    assert float(loss(-right, targets)) > 0.99


def test_anyloss_accuracy_hand_value_at_p_half():
    targets = torch.tensor([1, 0])
    # sigmoid(0) = 0.5 -> A = sigmoid(0) = 0.5 -> TP = TN = 0.5 -> accuracy 0.5
    torch.testing.assert_close(AnyLoss(metric="accuracy")(torch.zeros(2), targets), torch.tensor(0.5))


def test_ensloss_gradient_is_a_calibrated_convex_loss_derivative():
    generator = torch.Generator().manual_seed(3)
    margins = torch.randn(64, generator=generator, dtype=torch.float64) * 3
    derivative = random_calibrated_derivative(margins, torch.Generator().manual_seed(0))
    order = margins.argsort()
    assert torch.all(derivative < 0)
    assert torch.all(derivative[order].diff() >= 0)
    assert torch.all(derivative >= -1.0 - 1e-6)


def test_ensloss_backpropagates_the_random_derivative_to_the_margins():
    scores = torch.randn(32, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).requires_grad_()
    targets = torch.randint(0, 2, (32,), generator=torch.Generator().manual_seed(1))
    EnsLoss(seed=5)(scores, targets).backward()
    signs = 2.0 * targets - 1.0
    expected = random_calibrated_derivative(signs * scores.detach(), torch.Generator().manual_seed(5)) * signs / 32
    torch.testing.assert_close(scores.grad, expected)


def test_ensloss_draws_a_new_loss_every_batch_reproducibly_from_its_seed():
    scores = torch.randn(16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    targets = torch.randint(0, 2, (16,), generator=torch.Generator().manual_seed(1))
    first, second = EnsLoss(seed=1), EnsLoss(seed=1)
    values = [first(scores, targets) for _ in range(2)]
    assert not torch.equal(values[0], values[1])
    assert torch.equal(values[0], second(scores, targets))


def test_binary_losses_accept_one_and_two_column_logits():
    scores = torch.randn(8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    targets = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])
    two_columns = torch.stack([torch.zeros_like(scores), scores], dim=1)
    loss = AnyLoss()
    torch.testing.assert_close(loss(scores.unsqueeze(1), targets), loss(scores, targets))
    torch.testing.assert_close(loss(two_columns, targets), loss(scores, targets))

"""The PGD / FGSM step of federated adversarial learning (fedsim.clients.adversarial) against a
hand computation on a two-input linear model, and its invariants: the perturbation stays in
the ball, FGSM is PGD with one step of size epsilon from the clean input."""

import math

import pytest
import torch
from torch import nn

from fedsim.clients.adversarial import AdversarialInputs, model_input_gradient, pgd, project, robust_accuracy
from fedsim.config import AdversarialConfig, RobustEvalConfig
from fedsim.data import ArrayDataset

W = [[1.0, 2.0], [0.0, -1.0]]


class Linear2(nn.Module):
    """logits = W x: the features are the input itself."""

    def __init__(self):
        super().__init__()
        self.features = nn.Flatten()
        self.head = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor(W))


def hand_gradient(x, label):
    """grad_x CE(W x, label) = W^T (softmax(W x) - e_label), written out."""
    z = [W[0][0] * x[0] + W[0][1] * x[1], W[1][0] * x[0] + W[1][1] * x[1]]
    total = math.exp(z[0]) + math.exp(z[1])
    r = [math.exp(z[0]) / total - (label == 0), math.exp(z[1]) / total - (label == 1)]
    return [W[0][0] * r[0] + W[1][0] * r[1], W[0][1] * r[0] + W[1][1] * r[1]]


def hand_pgd(x, label, eps, steps, a, norm):
    delta = [0.0, 0.0]
    for _ in range(steps):
        g = hand_gradient([x[0] + delta[0], x[1] + delta[1]], label)
        if norm == "linf":
            delta = [max(-eps, min(eps, d + a * math.copysign(1.0, gi))) for d, gi in zip(delta, g)]
        else:
            length = math.hypot(*g)
            delta = [d + a * gi / length for d, gi in zip(delta, g)]
            scale = min(1.0, eps / math.hypot(*delta))
            delta = [d * scale for d in delta]
    return [x[0] + delta[0], x[1] + delta[1]]


def _attack(x, y, eps, steps, a, norm):
    model = Linear2()
    return pgd(model_input_gradient(model, y), x, None, eps, steps, a, norm)


def test_the_input_gradient_is_w_transpose_times_softmax_minus_onehot():
    x, y = torch.tensor([[1.0, 0.0]]), torch.tensor([0])
    got = model_input_gradient(Linear2(), y)(x)
    assert got[0].tolist() == pytest.approx(hand_gradient([1.0, 0.0], 0), abs=1e-6)
    # 1 - sigmoid(1) = 0.2689: the gradient is (-0.2689, -3 * 0.2689)
    assert got[0].tolist() == pytest.approx([-0.268941, -0.806824], abs=1e-6)


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize(("steps", "a"), [(1, 0.1), (3, 0.06), (5, 0.04)])
def test_pgd_matches_the_hand_computation(norm, steps, a):
    x = torch.tensor([[1.0, 0.0], [0.2, -0.5], [-1.0, 1.5]])
    y = torch.tensor([0, 1, 1])
    got = _attack(x, y, 0.1, steps, a, norm)
    for row, label, adv in zip(x.tolist(), y.tolist(), got.tolist()):
        assert adv == pytest.approx(hand_pgd(row, label, 0.1, steps, a, norm), abs=1e-6)


def test_fgsm_linf_moves_every_coordinate_by_epsilon_against_the_label():
    # gradient (-0.27, -0.81): both coordinates step down by epsilon
    assert _attack(torch.tensor([[1.0, 0.0]]), torch.tensor([0]), 0.1, 1, 0.1, "linf")[0].tolist() == \
        pytest.approx([0.9, -0.1], abs=1e-7)


def test_fgsm_is_pgd_with_one_step_of_size_epsilon_from_the_clean_input():
    fgsm = AdversarialConfig(method="fgsm", epsilon=0.25)
    assert (fgsm.steps, fgsm.step_size, fgsm.random_start) == (1, 0.25, False)
    pgd_one = AdversarialConfig(method="pgd", epsilon=0.25, steps=1, step_size=0.25, random_start=False)
    torch.manual_seed(0)
    x, y = torch.randn(16, 2), torch.randint(0, 2, (16,))
    model = Linear2()
    unused = torch.Generator().manual_seed(1)
    a = AdversarialInputs(fgsm, [unused]).perturb_inputs(model, x, y)
    b = AdversarialInputs(pgd_one, [torch.Generator().manual_seed(2)]).perturb_inputs(model, x, y)
    assert torch.equal(a, b)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_perturbations_from_a_random_start_stay_in_the_ball(norm):
    attack = AdversarialConfig(epsilon=0.3, steps=7, step_size=0.2, norm=norm)
    torch.manual_seed(0)
    model = nn.Module()
    model.features = nn.Flatten()
    model.head = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 3))
    x, y = torch.randn(32, 3, 4), torch.randint(0, 3, (32,))
    delta = AdversarialInputs(attack, [torch.Generator().manual_seed(3)]).perturb_inputs(model, x, y) - x
    size = delta.abs().flatten(1).amax(1) if norm == "linf" else delta.flatten(1).norm(dim=1)
    assert size.max() <= 0.3 + 1e-6
    assert size.min() > 0.1  # it did move: the attack is not a no-op


def test_l2_projection_rescales_onto_the_sphere_and_keeps_what_is_inside():
    delta = torch.tensor([[3.0, 4.0], [0.03, 0.04]])
    assert project(delta, 0.5, "l2").flatten().tolist() == pytest.approx([0.3, 0.4, 0.03, 0.04])


def test_robust_accuracy_counts_the_samples_whose_label_survives_the_attack():
    # x = (t, 0): logits (t, 0), label 0 is predicted while t > 0; FGSM linf moves x by
    # (-eps, -eps), logits (t - 3 eps, eps): label 0 survives iff t > 4 eps
    ts = [0.1, 0.3, 0.5, 0.7, 1.0]
    data = ArrayDataset(x=torch.tensor([[t, 0.0] for t in ts]).numpy(), y=torch.zeros(5, dtype=torch.long).numpy(),
                        num_classes=2, name="line")
    attack = RobustEvalConfig(epsilon=0.1, steps=1, step_size=0.1, random_start=False)
    acc = robust_accuracy(Linear2(), data, attack, torch.Generator(), torch.device("cpu"), batch_size=2)
    assert acc == pytest.approx(3 / 5)  # t = 0.5, 0.7, 1.0

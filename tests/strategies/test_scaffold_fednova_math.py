"""SCAFFOLD's and FedNova's math on hand-made tensors, against closed forms."""

import pytest
import torch
from torch import nn

from fedsim.algorithms.fednova import fednova_aggregate
from fedsim.algorithms.scaffold import (
    ScaffoldCorrection,
    control_variate_update,
    corrected_gradients,
    scaffold_control_step,
    scaffold_model_update,
)
from fedsim.clients.local_steps import momentum_steps


def test_momentum_steps_is_the_displacement_of_heavy_ball_under_a_constant_gradient():
    assert momentum_steps(7, 0.0) == 7.0
    assert momentum_steps(1, 0.9) == pytest.approx(1.0)
    # two steps with rho = 0.5: m1 = g, m2 = 1.5 g, displacement 2.5 lr g
    assert momentum_steps(2, 0.5) == pytest.approx(2.5)
    w = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([w], lr=0.1, momentum=0.9)
    for _ in range(13):
        opt.zero_grad()
        w.grad = torch.ones(1)
        opt.step()
    assert float(-w.detach()) == pytest.approx(0.1 * momentum_steps(13, 0.9), rel=1e-6)
    with pytest.raises(ValueError, match="momentum must be in"):
        momentum_steps(3, 1.0)


def test_corrected_gradients_are_g_minus_ci_plus_c_and_broadcast_over_a_batch_of_clients():
    g = [torch.tensor([1.0, 2.0]), torch.tensor([[3.0]])]
    ci = [torch.tensor([0.5, -1.0]), torch.tensor([[1.0]])]
    c = [torch.tensor([0.25, 0.0]), torch.tensor([[-2.0]])]
    out = corrected_gradients(g, ci, c)
    torch.testing.assert_close(out[0], torch.tensor([0.75, 3.0]))
    torch.testing.assert_close(out[1], torch.tensor([[0.0]]))
    stacked = corrected_gradients([torch.ones(3, 2)], [torch.tensor([[0.0, 1.0], [1.0, 0.0], [2.0, 2.0]])],
                                  [torch.tensor([1.0, 1.0])])  # three clients at once, one shared c
    torch.testing.assert_close(stacked[0], torch.tensor([[2.0, 1.0], [1.0, 2.0], [0.0, 0.0]]))


class Quadratic(nn.Module):
    """f_i(w) = 1/2 ||w - b_i||^2, gradient w - b_i."""

    def __init__(self, start):
        super().__init__()
        self.w = nn.Parameter(start.clone())


def _scaffold_client(x, b, c_local, c_global, steps, lr):
    model = Quadratic(x)
    hook = ScaffoldCorrection({"w": c_local}, {"w": c_global})
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * (model.w - b).square().sum()).backward()
        hook.before_step(model)
        opt.step()
    y = model.w.detach()
    return y, control_variate_update(c_local, c_global, y - x, steps, lr)


def test_scaffold_client_on_a_quadratic_matches_the_closed_form():
    x, b = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 0.5])
    c_local, c_global = torch.tensor([0.2, -0.4]), torch.tensor([-0.1, 0.3])
    K, lr = 4, 0.25
    y, c_new = _scaffold_client(x, b, c_local, c_global, K, lr)
    # y_{k+1} = y_k - lr (y_k - b + c - c_i): y_K = b' + (1 - lr)^K (x - b'), b' = b - (c - c_i)
    b_shifted = b - (c_global - c_local)
    expected_y = b_shifted + (1 - lr) ** K * (x - b_shifted)
    torch.testing.assert_close(y, expected_y)
    torch.testing.assert_close(c_new, c_local - c_global + (x - expected_y) / (K * lr))


def test_one_scaffold_round_on_quadratics_gives_the_closed_form_server_state():
    """Two of N = 3 clients take part; x, c and each c_i after the round in closed form."""
    x, c = torch.tensor([0.0, 1.0]), torch.tensor([0.5, -0.5])
    b = {0: torch.tensor([2.0, 2.0]), 2: torch.tensor([-1.0, 4.0])}
    c_locals = {0: torch.tensor([1.0, 0.0]), 2: torch.tensor([0.0, -1.0])}
    K, lr, eta_g, N = 3, 0.5, 1.5, 3
    dy, dc = {}, {}
    for i in (0, 2):
        y, c_new = _scaffold_client(x, b[i], c_locals[i], c, K, lr)
        b_shifted = b[i] - (c - c_locals[i])
        y_closed = b_shifted + 0.5**K * (x - b_shifted)
        torch.testing.assert_close(y, y_closed)
        dy[i], dc[i] = y - x, c_new - c_locals[i]
        # option II's c_i+ is the average corrected gradient ... plus c_i - c: here b-independent form
        torch.testing.assert_close(c_new, (1 - 0.5**K) / (K * lr) * (x - b_shifted) + c_locals[i] - c)
    new_x = x + eta_g * scaffold_model_update(torch.stack([dy[0], dy[2]]))
    new_c = scaffold_control_step(c, torch.stack([dc[0], dc[2]]), N)
    torch.testing.assert_close(new_x, x + eta_g * (dy[0] + dy[2]) / 2)
    torch.testing.assert_close(new_c, c + (dc[0] + dc[2]) / 3)  # |S|/N * mean = sum / N
    # c is still the mean of the three c_i when c was (client 1 keeps its c_i = 3c - c_0 - c_2)
    c1 = 3 * c - c_locals[0] - c_locals[2]
    torch.testing.assert_close(new_c, (c_locals[0] + dc[0] + c1 + c_locals[2] + dc[2]) / 3)


def test_scaffold_control_step_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="do not match"):
        scaffold_control_step(torch.zeros(3), torch.zeros(2, 4), 5)
    with pytest.raises(ValueError, match="3 deltas from 2 clients"):
        scaffold_control_step(torch.zeros(3), torch.zeros(3, 3), 2)


def test_fednova_normalises_by_local_steps_hand_computed():
    updates = torch.tensor([[2.0, 0.0], [0.0, 8.0]])
    # p = (1/4, 3/4), a = (2, 8): tau_eff = 0.5 + 6 = 6.5; d = (1/4 * [1, 0] + 3/4 * [0, 1]) = [0.25, 0.75]
    out = fednova_aggregate(updates, [10, 30], [2, 8])
    torch.testing.assert_close(out, torch.tensor([6.5 * 0.25, 6.5 * 0.75]))
    fedavg = (10 * updates[0] + 30 * updates[1]) / 40
    assert not torch.allclose(out, fedavg)  # FedAvg overweights the client with more steps
    torch.testing.assert_close(fednova_aggregate(updates, [10, 30], [5, 5]), fedavg)  # equal steps: FedAvg


def test_fednova_with_momentum_uses_the_momentum_weighted_steps():
    updates = torch.tensor([[1.0], [1.0]])
    a = [momentum_steps(2, 0.9), momentum_steps(10, 0.9)]
    out = fednova_aggregate(updates, [1, 1], a)
    tau_eff = (a[0] + a[1]) / 2
    torch.testing.assert_close(out, torch.tensor([tau_eff * (0.5 / a[0] + 0.5 / a[1])]))
    with pytest.raises(ValueError, match="must be > 0"):
        fednova_aggregate(updates, [1, 1], [0, 2])

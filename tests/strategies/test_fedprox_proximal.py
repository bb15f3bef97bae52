"""FedProx's proximal term, pinned: on a quadratic client objective the local update of
``train_local`` with :class:`ProximalTerm` equals the closed form of gradient descent on
``f(w) + mu/2 ||w - w_global||^2`` (Li et al., arXiv 1812.06127)."""

import numpy as np
import torch
from torch import nn

from fedsim.algorithms.fedprox import ProximalTerm
from fedsim.clients.objective import ClientObjective
from fedsim.clients.train import train_local
from fedsim.config import ClientConfig
from fedsim.data import ArrayDataset
from fedsim.models.classifier import EmbeddingClassifier


class LinearScore(EmbeddingClassifier):
    """One linear score ``w . x + b`` (identity features, a one-output head)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self._set_head(dim, 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return x


class HalfSquaredError(nn.Module):
    """``0.5 * mean_i (score_i - y_i)^2``: a quadratic in (w, b)."""

    inputs = ("logits", "targets")

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((logits[:, 0] - targets.to(logits.dtype)) ** 2).mean()


def _local_update(mu: float, steps: int, lr: float):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 3)).astype(np.float32)
    y = np.array([0, 1, 2, 1, 0, 2])
    data = ArrayDataset(x=x, y=y, num_classes=3, name="quadratic")
    model = LinearScore(3)
    data_x = torch.from_numpy(x).double()
    start = torch.cat([model.head.weight.detach().flatten(), model.head.bias.detach()]).clone()
    global_params = {name: p.detach().clone() for name, p in model.named_parameters()}
    hooks = (ProximalTerm(mu, global_params),) if mu else ()
    cfg = ClientConfig(local_steps=steps, batch_size=len(y), lr=lr)  # full batch: plain gradient descent
    objective = ClientObjective(HalfSquaredError(), hooks=hooks)
    train_local(model, data, cfg, objective, torch.Generator().manual_seed(0), torch.device("cpu"))
    end = torch.cat([model.head.weight.detach().flatten(), model.head.bias.detach()]).double()
    # closed form: theta_K = theta* + (I - lr (H + mu I))^K (theta_0 - theta*)
    phi = torch.cat([data_x, torch.ones(len(y), 1, dtype=torch.float64)], dim=1)
    H = phi.T @ phi / len(y)
    r = phi.T @ torch.from_numpy(y).double() / len(y)
    A = H + mu * torch.eye(4, dtype=torch.float64)
    start = start.double()
    optimum = torch.linalg.solve(A, r + mu * start)
    step = torch.eye(4, dtype=torch.float64) - lr * A
    expected = optimum + torch.linalg.matrix_power(step, steps) @ (start - optimum)
    return end - start, expected - start


def test_the_fedprox_local_update_equals_the_closed_form_on_a_quadratic():
    got, expected = _local_update(mu=0.5, steps=20, lr=0.1)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_the_proximal_term_shortens_the_update_as_the_closed_form_says():
    plain, plain_expected = _local_update(mu=0.0, steps=20, lr=0.1)
    torch.testing.assert_close(plain, plain_expected, rtol=1e-4, atol=1e-5)
    prox, _ = _local_update(mu=2.0, steps=20, lr=0.1)
    assert prox.norm() < 0.8 * plain.norm()  # pulled towards the global model

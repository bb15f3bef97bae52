"""FedDyn written out from the paper (Acar et al., arXiv 2111.04263, Algorithm 1) in plain
PyTorch, with full-batch gradient descent as the clients' local solver: the numbers the
plug-in must reproduce. Nothing here imports fedsim or the plug-in."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class FedDynRound:
    """The state after one round: the server model theta, the server's h, every client's h_i."""

    theta: dict[str, torch.Tensor]
    h: dict[str, torch.Tensor]
    h_clients: list[dict[str, torch.Tensor]]


def feddyn_rounds(model: nn.Module, data: list[tuple[torch.Tensor, torch.Tensor]], sampled: list[list[int]],
                  alpha: float, lr: float, steps: int) -> list[FedDynRound]:
    """Run FedDyn from ``model``'s parameters; ``sampled[t]`` are the clients of round t+1,
    ``data[i]`` client i's whole training set (one batch per step)."""
    names = [name for name, _ in model.named_parameters()]
    theta = {name: p.detach().clone() for name, p in model.named_parameters()}
    zeros = {name: torch.zeros_like(value) for name, value in theta.items()}
    h, h_clients = dict(zeros), [dict(zeros) for _ in data]
    rounds = []
    for clients in sampled:
        deltas = []
        for i in clients:
            with torch.no_grad():
                for name, p in model.named_parameters():
                    p.copy_(theta[name])
            x, y = data[i]
            for _ in range(steps):
                model.zero_grad()
                params = dict(model.named_parameters())
                loss = F.cross_entropy(model(x), y)
                # L_i(theta) - <grad L_i(theta_i^{t-1}), theta> + alpha/2 ||theta - theta^{t-1}||^2
                loss = loss + sum(-(h_clients[i][n] * params[n]).sum()
                                  + alpha / 2 * ((params[n] - theta[n]) ** 2).sum() for n in names)
                loss.backward()
                with torch.no_grad():
                    for p in model.parameters():
                        p -= lr * p.grad
            delta = {n: p.detach() - theta[n] for n, p in model.named_parameters()}
            # grad L_i(theta_i^t) = grad L_i(theta_i^{t-1}) - alpha (theta_i^t - theta^{t-1})
            h_clients[i] = {n: h_clients[i][n] - alpha * delta[n] for n in names}
            deltas.append(delta)
        # h^t = h^{t-1} - alpha (1/m) sum_{i in P_t} (theta_i^t - theta^{t-1})
        h = {n: h[n] - alpha / len(data) * sum(d[n] for d in deltas) for n in names}
        # theta^t = (1/|P_t|) sum_{i in P_t} theta_i^t - h^t / alpha
        theta = {n: theta[n] + sum(d[n] for d in deltas) / len(deltas) - h[n] / alpha for n in names}
        rounds.append(FedDynRound(theta, h, [dict(hc) for hc in h_clients]))
    return rounds

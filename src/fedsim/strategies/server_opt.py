"""Server optimizers applied to the aggregated client update.

"Adaptive Federated Optimization" (Reddi et al., arXiv 2003.00295) treats the aggregated
update ``delta`` as a pseudo-gradient step:

- sgd:       x <- x + lr * delta                                   (FedAvg when lr = 1)
- momentum:  m <- beta * m + delta;  x <- x + lr * m               (FedAvgM, Hsu et al. 2019)
- adam:      m <- b1 m + (1 - b1) delta;  v <- b2 v + (1 - b2) delta^2;
             x <- x + lr * m / (sqrt(v) + eps)                      (FedAdam)
- adagrad:   as adam with v <- v + delta^2                          (FedAdagrad)
- yogi:      as adam with v <- v - (1 - b2) delta^2 sign(v - delta^2)  (FedYogi)

The adaptive three share m and the step, and differ in v only (Reddi et al., Algorithm 2):
Adagrad's v only grows, so its steps shrink over the run; Yogi's moves towards delta^2 by at
most (1 - b2) delta^2 a round, where Adam's forgets geometrically. v starts at 0, as in
Flower's FedAdam/FedAdagrad/FedYogi. FedAdagrad keeps the momentum ``b1`` here, as in the
paper (Flower's FedAdagrad sets it to 0; ``beta1: 0`` gives that).

Bias correction (adam only, ``bias_correction: true``; off by default, as in the paper's
Algorithm 2): Flower's FedAdam (``flwr/serverapp/strategy/fedadam.py``) scales the step by
Kingma and Ba's corrected rate, ``lr_t = lr * sqrt(1 - b2^(t + 1)) / (1 - b1^(t + 1))``, with
``t`` its server round (1 at the first aggregation): its exponent is one ahead of Kingma and
Ba's, so the first step is ``0.74 lr`` at b1 0.9, b2 0.99, not ``lr``. fedsim follows
Flower's formula with ``t`` the number of steps this optimizer has taken, this one included;
it equals Flower's round while every round aggregates (a round that aggregates nothing moves
Flower's ``t`` on, not fedsim's). Flower's FedYogi and FedAdagrad apply no correction.
With these choices (``lr`` and ``beta1`` as Flower's, ``bias_correction`` for adam) the steps
equal Flower's FedAdam, FedYogi and FedAdagrad to float precision (tested).

Only parameters take the optimizer's step. Buffers (BatchNorm running statistics) are not
gradients' integrals: they take the clients' aggregate as it is, ``x <- x + delta`` (the
mean of the clients' statistics under FedAvg); through Adam's normalised step a running
variance can turn negative and the model NaN.
"""

from __future__ import annotations

import math

import torch

from fedsim.algorithms.api import ServerOptConfig


class ServerOptimizer:
    """Applies aggregated updates to the global model vector; holds momentum state."""

    def __init__(self, cfg: ServerOptConfig) -> None:
        self.cfg = cfg
        self.m: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.steps = 0

    def step(self, x: torch.Tensor, delta: torch.Tensor, parameters: torch.Tensor | None = None) -> torch.Tensor:
        """Return the new global vector (``x`` is not modified); ``parameters`` (a bool mask,
        :meth:`fedsim.params.ParamSpec.parameter_mask`) marks the entries the optimizer
        steps, the others (buffers) take ``x + delta``. All entries are parameters when None."""
        if parameters is None or bool(parameters.all()):
            return self._step(x, delta)
        return torch.where(parameters, self._step(x, delta * parameters), x + delta)

    def _step(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        if cfg.name == "sgd":
            return x + cfg.lr * delta
        if self.m is None:
            self.m = torch.zeros_like(x)
        if cfg.name == "momentum":
            self.m = cfg.momentum * self.m + delta
            return x + cfg.lr * self.m
        if self.v is None:
            self.v = torch.zeros_like(x)
        self.steps += 1
        self.m = cfg.beta1 * self.m + (1 - cfg.beta1) * delta
        square = delta**2
        lr = cfg.lr
        if cfg.name == "adam":
            self.v = cfg.beta2 * self.v + (1 - cfg.beta2) * square
            if cfg.bias_correction:  # Flower's FedAdam: the exponent is its round + 1
                lr = cfg.lr * math.sqrt(1 - cfg.beta2 ** (self.steps + 1.0)) / (1 - cfg.beta1 ** (self.steps + 1.0))
        elif cfg.name == "adagrad":
            self.v = self.v + square
        else:
            self.v = self.v - (1 - cfg.beta2) * square * torch.sign(self.v - square)
        return x + lr * self.m / (self.v.sqrt() + cfg.eps)

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {k: v for k, v in (("m", self.m), ("v", self.v)) if v is not None}
        return {**state, "steps": torch.tensor(self.steps)} if self.v is not None else state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.m = state.get("m")
        self.v = state.get("v")
        self.steps = int(state.get("steps", 0))

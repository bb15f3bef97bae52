"""Federated adversarial learning (FAL): clients train on adversarial examples.

Li, Song and Yang, "Federated Adversarial Learning: A Framework with Convergence Analysis"
(ICML 2023, arXiv 2208.03635): on each client an inner loop generates adversarial examples
of the batch, an outer loop updates the local model on them; the server aggregates as
usual. The inner loop is projected gradient ascent on the inputs (PGD, Madry et al.,
"Towards Deep Learning Models Resistant to Adversarial Attacks", arXiv 1706.06083), from
``x_0 = x + u`` (``u`` uniform in the ball with ``random_start``, else 0):

    x_{t+1} = x + P_eps( x_t + a * d(grad_x CE(f(x_t), y)) - x )

with ``d(g) = sign(g)`` and ``P_eps`` the clamp to ``[-eps, eps]`` per coordinate for
``linf``, and ``d(g) = g / ||g||_2`` per sample and ``P_eps(v) = v min(1, eps / ||v||_2)``
for ``l2``. FGSM (Goodfellow et al., arXiv 1412.6572) is one step of size ``eps`` from the
clean input. The attack maximises the cross entropy of the model's logits (whatever the
training loss); inputs are not clamped to the data's range: an adversarial input is a point of the
ball around the clean one, whatever the dataset.

The random start of client ``k`` in round ``r`` is drawn from its own generator, seeded from
(run seed, ``"adversarial"``, ``r``, ``k``), so the stacked form of the batched backend, which
computes every row's input gradient with ``torch.func`` (``vmap`` of ``grad``), draws and
computes exactly what one-at-a-time training does, and a resumed run draws what an
uninterrupted one did without any state of its own.

The client feature :class:`AdversarialTraining` is registered in the entry-point group
``fedsim.client_features``; ``eval.robust`` scores the global model under the same attack
(:func:`robust_accuracy`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, vmap

from fedsim.clients.features import ClientContext, ClientFeature
from fedsim.clients.hooks import ClientHook
from fedsim.seeding import derive_seed

if TYPE_CHECKING:
    from fedsim.config import AdversarialConfig, ExperimentConfig, RobustEvalConfig
    from fedsim.data import ArrayDataset


def _per_sample_norm(v: torch.Tensor, batch_dims: int) -> torch.Tensor:
    """The l2 norm of each sample of ``v`` (its first ``batch_dims`` dims index samples),
    shaped to broadcast against ``v``."""
    norms = v.flatten(batch_dims).norm(dim=-1)
    return norms.reshape(*norms.shape, *([1] * (v.dim() - batch_dims)))


def ascent_direction(gradient: torch.Tensor, norm: str, batch_dims: int = 1) -> torch.Tensor:
    """``sign(g)`` (linf) or ``g / ||g||_2`` per sample (l2; a zero gradient stays zero)."""
    if norm == "linf":
        return gradient.sign()
    return gradient / _per_sample_norm(gradient, batch_dims).clamp_min(1e-12)


def project(delta: torch.Tensor, epsilon: float, norm: str, batch_dims: int = 1) -> torch.Tensor:
    """``delta`` projected on the ``norm`` ball of radius ``epsilon``, per sample."""
    if norm == "linf":
        return delta.clamp(-epsilon, epsilon)
    return delta * (epsilon / _per_sample_norm(delta, batch_dims).clamp_min(1e-12)).clamp(max=1.0)


def random_start(shape: Sequence[int], epsilon: float, norm: str, generator: torch.Generator) -> torch.Tensor:
    """A random point of the ball for each of ``shape[0]`` samples: uniform per coordinate in
    ``[-eps, eps]`` (linf); a Gaussian direction scaled to radius ``eps * u``, ``u`` uniform
    in [0, 1] (l2)."""
    if norm == "linf":
        return (2 * torch.rand(tuple(shape), generator=generator) - 1) * epsilon
    direction = torch.randn(tuple(shape), generator=generator)
    radius = torch.rand(shape[0], generator=generator) * epsilon
    unit = direction / _per_sample_norm(direction, 1).clamp_min(1e-12)
    return unit * radius.reshape(-1, *([1] * (len(shape) - 1)))


def pgd(input_gradient: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, start: torch.Tensor | None,
        epsilon: float, steps: int, step_size: float, norm: str, batch_dims: int = 1) -> torch.Tensor:
    """The adversarial inputs of PGD (see the module docstring): ``steps`` ascent steps of size
    ``step_size`` from ``x + start`` (``start`` None: from ``x``), each projected on the
    ``epsilon``-ball around ``x``. ``input_gradient(x_t)`` is the loss's gradient at ``x_t``
    (per sample); the result is detached."""
    x = x.detach()
    delta = torch.zeros_like(x) if start is None else project(start.to(x), epsilon, norm, batch_dims)
    for _ in range(steps):
        step = ascent_direction(input_gradient(x + delta), norm, batch_dims)
        delta = project(delta + step_size * step, epsilon, norm, batch_dims)
    return (x + delta).detach()


def model_input_gradient(model: nn.Module, y: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> grad_x sum_i CE(model(x)_i, y_i)``: each sample's own loss gradient (the
    parameters get no gradient)."""
    def gradient(x: torch.Tensor) -> torch.Tensor:
        x = x.detach().requires_grad_(True)
        loss = F.cross_entropy(model.head(model.features(x)), y, reduction="sum")
        return torch.autograd.grad(loss, x)[0]
    return gradient


def attack_generator(seed: int, server_round: int, partition_id: int) -> torch.Generator:
    """Client ``partition_id``'s generator of random starts in ``server_round``."""
    return torch.Generator().manual_seed(derive_seed(seed, "adversarial", server_round, partition_id))


class AdversarialInputs(ClientHook):
    """Replaces each batch by its PGD examples; rows of a stack draw from their own generators.

    Parameters
    ----------
    attack : AdversarialConfig
        ``epsilon``, ``steps``, ``step_size``, ``norm``, ``random_start`` (resolved).
    generators : sequence of torch.Generator
        One per client (one for a client trained alone), in row order.
    """

    def __init__(self, attack: AdversarialConfig, generators: Sequence[torch.Generator]) -> None:
        self.attack = attack
        self.generators = list(generators)

    def _start(self, generator: torch.Generator, shape: Sequence[int]) -> torch.Tensor | None:
        a = self.attack
        return random_start(shape, a.epsilon, a.norm, generator) if a.random_start else None

    def perturb_inputs(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        a = self.attack
        training = model.training
        model.eval()  # the attack's forward passes leave normalisation statistics as they are
        try:
            return pgd(model_input_gradient(model, y), x, self._start(self.generators[0], x.shape), a.epsilon,
                       a.steps, a.step_size, a.norm)
        finally:
            model.train(training)

    def stacked_perturb_inputs(self, forward: Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor],
                               params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                               mask: torch.Tensor) -> torch.Tensor:
        a = self.attack
        start = None
        if a.random_start:  # row k draws for its real samples only, as client k alone does
            start = torch.zeros_like(x)
            for k, count in enumerate(mask.sum(1).long().tolist()):
                start[k, :count] = self._start(self.generators[k], (count, *x.shape[2:])).to(x)

        def row_loss(client_params, xk, yk, mk):
            losses = F.cross_entropy(forward(client_params, xk), yk, reduction="none")
            return (losses * mk).sum()

        per_row = vmap(grad(row_loss, argnums=1))
        return pgd(lambda xt: per_row(params, xt, y, mask), x, start, a.epsilon, a.steps, a.step_size, a.norm,
                   batch_dims=2)


class AdversarialTraining(ClientFeature):
    """``client.adversarial``: every client trains on PGD (or FGSM) examples of its batches
    (see the module docstring); stacks in the batched backend."""

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.attack = cfg.client.adversarial
        self.seed = cfg.seed

    @staticmethod
    def applies(cfg: ExperimentConfig) -> bool:
        return cfg.client.adversarial is not None

    @classmethod
    def rules(cls, cfg: ExperimentConfig) -> Iterable[str | None]:
        method = cfg.personalization.method
        if method in ("finetune", "ditto", "fedrep"):
            yield (f"client.adversarial: trains the global update on attacked batches; personalization.method "
                   f"{method!r} trains its personal model apart, on clean ones (use none, fedper or fedbn)")

    def hooks(self, ctx: ClientContext, start: dict[str, torch.Tensor]) -> tuple[ClientHook, ...]:
        return (AdversarialInputs(self.attack, [attack_generator(self.seed, ctx.server_round, ctx.partition_id)]),)

    def stacked_hooks(self, ctxs: Sequence[ClientContext], start: dict[str, torch.Tensor]) -> tuple[ClientHook, ...]:
        return (AdversarialInputs(self.attack, [attack_generator(self.seed, c.server_round, c.partition_id)
                                                for c in ctxs]),)


@torch.no_grad()
def robust_accuracy(model: nn.Module, data: ArrayDataset, attack: RobustEvalConfig, generator: torch.Generator,
                    device: torch.device, batch_size: int = 512,
                    predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> float:
    """Accuracy of ``model`` on ``data`` attacked by PGD with ``attack``'s settings, batch by
    batch in order, the random starts drawn from ``generator``; ``predict(embeddings,
    classifier)`` is the loss's decision rule where it has one (else the argmax of the logits)."""
    model.eval()
    hits = 0
    for lo in range(0, len(data.y), batch_size):
        x = torch.from_numpy(data.x[lo : lo + batch_size]).to(device)
        y = torch.from_numpy(np.asarray(data.y[lo : lo + batch_size])).to(device)
        start = random_start(x.shape, attack.epsilon, attack.norm, generator) if attack.random_start else None
        with torch.enable_grad():
            x_adv = pgd(model_input_gradient(model, y), x, start, attack.epsilon, attack.steps, attack.step_size,
                        attack.norm)
        embeddings = model.features(x_adv)
        labels = predict(embeddings, model.head.weight) if predict else model.head(embeddings).argmax(1)
        hits += int((labels == y).sum())
    return hits / len(data.y)

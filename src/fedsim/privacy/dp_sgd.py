"""DP-SGD in the stacked engine: per-sample gradients of K clients at once, clipped and noised.

Abadi et al., "Deep Learning with Differential Privacy" (arXiv 1607.00133), Algorithm 1, for
each client k and step t of its local run:

    g_k = (sum_{b in batch} clip(grad l(w_k; x_b), C) + N(0, (z C)^2 I)) / B

with ``clip(g, C) = g min(1, C / ||g||)`` over all parameters together, B the configured
batch size (the fixed denominator), z the noise multiplier. The per-sample gradients are
nested inside the stacked clients: ``vmap`` over clients of ``vmap`` over samples of
``grad`` (torch.func), in chunks of clients so that K x B x D values stay within
:data:`fedsim.clients.batched.MAX_STACKED_VALUES`. Padding rows of a short batch are masked
out before the sum.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.func import grad, vmap

from fedsim.clients.hooks import ClientHook
from fedsim.privacy.noise import gaussian_noise_rows

__all__ = ["DPSGDStep", "clipped_noisy_sum"]

SampleLoss = Callable[[dict[str, torch.Tensor], torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""``(params, x, y) -> (loss, logits)`` of one sample under one client's parameters."""


def clipped_noisy_sum(per_sample: dict[str, torch.Tensor], mask: torch.Tensor, clip_norm: float,
                      noise: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """``sum_b mask_b clip(g_kb, C) + noise_k`` for per-sample gradients ``(K, B, *shape)``;
    ``noise`` is ``(K, D)`` in the parameters' order (None: no noise)."""
    norms = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.reshape(*g.shape[:2], -1), dim=2)
                                                  for g in per_sample.values()]), dim=0)
    scale = (clip_norm / norms.clamp_min(1e-12)).clamp(max=1.0) * mask
    summed, offset = {}, 0
    for name, g in per_sample.items():
        total = torch.einsum("kb,kb...->k...", scale.to(g.dtype), g)
        if noise is not None:
            width = total[0].numel()
            total = total + noise[:, offset:offset + width].reshape(total.shape).to(total.dtype)
            offset += width
        summed[name] = total
    return summed


class DPSGDStep(ClientHook):
    """The DP-SGD gradient of every stacked client (see the module docstring).

    Parameters
    ----------
    clip_norm : float
        C, the bound of each sample's gradient.
    noise_multiplier : float
        z.
    batch_size : int
        B, the denominator.
    keys : sequence of tuple
        Per stacked row, the key of its noise stream (run seed, round, client).
    max_values : int
        Per-sample gradient values computed at once.
    """

    per_sample_gradients = True

    def __init__(self, clip_norm: float, noise_multiplier: float, batch_size: int, keys: Sequence[tuple],
                 max_values: int) -> None:
        self.clip_norm, self.noise_multiplier, self.batch_size = clip_norm, noise_multiplier, batch_size
        self.keys, self.max_values = list(keys), max_values
        self.steps = 0

    def before_step(self, model: torch.nn.Module) -> None:
        raise RuntimeError("privacy.mechanism sample: DP-SGD runs in the stacked engine only")

    def stacked_before_step(self, params: dict[str, torch.Tensor]) -> None:
        return None

    def stacked_gradients(self, sample_loss: SampleLoss, params: dict[str, torch.Tensor], x: torch.Tensor,
                          y: torch.Tensor, mask: torch.Tensor
                          ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """The K clients' DP-SGD gradients, their batch losses ``(K,)`` and logits ``(K, B, C)``.

        ``params`` are stacked ``(K, *shape)`` (the first K rows of the stack, which keep their
        order), ``x`` and ``y`` are ``(K, B, ...)``, ``mask`` marks the real samples."""
        def loss_and_outputs(p, x1, y1):
            loss, logits = sample_loss(p, x1, y1)
            return loss, (loss, logits)

        per_client = vmap(vmap(grad(loss_and_outputs, has_aux=True), in_dims=(None, 0, 0)), in_dims=(0, 0, 0))
        k, b = mask.shape
        dim = sum(p[0].numel() for p in params.values())
        chunk = max(1, self.max_values // max(1, b * dim))
        detached = {name: p.detach() for name, p in params.items()}
        std = self.noise_multiplier * self.clip_norm
        grads: dict[str, list[torch.Tensor]] = {name: [] for name in params}
        losses, logits = [], []
        for lo in range(0, k, chunk):
            rows = slice(lo, min(k, lo + chunk))
            per_sample, (loss, logit) = per_client({n: p[rows] for n, p in detached.items()}, x[rows], y[rows])
            noise = gaussian_noise_rows(dim, std, [(*key, self.steps) for key in self.keys[rows]])
            for name, g in clipped_noisy_sum(per_sample, mask[rows], self.clip_norm, noise).items():
                grads[name].append(g / self.batch_size)
            m = mask[rows]
            losses.append((loss.detach() * m).sum(1) / m.sum(1).clamp_min(1.0))
            logits.append(logit.detach())
        self.steps += 1
        return {name: torch.cat(parts) for name, parts in grads.items()}, torch.cat(losses), torch.cat(logits)

"""DP-SGD in the stacked engine: per-sample gradients of K clients at once, clipped and noised.

Abadi et al., "Deep Learning with Differential Privacy" (arXiv 1607.00133), Algorithm 1, for
each client k and step t of its local run:

    g_k = (sum_{b in batch} clip(grad l(w_k; x_b), C) + N(0, (z C)^2 I)) / B

with ``clip(g, C) = g min(1, C / ||g||)`` over all parameters together, B the configured
batch size (the fixed denominator), z the noise multiplier. The per-sample gradients are
nested inside the stacked clients, in chunks of clients so that the per-sample values of a
chunk stay within :data:`fedsim.clients.batched.MAX_STACKED_VALUES`, by one of two routes that
compute the same sum:

- a model whose every parameter is the weight or bias of a ``nn.Linear`` called once per
  forward, trained by a loss that reads no parameter itself: ghost clipping
  (:mod:`fedsim.privacy.ghost_clipping`), each sample's norm from its layers' inputs and output
  gradients, then the clipped sum as one weighted product per layer; one batched forward and
  backward of every sample alone (``vmap`` over clients of ``vmap`` over samples), no
  per-sample gradient held;
- any other model: ``vmap`` over clients of ``vmap`` over samples of ``grad`` (torch.func),
  the per-sample gradients materialised, then clipped and summed.

Padding rows of a short batch are masked out of the sum. The noise of client k's step t is
the AES-CTR stream keyed by its key and t (:mod:`fedsim.privacy.noise`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.func import grad, vmap

from fedsim.clients.hooks import ClientHook
from fedsim.privacy.ghost_clipping import linear_clipped_sum, linear_layers, linear_norms_sq, parameter_name, tapped
from fedsim.privacy.noise import gaussian_noise_rows

__all__ = ["DPSGDStep", "clipped_noisy_sum", "ghost_clipped_noisy_sum"]

BatchLoss = Callable[[dict[str, torch.Tensor], torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""``(params, x, y) -> (losses (B,), logits (B, C))``: each sample's loss of one client's batch."""


def clip_factors(norms: torch.Tensor, mask: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """``mask_b min(1, C / ||g_b||)`` of each sample, ``(K, B)``."""
    return (clip_norm / norms.clamp_min(1e-12)).clamp(max=1.0) * mask


def _noised(summed: dict[str, torch.Tensor], noise: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """``summed`` (fresh sums, added to in place) plus the columns of ``noise`` ``(K, D)``,
    taken in the parameters' order."""
    if noise is None:
        return summed
    offset = 0
    for total in summed.values():
        width = total[0].numel()
        total.add_(noise[:, offset:offset + width].reshape(total.shape).to(total.dtype))
        offset += width
    return summed


def clipped_noisy_sum(per_sample: dict[str, torch.Tensor], mask: torch.Tensor, clip_norm: float,
                      noise: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """``sum_b mask_b clip(g_kb, C) + noise_k`` for per-sample gradients ``(K, B, *shape)``;
    ``noise`` is ``(K, D)`` in the parameters' order (None: no noise)."""
    norms = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.reshape(*g.shape[:2], -1), dim=2)
                                                  for g in per_sample.values()]), dim=0)
    factor = clip_factors(norms, mask, clip_norm)
    return _noised({name: torch.einsum("kb,kb...->k...", factor.to(g.dtype), g) for name, g in per_sample.items()},
                   noise)


def ghost_clipped_noisy_sum(layers: dict[str, nn.Linear], inputs: dict[str, torch.Tensor],
                            deltas: dict[str, torch.Tensor], names: Sequence[str], mask: torch.Tensor,
                            clip_norm: float, noise: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """:func:`clipped_noisy_sum` of the Linear ``layers``' per-sample gradients, given each
    layer's inputs ``(K, B, ..., in)`` and output gradients ``(K, B, ..., out)`` instead of the
    gradients (ghost clipping); ``names`` are the parameters (``layer.weight``, ``layer.bias``)
    in their order."""
    biased = {name: layer.bias is not None for name, layer in layers.items()}
    norms = sum(linear_norms_sq(inputs[name], deltas[name], biased[name]) for name in layers).sqrt()
    factor = clip_factors(norms, mask, clip_norm)
    summed = {}
    for name in layers:
        weight, bias = linear_clipped_sum(inputs[name], deltas[name], factor, biased[name])
        summed[parameter_name(name, "weight")], summed[parameter_name(name, "bias")] = weight, bias
    return _noised({name: summed[name] for name in names}, noise)


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
        Per-sample values (gradients, or layer inputs and output gradients) computed at once.
    """

    per_sample_gradients = True

    def __init__(self, clip_norm: float, noise_multiplier: float, batch_size: int, keys: Sequence[tuple],
                 max_values: int) -> None:
        self.clip_norm, self.noise_multiplier, self.batch_size = clip_norm, noise_multiplier, batch_size
        self.keys, self.max_values = list(keys), max_values
        self.steps = 0
        self._tap_shapes: dict[tuple, dict[str, tuple[int, ...]] | None] = {}

    def before_step(self, model: torch.nn.Module) -> None:
        raise RuntimeError("privacy.mechanism sample: DP-SGD runs in the stacked engine only")

    def stacked_before_step(self, params: dict[str, torch.Tensor]) -> None:
        return None

    def stacked_gradients(self, batch_loss: BatchLoss, model: nn.Module, params: dict[str, torch.Tensor],
                          x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, loss_reads_parameters: bool
                          ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """The K clients' DP-SGD gradients, their batch losses ``(K,)`` and logits ``(K, B, C)``.

        ``batch_loss`` evaluates ``model`` (whose parameters ``params`` name) under one client's
        parameters; ``loss_reads_parameters`` says that its loss also reads a parameter itself
        (a loss of the classifier's weights), which rules ghost clipping out. ``params`` are
        stacked ``(K, *shape)`` (the first K rows of the stack, which keep their order), ``x``
        and ``y`` are ``(K, B, ...)``, ``mask`` marks the real samples."""
        def sample_loss(p, x1, y1):
            loss, logits = batch_loss(p, x1[None], y1[None])
            return loss[0], logits[0]

        k, b = mask.shape
        detached = {name: p.detach() for name, p in params.items()}
        layers = None if loss_reads_parameters else linear_layers(model, set(params))
        shapes = None if layers is None else self._shapes(layers, sample_loss, detached, x, y)
        dim = sum(p[0].numel() for p in params.values())
        if shapes is None:  # a sample's gradient
            per_sample = dim
        else:  # a sample's T rows of each layer's inputs and output gradients, and their T x T Gram matrix
            per_sample = sum(math.prod(shape[:-1]) * (layers[name].in_features + shape[-1] + math.prod(shape[:-1]))
                             for name, shape in shapes.items())
        chunk = max(1, self.max_values // max(1, b * per_sample))
        std = self.noise_multiplier * self.clip_norm
        grads = {name: torch.empty_like(p) for name, p in detached.items()}
        losses, logits = [], []
        for lo in range(0, k, chunk):
            rows = slice(lo, min(k, lo + chunk))
            noise = gaussian_noise_rows(dim, std, [(*key, self.steps) for key in self.keys[rows]])
            chunk_params = {n: p[rows] for n, p in detached.items()}
            if shapes is None:
                summed, loss, logit = _materialised(sample_loss, chunk_params, x[rows], y[rows], mask[rows],
                                                    self.clip_norm, noise)
            else:
                summed, loss, logit = _ghost(sample_loss, layers, shapes, chunk_params, x[rows], y[rows], mask[rows],
                                             self.clip_norm, noise)
            for name, g in summed.items():
                torch.div(g, self.batch_size, out=grads[name][rows])
            m = mask[rows]
            losses.append((loss.detach() * m).sum(1) / m.sum(1).clamp_min(1.0))
            logits.append(logit.detach())
        self.steps += 1
        return grads, torch.cat(losses), torch.cat(logits)

    def _shapes(self, layers: dict[str, nn.Linear], sample_loss: Callable, params: dict[str, torch.Tensor],
                x: torch.Tensor, y: torch.Tensor) -> dict[str, tuple[int, ...]] | None:
        """Each layer's output shape for one sample (its tap's), from one sample's forward, or
        None when a layer is not called exactly once (shared, or skipped): ghost clipping's
        sum per layer would then miss or mix calls. Kept per sample shape."""
        key = (tuple(x.shape[2:]), tuple(y.shape[2:]))
        if key not in self._tap_shapes:
            inputs: dict[str, torch.Tensor] = {}
            calls: dict[str, int] = {}
            with torch.no_grad(), tapped(layers, None, inputs, calls):
                sample_loss({n: p[0] for n, p in params.items()}, x[0, 0], y[0, 0])
            once = all(calls.get(name) == 1 for name in layers)
            self._tap_shapes[key] = ({name: (*inputs[name].shape[:-1], layer.out_features)
                                      for name, layer in layers.items()} if once else None)
        return self._tap_shapes[key]


def _materialised(sample_loss: Callable, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                  mask: torch.Tensor, clip_norm: float, noise: torch.Tensor
                  ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """The clipped noisy sums, per-sample losses and logits of K clients from their per-sample
    gradients (``vmap`` of ``vmap`` of ``grad``)."""
    def loss_and_outputs(p, x1, y1):
        loss, logits = sample_loss(p, x1, y1)
        return loss, (loss, logits)

    per_client = vmap(vmap(grad(loss_and_outputs, has_aux=True), in_dims=(None, 0, 0)), in_dims=(0, 0, 0))
    per_sample, (loss, logits) = per_client(params, x, y)
    return clipped_noisy_sum(per_sample, mask, clip_norm, noise), loss, logits


def _ghost(sample_loss: Callable, layers: dict[str, nn.Linear], shapes: dict[str, tuple[int, ...]],
           params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, clip_norm: float,
           noise: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """The same from each layer's inputs and output gradients (ghost clipping): one forward
    of every sample alone with a zero tap on each layer's output, one backward to the taps."""
    def tapped_loss(p, taps, x1, y1):
        inputs: dict[str, torch.Tensor] = {}
        with tapped(layers, taps, inputs, {}):
            loss, logits = sample_loss(p, x1, y1)
        return loss, logits, inputs

    k, b = mask.shape
    dtype = next(iter(params.values())).dtype
    taps = {name: torch.zeros(k, b, *shape, dtype=dtype, device=x.device, requires_grad=True)
            for name, shape in shapes.items()}
    with torch.enable_grad():
        loss, logits, inputs = vmap(vmap(tapped_loss, in_dims=(None, 0, 0, 0)))(params, taps, x, y)
        # a layer whose output the loss does not read has zero output gradients
        deltas = dict(zip(taps, torch.autograd.grad(loss.sum(), list(taps.values()), materialize_grads=True),
                          strict=True))
    inputs = {name: a.detach() for name, a in inputs.items()}
    return ghost_clipped_noisy_sum(layers, inputs, deltas, list(params), mask, clip_norm, noise), loss, logits

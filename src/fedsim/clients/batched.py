"""Local training of many clients at once: K models stacked, one vectorised step for all.

The ``batched`` backend and grouped Ray nodes (``sim.clients_per_node``) train a group of
clients with this module instead of K calls of :func:`fedsim.clients.train.train_local`.
Every parameter is stacked to shape ``(K, *shape)`` and the model's forward runs once per
step for all K clients (``torch.func.functional_call`` under ``torch.func.vmap``), so the
per-client cost of small models (a Python loop, a model and an optimizer per client)
becomes one batched matrix product per layer.

It computes what K runs of ``train_local`` compute:

- each client draws its batches from its own generator with the same
  :func:`~fedsim.clients.train.batch_schedule`; clients of unequal sizes or step counts are
  padded to a common ``(K, batch_size)`` index array at each step, and a mask marks the real rows;
- each client's loss is the mean over its real rows of per-sample terms (the losses are
  built with ``reduction="none"``), so padding adds nothing;
- the optimizer is torch's own SGD or Adam over the stacked tensors: both update each
  element from its own gradient and state only, so row k gets exactly client k's update.
  Rows are ordered by decreasing step count, so the clients still training are always the
  first rows: a step runs on that prefix, a client whose run ended is copied out after its
  last step, and Adam's shared step count equals each active client's own;
- hooks contribute through their stacked forms (:mod:`fedsim.clients.hooks`; a loss term
  that reads embeddings gets the stacked ``(K, B, d)`` features); a hook that
  replaces a batch's inputs (an adversarial attack) gets every row's functional forward; a
  hook asking for per-sample gradients (DP-SGD, :mod:`fedsim.privacy.dp_sgd`) gets the
  per-sample losses of a client's batch and the model, and returns the gradients the
  optimizer steps with.

Not vectorised, and trained one client at a time by the caller (:func:`vectorisable_reason`
says why): what a client feature declares it cannot stack (quantized training, losses that
are not a mean of per-sample terms, an algorithm's client half without a stacked form), and
models with buffers (BatchNorm statistics of a padded batch would count the padding), and a
causal language model of transformers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, vmap

from fedsim.clients.hooks import ClientHook, stacked_extra_term
from fedsim.clients.objective import ClientObjective
from fedsim.clients.train import TrainResult, batch_schedule, build_optimizer
from fedsim.clients.training_features import stacked_reason
from fedsim.config import ClientConfig, ExperimentConfig
from fedsim.data import ArrayDataset
from fedsim.losses import REGISTRY

# At most this many values in one stacked tensor (the parameters, their gradients, the
# optimizer's state and the start each hold one): 128 MiB of float32, so a round of
# thousands of clients trains in several stacks instead of exhausting memory.
MAX_STACKED_VALUES = 1 << 25


def stack_size(dim: int) -> int:
    """How many clients of a ``dim``-parameter model train in one stack."""
    return max(1, MAX_STACKED_VALUES // max(dim, 1))


def per_sample_loss(name: str) -> bool:
    """Whether loss ``name`` is a mean of per-sample terms (its ``per_sample`` attribute)."""
    return getattr(REGISTRY[name], "per_sample", False)


def vectorisable_reason(cfg: ExperimentConfig, model: nn.Module) -> str | None:
    """Why the clients of ``cfg`` must train one at a time, or None when they vectorise: what
    a client feature declares (:func:`fedsim.clients.features.stacked_reason`), or buffers."""
    if (reason := stacked_reason(cfg)) is not None:
        return reason
    if cfg.model.name == "causal_lm":
        return ("model.name: 'causal_lm' is a transformers model, whose attention is not written for torch.func.vmap "
                "over stacked parameters")
    if any(True for _ in model.buffers()):
        return f"model.name: {cfg.model.name!r} has buffers (BatchNorm statistics would count the padding)"
    return None


class _FeaturesAndLogits(nn.Module):
    """The model's embedding and logits from one call (``functional_call`` calls forward)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embeddings = self.model.features(x)
        return embeddings, self.model.head(embeddings)


def _step_rows(schedules: list[list[torch.Tensor]], offsets: list[int], step: int, active: int, batch_size: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of the concatenated data the first ``active`` clients use at ``step``, ``(active, B)``,
    and the mask of real rows (padding points at row 0 with mask 0). Built per step: a grid
    of every client's every step would hold ``K x`` the longest client's steps ``x B``,
    mostly padding when client sizes are heavy-tailed."""
    batches = [schedules[k][step] for k in range(active)]
    lengths = torch.tensor([batch.numel() for batch in batches])
    real = torch.arange(batch_size) < lengths[:, None]
    index = torch.zeros(active, batch_size, dtype=torch.long)
    # a boolean mask takes values in row-major order: each row's batch, shifted to its client's rows
    index[real] = torch.cat(batches) + torch.repeat_interleave(torch.tensor(offsets[:active]), lengths)
    mask = real.to(torch.float32)
    return index, mask


def train_stacked(
    model: nn.Module,
    start: dict[str, torch.Tensor],
    datasets: Sequence[ArrayDataset],
    generators: Sequence[torch.Generator],
    cfg: ClientConfig,
    objective: ClientObjective,
    device: torch.device,
) -> tuple[dict[str, torch.Tensor], list[TrainResult]]:
    """Train K clients from their stacked start parameters; return their final parameters
    (stacked, on the CPU) and each one's :class:`~fedsim.clients.train.TrainResult`.

    Parameters
    ----------
    model : torch.nn.Module
        A model of the architecture (its own parameters are not used or changed).
    start : dict[str, torch.Tensor]
        Every parameter of ``model`` by name, stacked ``(K, *shape)``: row k is client k's start.
    datasets : sequence of ArrayDataset
        Client k's training data, none empty, in decreasing order of local steps
        (:func:`~fedsim.clients.train.local_steps`).
    generators : sequence of torch.Generator
        Client k's generator, drawn from as ``train_local`` would.
    cfg : ClientConfig
        Epochs or steps, batch size, optimizer.
    objective : ClientObjective
        Losses built per sample (``reduction="none"``); hooks with stacked forms, their
        stacked tensors in the same row order.
    device : torch.device
        Where to train.
    """
    schedules = [list(batch_schedule(len(d.y), cfg, g)) for d, g in zip(datasets, generators, strict=True)]
    steps = [len(s) for s in schedules]
    if steps != sorted(steps, reverse=True):
        raise ValueError("train_stacked: clients must come in decreasing order of local steps")
    sizes = [len(d.y) for d in datasets]
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).tolist()
    x_all = torch.from_numpy(np.concatenate([d.x for d in datasets])).to(device)
    y_all = torch.from_numpy(np.concatenate([d.y for d in datasets])).to(device)

    net = _FeaturesAndLogits(model)  # its own parameters are never used: every call passes them
    params = {name: start[name].to(device).clone().requires_grad_(True) for name, _ in model.named_parameters()}
    optimizer = build_optimizer(params.values(), cfg)

    def batch_losses(client_params, x, y):
        embeddings, logits = functional_call(net, {f"model.{n}": p for n, p in client_params.items()}, (x,))
        per_sample = objective.loss_terms(embeddings, logits, y, client_params["head.weight"],
                                          client_params.get("head.bias"))
        return per_sample, logits, embeddings

    def client_loss(client_params, x, y, m):
        per_sample, logits, embeddings = batch_losses(client_params, x, y)
        return (per_sample * m).sum() / m.sum().clamp_min(1.0), logits, embeddings

    def logits_of(client_params, x):
        return functional_call(net, {f"model.{n}": p for n, p in client_params.items()}, (x,))[1]

    def sample_losses(client_params, x, y):
        return batch_losses(client_params, x, y)[:2]

    losses_of = vmap(client_loss)
    private = next((hook for hook in objective.hooks if hook.per_sample_gradients), None)
    if private is not None and any(type(h).stacked_extra_loss is not ClientHook.stacked_extra_loss
                                   for h in objective.hooks):
        raise ValueError("per-sample gradients (DP-SGD) cover the loss only; a hook's extra loss term would escape them")
    num_clients = len(datasets)
    loss_sum = torch.zeros(num_clients, dtype=torch.float64, device=device)
    correct = torch.zeros(num_clients, dtype=torch.float64, device=device)
    final: dict[str, torch.Tensor] = {name: torch.empty_like(p, device="cpu") for name, p in params.items()}
    active = num_clients
    net.train()
    for s in range(max(steps)):
        still = sum(1 for n in steps if n > s)
        if still < active:  # rows still..active-1 took their last step before this one
            _copy_rows(params, final, still, active)
            active = still
            if 2 * active <= len(next(iter(params.values()))):  # half the leaves idle: drop them
                params, optimizer = _shrunk(params, optimizer, active, cfg)
        rows = {name: p[:active] for name, p in params.items()}
        index, m = (t.to(device) for t in _step_rows(schedules, offsets, s, active, cfg.batch_size))
        y = y_all[index]
        x = x_all[index]
        for hook in objective.hooks:
            x = hook.stacked_perturb_inputs(logits_of, {name: p.detach() for name, p in rows.items()}, x, y, m)
        optimizer.zero_grad(set_to_none=False)
        if private is None:
            losses, logits, embeddings = losses_of(rows, x, y, m)
            for hook in objective.hooks:
                term = stacked_extra_term(hook, rows, logits, m, embeddings)
                if term is not None:
                    losses = losses + term
            losses.sum().backward()
        else:  # DP-SGD: per-sample gradients, clipped and noised by the hook
            grads, losses, logits = private.stacked_gradients(sample_losses, model, rows, x, y, m,
                                                               "classifier" in objective.needs)
            for name, p in params.items():
                p.grad = torch.zeros_like(p) if p.grad is None else p.grad
                p.grad[:active] = grads[name]
        for hook in objective.hooks:
            hook.stacked_before_step(params)
        optimizer.step()
        for hook in objective.hooks:
            hook.stacked_after_step(params)
        with torch.no_grad():
            count = m.sum(1).double()
            loss_sum[:active] += losses.detach().double() * count
            correct[:active] += ((logits.argmax(-1) == y).double() * m).sum(1)
    _copy_rows(params, final, 0, active)
    seen = [sum(b.numel() for b in s) for s in schedules]
    results = [TrainResult(num_examples=n, steps=k, loss=float(ls) / c, accuracy=float(hit) / c)
               for n, k, ls, hit, c in zip(sizes, steps, loss_sum.tolist(), correct.tolist(), seen, strict=True)]
    return final, results


def _shrunk(params: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, rows: int, cfg: ClientConfig
            ) -> tuple[dict[str, torch.Tensor], torch.optim.Optimizer]:
    """The first ``rows`` rows of the stacked leaves and of the optimizer's state (momentum,
    Adam's moments), as new leaves and optimizer: the optimizer's step then costs what the
    clients still training need, not what the whole stack did (heavy-tailed client sizes
    leave a few long clients training alone)."""
    new = {name: p[:rows].detach().clone().requires_grad_(True) for name, p in params.items()}
    smaller = build_optimizer(new.values(), cfg)
    for old_p, new_p in zip(params.values(), new.values(), strict=True):
        if old_p in optimizer.state:
            smaller.state[new_p] = {k: v[:rows].clone() if torch.is_tensor(v) and v.dim() and v.shape[0] == len(old_p)
                                    else v for k, v in optimizer.state[old_p].items()}
    return new, smaller


@torch.no_grad()
def _copy_rows(params: dict[str, torch.Tensor], final: dict[str, torch.Tensor], lo: int, hi: int) -> None:
    for name, p in params.items():
        final[name][lo:hi] = p[lo:hi].detach().cpu()

"""DP-SGD in the stacked engine: the nested per-sample gradients are each sample's own,
clipped to the clip norm, and a stacked step moves no client further than lr * C."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedsim.clients.batched import train_stacked
from fedsim.clients.objective import ClientObjective
from fedsim.config import ClientConfig
from fedsim.data import ArrayDataset
from fedsim.losses.cross_entropy import CrossEntropyLoss
from fedsim.models.registry import build_model
from fedsim.privacy.dp_sgd import DPSGDStep, clipped_noisy_sum


def _model():
    with torch.random.fork_rng():  # the model's initialisation, without touching the global generator
        torch.manual_seed(0)
        return build_model("mlp", (6,), 3, hidden=(5,))




def _sample_loss(model):
    def loss(params, x, y):
        logits = torch.func.functional_call(model, params, (x[None],))
        return F.cross_entropy(logits, y[None]), logits[0]
    return loss


def test_clipped_noisy_sum_is_the_sum_of_each_samples_clipped_gradient():
    gen = torch.Generator().manual_seed(0)
    g = {"a": torch.randn(2, 3, 4, generator=gen), "b": torch.randn(2, 3, generator=gen)}
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    summed = clipped_noisy_sum(g, mask, 0.7, None)
    for k in range(2):
        expected_a, expected_b = torch.zeros(4), torch.zeros(())
        for b in range(3):
            norm = torch.cat([g["a"][k, b], g["b"][k, b, None]]).norm()
            scale = min(1.0, 0.7 / float(norm)) * float(mask[k, b])
            expected_a, expected_b = expected_a + scale * g["a"][k, b], expected_b + scale * g["b"][k, b]
        assert torch.allclose(summed["a"][k], expected_a, atol=1e-6)
        assert torch.allclose(summed["b"][k], expected_b, atol=1e-6)


def test_nested_per_sample_gradients_are_each_samples_own():
    gen = torch.Generator().manual_seed(0)
    model = _model()
    params = {n: torch.stack([p.detach(), p.detach() * 1.5]) for n, p in model.named_parameters()}
    x, y = torch.randn(2, 4, 6, generator=gen), torch.randint(0, 3, (2, 4), generator=gen)
    mask = torch.ones(2, 4)
    hook = DPSGDStep(clip_norm=1e6, noise_multiplier=0.0, batch_size=4, keys=[(0,), (1,)], max_values=50)
    grads, losses, _ = hook.stacked_gradients(_sample_loss(model), params, x, y, mask)
    for k in range(2):
        one = {n: p[k].clone().requires_grad_(True) for n, p in params.items()}
        logits = torch.func.functional_call(model, one, (x[k],))
        loss = F.cross_entropy(logits, y[k])
        reference = torch.autograd.grad(loss, list(one.values()))
        for name, ref in zip(one, reference, strict=True):
            assert torch.allclose(grads[name][k], ref, atol=1e-5)  # no clipping: the batch mean's gradient
        assert losses[k] == pytest.approx(float(loss), rel=1e-5)


def test_a_stacked_dp_sgd_step_moves_no_client_further_than_lr_times_the_clip_norm():
    gen = torch.Generator().manual_seed(0)
    model = _model()
    clients = [ArrayDataset(torch.randn(12, 6, generator=gen).numpy() * 50,
                            torch.randint(0, 3, (12,), generator=gen).numpy(), 3, "test")
               for _ in range(3)]
    start = {n: torch.stack([p.detach()] * 3) for n, p in model.named_parameters()}
    cfg = ClientConfig(local_steps=1, batch_size=4, lr=0.1)
    def moved(clip_norm):
        hook = DPSGDStep(clip_norm, noise_multiplier=0.0, batch_size=4, keys=[(k,) for k in range(3)],
                         max_values=1 << 20)
        objective = ClientObjective(CrossEntropyLoss(reduction="none"), hooks=(hook,))
        final, _ = train_stacked(model, start, clients, [torch.Generator().manual_seed(k) for k in range(3)], cfg,
                                 objective, torch.device("cpu"))
        return torch.sqrt(sum((final[n] - start[n]).flatten(1).pow(2).sum(1) for n in start))

    assert (moved(0.2) <= 0.1 * 0.2 * (1 + 1e-5)).all()
    assert (moved(1e6) > 10 * 0.1 * 0.2).all()  # unclipped, the inputs' scale moves them far


def test_dp_sgd_noise_has_std_z_c_over_b_per_coordinate():
    gen = torch.Generator().manual_seed(0)
    model = _model()
    params = {n: torch.stack([p.detach()] * 2) for n, p in model.named_parameters()}
    x, y = torch.randn(2, 4, 6, generator=gen), torch.randint(0, 3, (2, 4), generator=gen)
    mask = torch.zeros(2, 4)  # no sample: the gradient is the noise alone
    hook = DPSGDStep(clip_norm=0.5, noise_multiplier=2.0, batch_size=4, keys=[(0,), (1,)], max_values=1 << 20)
    draws = []
    for _ in range(30):
        grads, _, _ = hook.stacked_gradients(_sample_loss(model), params, x, y, mask)
        draws.append(torch.cat([g.flatten(1) for g in grads.values()], dim=1))
    values = torch.cat(draws).flatten()
    assert float(values.std()) == pytest.approx(2.0 * 0.5 / 4, rel=4 / (2 * len(values)) ** 0.5)


def test_the_hook_refuses_to_run_one_client_at_a_time():
    hook = DPSGDStep(1.0, 1.0, 4, [(0,)], 1 << 20)
    with pytest.raises(RuntimeError, match="stacked engine"):
        hook.before_step(nn.Linear(2, 2))

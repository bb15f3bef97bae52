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
from fedsim.privacy.ghost_clipping import linear_layers


def _model():
    with torch.random.fork_rng():  # the model's initialisation, without touching the global generator
        torch.manual_seed(0)
        return build_model("mlp", (6,), 3, hidden=(5,))


def _batch_loss(model, reads_head=False):
    """Cross-entropy of each sample, plus ``0.1 ||W_head||^2`` when the loss reads the head itself."""
    def loss(params, x, y):
        logits = torch.func.functional_call(model, params, (x,))
        own = 0.1 * params["head.weight"].square().sum() if reads_head else 0.0
        return F.cross_entropy(logits, y, reduction="none") + own, logits
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


class _TwiceLinear(nn.Module):
    """One Linear applied twice: ghost clipping's one-call-per-layer sum does not hold."""

    def __init__(self) -> None:
        super().__init__()
        self.square, self.head = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.square(torch.relu(self.square(x))))


class _RowsLinear(nn.Module):
    """A Linear over each of a sample's 2 rows of 3 features (T = 2), then one over both."""

    def __init__(self) -> None:
        super().__init__()
        self.rows, self.head = nn.Linear(3, 4), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.relu(self.rows(x.reshape(*x.shape[:-1], 2, 3))).flatten(-2))


class _UnreadLinear(nn.Module):
    """A Linear whose output the loss never reads: its gradients are zero."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden, self.unread, self.head = nn.Linear(6, 5), nn.Linear(5, 2), nn.Linear(5, 3)

    def forward(self, x):
        h = torch.relu(self.hidden(x))
        self.unread(h)
        return self.head(h)


def _route_model(route):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return {"ghost": lambda: build_model("mlp", (6,), 3, hidden=(5,)),
                "rows": _RowsLinear,
                "loss reads parameters": lambda: build_model("mlp", (6,), 3, hidden=(5,)),
                "layer norm": lambda: build_model("mlp", (6,), 3, hidden=(5,), norm="layer"),
                "linear twice": _TwiceLinear,
                "unread layer": _UnreadLinear}[route]()


ROUTES = ["ghost", "rows", "loss reads parameters", "layer norm", "linear twice", "unread layer"]


@pytest.mark.parametrize("route", ROUTES)
def test_nested_per_sample_gradients_are_each_samples_own(route):
    gen = torch.Generator().manual_seed(0)
    model = _route_model(route)
    params = {n: torch.stack([p.detach(), p.detach() * 1.5]) for n, p in model.named_parameters()}
    x, y = torch.randn(2, 4, 6, generator=gen), torch.randint(0, 3, (2, 4), generator=gen)
    mask = torch.ones(2, 4)
    hook = DPSGDStep(clip_norm=1e6, noise_multiplier=0.0, batch_size=4, keys=[(0,), (1,)], max_values=50)
    reads = route == "loss reads parameters"
    grads, losses, _ = hook.stacked_gradients(_batch_loss(model, reads), model, params, x, y, mask, reads)
    for k in range(2):
        one = {n: p[k].clone().requires_grad_(True) for n, p in params.items()}
        logits = torch.func.functional_call(model, one, (x[k],))
        loss = F.cross_entropy(logits, y[k]) + (0.1 * one["head.weight"].square().sum() if reads else 0.0)
        reference = torch.autograd.grad(loss, list(one.values()), materialize_grads=True)
        for name, ref in zip(one, reference, strict=True):
            assert torch.allclose(grads[name][k], ref, atol=1e-5)  # no clipping: the batch mean's gradient
        assert float(losses[k]) == pytest.approx(float(loss), rel=1e-5)


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
        grads, _, _ = hook.stacked_gradients(_batch_loss(model), model, params, x, y, mask, False)
        draws.append(torch.cat([g.flatten(1) for g in grads.values()], dim=1))
    values = torch.cat(draws).flatten()
    assert float(values.std()) == pytest.approx(2.0 * 0.5 / 4, rel=4 / (2 * len(values)) ** 0.5)


def test_the_hook_refuses_to_run_one_client_at_a_time():
    hook = DPSGDStep(1.0, 1.0, 4, [(0,)], 1 << 20)
    with pytest.raises(RuntimeError, match="stacked engine"):
        hook.before_step(nn.Linear(2, 2))


@pytest.mark.parametrize("route", ["ghost", "rows", "layer norm", "linear twice", "unread layer"])
def test_ghost_clipping_and_materialised_per_sample_gradients_give_the_same_clipped_noisy_sum(route):
    gen = torch.Generator().manual_seed(1)
    model = _route_model(route)
    params = {n: torch.stack([p.detach() * s for s in (1.0, -0.7, 2.0)]) for n, p in model.named_parameters()}
    x, y = torch.randn(3, 5, 6, generator=gen) * 3, torch.randint(0, 3, (3, 5), generator=gen)
    mask = torch.ones(3, 5)
    mask[1, 3:] = 0.0
    def run(reads):  # the same keys: the same noise
        hook = DPSGDStep(clip_norm=0.4, noise_multiplier=0.5, batch_size=5, keys=[(k,) for k in range(3)],
                         max_values=40)
        return hook.stacked_gradients(_batch_loss(model), model, params, x, y, mask, reads)

    (fast, losses, logits), (reference, ref_losses, ref_logits) = run(False), run(True)
    for name in params:
        assert torch.allclose(fast[name], reference[name], atol=1e-6, rtol=1e-5), name
    assert torch.allclose(losses, ref_losses) and torch.allclose(logits, ref_logits)


def test_ghost_clipping_of_two_samples_by_hand():
    # one Linear z = w . a + b, w = (1, 0), b = 0, loss z^2 / 2: a sample's gradients are z a and z
    layer = nn.Linear(2, 1)
    params = {"weight": torch.tensor([[[1.0, 0.0]]]), "bias": torch.zeros(1, 1)}
    x, y = torch.tensor([[[3.0, 4.0], [0.6, 0.0]]]), torch.zeros(1, 2, dtype=torch.long)
    def half_square(p, xb, yb):
        z = torch.func.functional_call(layer, p, (xb,))
        return 0.5 * z[:, 0] ** 2, z

    # sample 1: z = 3, gradient (9, 12 | 3), norm sqrt(234) > 1: scaled by 1 / sqrt(234)
    # sample 2: z = 0.6, gradient (0.36, 0 | 0.6), norm 0.6997 < 1: kept; B = 2
    c = 1 / 234 ** 0.5
    expected_w = torch.tensor([[[(9 * c + 0.36) / 2, 12 * c / 2]]])
    expected_b = torch.tensor([[(3 * c + 0.6) / 2]])
    for reads in (False, True):
        hook = DPSGDStep(clip_norm=1.0, noise_multiplier=0.0, batch_size=2, keys=[(0,)], max_values=1 << 20)
        grads, losses, _ = hook.stacked_gradients(half_square, layer, params, x, y, torch.ones(1, 2), reads)
        assert torch.allclose(grads["weight"], expected_w, atol=1e-7)
        assert torch.allclose(grads["bias"], expected_b, atol=1e-7)
        assert float(losses[0]) == pytest.approx((4.5 + 0.18) / 2)


def test_ghost_clipping_takes_models_of_linear_layers_only():
    assert set(linear_layers(_route_model("ghost"), {"body.1.weight", "body.1.bias", "head.weight", "head.bias"})) \
        == {"body.1", "head"}
    layer_norm = _route_model("layer norm")
    assert linear_layers(layer_norm, {n for n, _ in layer_norm.named_parameters()}) is None
    tied = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    tied[1].weight = tied[0].weight
    assert linear_layers(tied, {n for n, _ in tied.named_parameters()}) is None

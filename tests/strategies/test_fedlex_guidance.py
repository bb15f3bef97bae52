"""FedLEx: guidance matrix normalisation, non-trivial after exploration, masked gradients."""

import pytest
import torch

from fedsim.algorithms.fedlex import apply_guidance, guidance_matrix


def test_guidance_is_min_max_normalised_mean_squared_drift():
    base = {"w": torch.zeros(2, 2), "b": torch.ones(3), "steps": torch.tensor(4)}
    scouts = [
        {"w": torch.tensor([[1.0, 0.0], [2.0, 0.0]]), "b": torch.ones(3), "steps": torch.tensor(9)},
        {"w": torch.tensor([[1.0, 0.0], [0.0, 0.0]]), "b": torch.ones(3), "steps": torch.tensor(9)},
    ]
    guidance = guidance_matrix(base, scouts)
    # mean squared drift of w: [[1, 0], [2, 0]] -> min-max -> [[0.5, 0], [1, 0]]
    torch.testing.assert_close(guidance["w"], torch.tensor([[0.5, 0.0], [1.0, 0.0]]))
    # b never moved: constant drift -> all ones (trains as plain FedAvg)
    torch.testing.assert_close(guidance["b"], torch.ones(3))
    assert "steps" not in guidance  # integer buffers are skipped


def test_guidance_is_not_all_ones_after_exploration():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    base = {k: v.clone() for k, v in model.state_dict().items()}
    scouts = []
    for scout in range(3):
        model.load_state_dict(base)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        gen = torch.Generator().manual_seed(scout)
        x = torch.randn(32, 8, generator=gen)
        y = torch.full((32,), scout % 2)  # label-skewed scouts: classes 0 and 1 only
        for _ in range(5):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        scouts.append({k: v.clone() for k, v in model.state_dict().items()})
    guidance = guidance_matrix(base, scouts)
    assert set(guidance) == set(base)
    for name, m in guidance.items():
        assert m.shape == base[name].shape
        assert float(m.min()) == 0.0 and float(m.max()) == 1.0
        assert not bool((m == 1).all()), name  # the authors' all-ones mask would fail here


def test_apply_guidance_multiplies_gradients_elementwise():
    torch.manual_seed(1)
    model = torch.nn.Linear(3, 2)
    model(torch.randn(5, 3)).square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    guidance = {"weight": torch.rand(2, 3), "bias": torch.tensor([0.0, 1.0]), "unused_buffer": torch.ones(1)}
    apply_guidance(model, guidance)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, grads[name] * guidance[name], rtol=0, atol=0)
    # Also accepts (name, parameter) pairs; a zero entry freezes that coordinate under SGD.
    before = model.bias.detach().clone()
    apply_guidance(model.named_parameters(), guidance)
    torch.optim.SGD(model.parameters(), lr=1.0).step()
    assert float(model.bias.detach()[0]) == float(before[0])
    assert float(model.bias.detach()[1]) != float(before[1])


def test_guidance_errors_are_clear():
    model = torch.nn.Linear(2, 1)
    model(torch.ones(1, 2)).sum().backward()
    with pytest.raises(ValueError, match="no guidance for parameter 'bias'"):
        apply_guidance(model, {"weight": torch.ones(1, 2)})
    with pytest.raises(ValueError, match="shape"):
        apply_guidance(model, {"weight": torch.ones(2, 1), "bias": torch.ones(1)})
    with pytest.raises(ValueError, match="scout 0 has no entry"):
        guidance_matrix({"w": torch.zeros(2)}, [{}])
    with pytest.raises(ValueError, match="at least one scout"):
        guidance_matrix({"w": torch.zeros(2)}, [])

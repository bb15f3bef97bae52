"""LEAF's Shakespeare model: shapes, the LSTM it computes, and its stacked (vmap) form."""

import pytest
import torch
from torch import nn
from torch.func import functional_call, vmap

from fedsim.models import build_model


def test_leafs_shapes_and_parameter_count():
    torch.manual_seed(0)
    model = build_model("char_lstm", (80,), num_classes=80)
    x = torch.randint(0, 80, (3, 80))
    assert model(x).shape == (3, 80) and model.features(x).shape == (3, 256) == (3, model.embedding_dim)
    assert model.embedding.weight.shape == (80, 8)
    assert sum(p.numel() for p in model.parameters()) == 819_920  # LEAF's stacked_lstm, with torch's two biases


def test_it_is_torchs_lstm_with_tensorflows_forget_bias():
    torch.manual_seed(0)
    model = build_model("char_lstm", (12,), num_classes=20, hidden_size=16)
    reference = nn.LSTM(8, 16, num_layers=2, batch_first=True)
    state = {name: p.detach().clone() for name, p in model.named_parameters() if "_l" in name}
    for layer in range(2):
        state[f"bias_ih_l{layer}"][16:32] += 1.0  # the forget gate's slice (gate order i, f, g, o)
    reference.load_state_dict(state)
    x = torch.randint(0, 20, (4, 12))
    expected = reference(model.embedding(x))[0][:, -1]
    torch.testing.assert_close(model.features(x), expected)


def test_clients_stack_under_vmap():
    torch.manual_seed(0)
    model = build_model("char_lstm", (10,), num_classes=20, hidden_size=8)
    stacked = {n: torch.stack([p.detach(), p.detach() + 0.1]) for n, p in model.named_parameters()}
    x = torch.randint(0, 20, (2, 5, 10))
    out = vmap(lambda params, xb: functional_call(model, params, (xb,)))(stacked, x)
    for k in range(2):
        torch.testing.assert_close(out[k], functional_call(model, {n: p[k] for n, p in stacked.items()}, (x[k],)))


def test_refuses_image_inputs():
    with pytest.raises(ValueError, match="not a window of characters"):
        build_model("char_lstm", (1, 8, 8), num_classes=10)

"""causal_lm: a LoRA-adapted transformers model whose state dict is its adapter, trained by
fedsim's local loop exactly as a plain peft training step, scored by exp(mean token NLL)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedsim.clients.objective import ClientObjective
from fedsim.clients.train import evaluate_many, train_local
from fedsim.config import ClientConfig
from fedsim.data import ArrayDataset
from fedsim.losses import LinearCrossEntropy
from fedsim.models import build_model
from fedsim.params import ParamSpec

VOCAB, SEQ = 48, 8
TINY = {"model_type": "llama", "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 32}
LORA = {"kind": "lora", "r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}


def _model(adapter=LORA, base_quant="none", seed=0):
    torch.manual_seed(seed)
    return build_model("causal_lm", (SEQ + 1,), VOCAB, config=TINY, adapter=adapter, base_quant=base_quant)


def _blocks(n=6, seed=1):
    x = np.random.default_rng(seed).integers(0, VOCAB, size=(n, SEQ + 1)).astype(np.int64)
    return ArrayDataset(x=x, y=x[:, -1].copy(), num_classes=VOCAB, name="tokens")


def _perturb_adapter(model):
    """LoRA's B starts at zero; a nonzero B makes A's gradient nonzero too."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))


def test_the_state_dict_holds_the_adapter_only():
    model = _model()
    names = list(model.state_dict())
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert len(names) == 2 * 2 * 2  # two layers, q_proj and v_proj, A and B
    spec = ParamSpec.of(model)
    assert spec.dim == 2 * 2 * (4 * 32 + 32 * 4)


def test_full_fine_tuning_sends_every_weight_once():
    model = _model(adapter={"kind": "none"})
    unique = {id(p) for p in model.parameters()}
    assert ParamSpec.of(model).dim == sum(p.numel() for p in model.parameters() if id(p) in unique)


def test_one_local_step_is_a_plain_peft_training_step():
    model, reference = _model(), _model()
    _perturb_adapter(model), _perturb_adapter(reference)
    data = _blocks()
    cfg = ClientConfig(local_steps=1, batch_size=len(data.y), optimizer="sgd", lr=0.5)
    train_local(model, data, cfg, ClientObjective(LinearCrossEntropy()), torch.Generator().manual_seed(0),
                torch.device("cpu"))
    # the reference: transformers' own shifted next-token loss of the peft model, one SGD step by hand
    peft_model = reference.lm
    x = torch.from_numpy(data.x)
    loss = peft_model(input_ids=x, labels=x).loss
    loss.backward()
    with torch.no_grad():
        expected = {n: p - 0.5 * p.grad for n, p in reference.named_parameters() if p.requires_grad}
    got = dict(model.named_parameters())
    assert expected and all(".lora_" in n for n in expected)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6)
    frozen = {n: p for n, p in reference.named_parameters() if not p.requires_grad}
    for name, value in frozen.items():  # the base did not move
        torch.testing.assert_close(got[name], value, rtol=0, atol=0)


def test_cut_cross_entropy_and_full_logits_train_the_same_step():
    a, b = _model(), _model()
    _perturb_adapter(a), _perturb_adapter(b)
    data, cfg = _blocks(), ClientConfig(local_steps=2, batch_size=3, optimizer="adam", lr=0.01)
    from fedsim.losses import CrossEntropyLoss

    for model, loss in ((a, LinearCrossEntropy()), (b, CrossEntropyLoss())):
        train_local(model, data, cfg, ClientObjective(loss), torch.Generator().manual_seed(0), torch.device("cpu"))
    for name, value in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[name], value, rtol=1e-4, atol=1e-6)


def test_perplexity_is_exp_of_the_mean_token_nll():
    model = _model()
    _perturb_adapter(model)
    sets = [_blocks(3, seed=5), _blocks(4, seed=6)]
    results = evaluate_many(model, sets, torch.device("cpu"), batch_size=2)
    for data, result in zip(sets, results, strict=True):
        x = torch.from_numpy(data.x)
        with torch.no_grad():
            logits = model.lm(input_ids=x[:, :-1]).logits
        nll = -F.log_softmax(logits.double(), dim=-1).gather(2, x[:, 1:, None]).squeeze(2)
        assert nll.numel() == len(x) * SEQ
        assert math.exp(result.loss) == pytest.approx(math.exp(float(nll.mean())), rel=1e-5)
        hits = (logits.argmax(-1) == x[:, 1:]).double().mean()
        assert result.accuracy == pytest.approx(float(hits))


@pytest.mark.parametrize(("fmt", "tolerance"), [("int8", 0.02), ("int4", 0.3)])
def test_a_quantized_base_computes_within_tolerance_of_float(fmt, tolerance):
    float_model, quantized = _model(), _model(base_quant=fmt)
    x = torch.from_numpy(_blocks(4).x)
    with torch.no_grad():
        want, got = float_model.lm(input_ids=x).logits, quantized.lm(input_ids=x).logits
    relative = float((got - want).norm() / want.norm())
    assert 0 < relative < tolerance
    assert list(quantized.state_dict()) == list(float_model.state_dict())  # the same adapter travels
    stored = {n: b for n, b in quantized.named_buffers() if n.endswith(".codes")}
    assert len(stored) == 2 * 7  # every linear layer of both blocks (the output embedding stays float)
    weights = sum(m.weight.numel() for n, m in float_model.named_modules()
                  if isinstance(m, torch.nn.Linear) and "lora_" not in n and m is not float_model.head)
    assert sum(b.numel() * b.element_size() for b in stored.values()) == weights * {"int8": 1, "int4": 0.5}[fmt]


def test_lora_dropout_draws_from_the_client_generator():
    adapter = {**LORA, "dropout": 0.5}
    runs = []
    for seed in (0, 0, 1):
        model = _model(adapter=adapter)
        _perturb_adapter(model)
        cfg = ClientConfig(local_steps=2, batch_size=3, optimizer="sgd", lr=0.5)
        train_local(model, _blocks(), cfg, ClientObjective(LinearCrossEntropy()), torch.Generator().manual_seed(seed),
                    torch.device("cpu"))
        runs.append(torch.cat([v.reshape(-1) for v in model.state_dict().values()]))
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
    assert not torch.equal(runs[0], runs[2])


def test_a_local_model_directory_gives_its_weights(tmp_path):
    saved = _model(adapter={"kind": "none"}, seed=4)
    saved.lm.save_pretrained(tmp_path / "model")
    loaded = build_model("causal_lm", (SEQ + 1,), VOCAB, path=str(tmp_path / "model"), adapter=LORA)
    x = torch.from_numpy(_blocks(2).x)
    with torch.no_grad():  # LoRA's B starts at zero: the adapted model computes the saved one
        torch.testing.assert_close(loaded.lm(input_ids=x).logits, saved.lm(input_ids=x).logits)
    assert all(".lora_" in name for name in loaded.state_dict())

"""Federated fine-tuning of a causal language model: only the adapter travels, rows carry
perplexity, a run resumes exactly, and what cannot run is refused in one line."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from fedsim.config import ConfigError, validate_config
from fedsim.outputs.results import RunDir
from fedsim.params import ParamSpec
from fedsim.runner import run_experiment
from fedsim.sim.components import federated_data, make_model

SPEECH = ("Before we proceed any further, hear me speak. You are all resolved rather to die than to famish? "
          "First, you know Caius Marcius is chief enemy to the people. Let us kill him, and we'll have corn at "
          "our own price. Is't a verdict? No more talking on't; let it be done: away, away! ")


def _play(tmp_path: Path) -> Path:
    path = tmp_path / "play.txt"
    roles = ("FIRST CITIZEN", "SECOND CITIZEN", "MENENIUS", "MARCIUS")
    path.write_text("\n\n".join(f"{role}:\n{SPEECH[i * 7:] + SPEECH[: i * 7]}" for _ in range(4)
                                for i, role in enumerate(roles)))
    return path


def _raw(tmp_path: Path, **changes) -> dict:
    raw = {
        "name": "lm", "seed": 0, "rounds": 2,
        "data": {"name": "shakespeare", "path": str(_play(tmp_path)), "min_samples": 4,
                 "tokenizer": {"kind": "bpe", "vocab_size": 300}, "seq_len": 8},
        "partition": {"scheme": "natural", "num_clients": 4},
        "model": {"name": "causal_lm",
                  "config": {"model_type": "llama", "vocab_size": 300, "hidden_size": 32, "intermediate_size": 48,
                             "num_hidden_layers": 1, "num_attention_heads": 4, "max_position_embeddings": 32},
                  "adapter": {"kind": "lora", "r": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"]}},
        "strategy": {"name": "fedavg", "fraction_train": 0.5},
        "client": {"local_steps": 2, "batch_size": 4, "optimizer": "adam", "lr": 0.01},
        "loss": {"name": "linear_cross_entropy"},
        "sim": {"backend": "inprocess"},
        "output": {"dir": str(tmp_path / "runs"), "plots": False, "checkpoint_every": 1},
    }
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            raw[section] = {**raw[section], field: value}
        else:
            raw[section] = value
    return raw


def _checkpoint(run_path, round_):
    return torch.load(Path(run_path) / "checkpoints" / f"round-{round_:05d}.pt", weights_only=False)


def test_only_the_adapter_travels_and_rows_carry_perplexity(tmp_path):
    cfg = validate_config(_raw(tmp_path))
    run, _ = run_experiment(cfg)
    spec = ParamSpec.of(make_model(cfg.model, federated_data(cfg).train, cfg.seed))
    assert all(".lora_A." in n or ".lora_B." in n for n in spec.names)
    assert spec.dim == 2 * (2 * 32 + 32 * 2)  # q_proj and v_proj of one layer, rank 2
    vector = 4 * spec.dim + 6  # a float32 identity payload: values plus its header
    for row in RunDir.open(run).rows():
        assert row["bytes_up"] == row["num_success"] * vector
        assert row["bytes_down"] == row["num_sampled"] * vector
        assert row["perplexity"] == pytest.approx(math.exp(row["centralised_loss"]))
        assert row["federated_perplexity"] == pytest.approx(math.exp(row["federated_loss"]))
        assert row["client_perplexity_p10"] <= row["client_perplexity_p50"] <= row["client_perplexity_p90"]
        assert row["train_tokens_per_s"] > 0
    assert set(_checkpoint(run, 2)["model"]) == set(spec.names)


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path):
    cfg = validate_config(_raw(tmp_path, rounds=3, model__adapter={"kind": "lora", "r": 2, "alpha": 4,
                                                                    "dropout": 0.2}))
    reference, _ = run_experiment(cfg)
    interrupted, _ = run_experiment(cfg)
    run = RunDir.open(interrupted)
    (run.checkpoint_dir / "round-00003.pt").unlink()
    run.truncate_after(2)
    resumed, _ = run_experiment(cfg, resume=interrupted)
    want, got = _checkpoint(reference, 3)["model"], _checkpoint(resumed, 3)["model"]
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=0)


@pytest.mark.parametrize(("changes", "keys"), [
    ({"model__adapter": {"kind": "lora", "target_modules": ["c_attn"]}}, ("model.adapter.target_modules", "c_attn")),
    ({"data__tokenizer": {"kind": "bpe", "vocab_size": 512}}, ("model.config", "data.tokenizer")),
    ({"model__base_quant": "int4", "model__adapter": {"kind": "none"}}, ("model.base_quant", "model.adapter.kind")),
    ({"model": {"name": "char_lstm"}}, ("data.tokenizer", "model.name")),
    ({"data__seq_len": 64}, ("data.seq_len", "max_position_embeddings")),
    ({"loss": {"name": "dice"}}, ("loss.name", "causal_lm")),
    ({"personalization": {"method": "fedper"}}, ("personalization.method", "causal_lm")),
])
def test_impossible_combinations_are_refused_in_one_line(tmp_path, changes, keys):
    with pytest.raises(ConfigError) as refused:
        validate_config(_raw(tmp_path, **changes))
    lines = str(refused.value).splitlines()
    assert any(all(key in line for key in keys) for line in lines), lines

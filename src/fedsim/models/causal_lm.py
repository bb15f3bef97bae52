"""A causal language model of transformers, with an optional LoRA adapter (peft) and a
weight-only integer base, as a model of the zoo.

transformers and peft are imported when a model is built, not with this module: the client
path of a deployed node imports the model zoo for every message.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from fedsim.models.classifier import EmbeddingClassifier
from fedsim.quant.torchao_import import quiet_torchao_import
from fedsim.quant.weight_only import quantize_frozen_linears


def transformers_config(config: Mapping[str, Any] | None, path: str | None, vocab_size: int | None = None):
    """The ``transformers`` config of a model given as a config mapping (``model_type``,
    ``llama`` by default, and the config's fields) or as a local model directory; ``vocab_size``,
    when given, fills a mapping that has none."""
    with quiet_torchao_import():
        from transformers import AutoConfig

    if path is not None:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    fields = dict(config or {})
    if vocab_size is not None:
        fields.setdefault("vocab_size", vocab_size)
    return AutoConfig.for_model(fields.pop("model_type", "llama"), **fields)


def linear_layer_names(config: Mapping[str, Any] | None, path: str | None) -> set[str]:
    """The last name part of every ``nn.Linear`` of the model (what LoRA's ``target_modules``
    match), read from a model built on the meta device (no memory, no weights)."""
    with quiet_torchao_import():  # building a model imports torchao
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(transformers_config(config, path))
    return {name.rpartition(".")[2] for name, module in model.named_modules() if isinstance(module, nn.Linear)}


class CausalLM(EmbeddingClassifier):
    """A decoder-only language model trained on next-token prediction.

    A sample is a block of ``seq_len + 1`` token ids; the model reads its first ``seq_len``
    and predicts each next one, so one sample gives ``seq_len`` rows of (hidden state, next
    token): ``features(x)`` is ``(B * seq_len, hidden)``, ``targets(x, y)`` the ``B * seq_len``
    next tokens, and ``head`` the output embedding (bias-free, so Cut Cross-Entropy,
    ``loss.name: linear_cross_entropy``, takes its weight without the logits being formed).

    With a LoRA adapter (Hu et al., arXiv 2106.09685; through peft) the base is frozen, and
    only the adapter's tensors are in ``state_dict``: what the server sends, the clients train
    and send back, the aggregators average and checkpoints keep. The frozen base is a function
    of the config and the seed, built alike by the server and every client. Without an
    adapter every weight trains and travels (full fine-tuning; tied input and output
    embeddings once). ``base_quant`` stores the frozen base's linear layers as int8 or int4
    (:class:`fedsim.quant.weight_only.WeightOnlyLinear`; the output embedding stays float).

    Parameters
    ----------
    input_shape : tuple[int]
        ``(seq_len + 1,)``.
    num_classes : int
        The tokenizer's vocabulary; the model's must match it.
    config : mapping or None
        A transformers config (``model_type``, default llama, and its fields); the weights are
        drawn from torch's generator as seeded by the caller.
    path : str or None
        A local transformers model directory instead (config and weights).
    adapter : mapping or None
        ``{kind: none | lora, r, alpha, dropout, target_modules}``; None: full fine-tuning.
    base_quant : {"none", "int8", "int4"}, default "none"
        Weight-only storage of the frozen base (needs an adapter).
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, config: Mapping[str, Any] | None = None,
                 path: str | None = None, adapter: Mapping[str, Any] | None = None, base_quant: str = "none") -> None:
        super().__init__()
        if len(input_shape) != 1 or input_shape[0] < 2:
            raise ValueError(f"causal_lm: input_shape {tuple(input_shape)} is not a block of token ids (seq_len + 1,)")
        with quiet_torchao_import():
            from transformers import AutoModelForCausalLM

        settings = transformers_config(config, path, num_classes)
        if settings.vocab_size != num_classes:
            raise ValueError(f"causal_lm: the model's vocabulary has {settings.vocab_size} tokens, the tokenizer's "
                             f"{num_classes}")
        with quiet_torchao_import():  # building a model imports torchao
            if path is not None:
                model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
            else:
                model = AutoModelForCausalLM.from_config(settings)
        adapter = dict(adapter or {"kind": "none"})
        self.lora_dropout = 0.0
        if adapter["kind"] == "lora":
            with quiet_torchao_import():
                from peft import LoraConfig, get_peft_model
            self.lora_dropout = float(adapter["dropout"])
            model = get_peft_model(model, LoraConfig(r=adapter["r"], lora_alpha=adapter["alpha"],
                                                     lora_dropout=self.lora_dropout,
                                                     target_modules=list(adapter["target_modules"])))
        elif base_quant != "none":
            raise ValueError(f"causal_lm: base_quant {base_quant!r} stores a frozen base; without an adapter "
                             "every weight trains")
        self.lm = model
        causal = model.get_base_model() if adapter["kind"] == "lora" else model
        # a list, so that they are not registered again under a second name
        self._decoder_and_head = [causal.get_decoder(), causal.get_output_embeddings()]
        if base_quant != "none":
            head = next(name for name, module in self.named_modules() if module is self.head)
            quantize_frozen_linears(self, base_quant, skip=(head,))
        self.embedding_dim = settings.hidden_size
        self.federated = self._trained_entries()

    @property
    def head(self) -> nn.Linear:
        """The output embedding: logits ``h W^T``."""
        return self._decoder_and_head[1]

    @property
    def draws_dropout(self) -> bool:
        """Whether training draws dropout masks (from torch's global generator)."""
        return self.lora_dropout > 0

    def _trained_entries(self) -> tuple[str, ...]:
        """The names of ``state_dict`` entries that train, each shared tensor once."""
        trained = {id(p) for p in self.parameters() if p.requires_grad}
        entries, seen = [], set()
        for name, value in super().state_dict(keep_vars=True).items():
            if id(value) in trained and id(value) not in seen:
                seen.add(id(value))
                entries.append(name)
        return tuple(entries)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """The trained entries only (the adapter's, or every weight without one)."""
        state = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", "")
        for name in [n for n in state if n.removeprefix(prefix) not in self.federated]:
            del state[name]
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """Load the trained entries; ``strict`` asks for exactly those."""
        missing = sorted(set(self.federated) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(self.federated))
        if strict and (missing or unexpected):
            raise RuntimeError(f"causal_lm: state dict missing {missing[:3]}, unexpected {unexpected[:3]}")
        result = super().load_state_dict({k: v for k, v in state_dict.items() if k in self.federated},
                                         strict=False, assign=assign)
        return type(result)(missing, unexpected)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The last hidden state at every position of ``x[:, :-1]``, ``(B * seq_len, hidden)``."""
        hidden = self._decoder_and_head[0](input_ids=x[:, :-1], use_cache=False).last_hidden_state
        return hidden.reshape(-1, hidden.shape[-1])

    def targets(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The next token of every position, ``x[:, 1:]`` flattened."""
        return x[:, 1:].reshape(-1)

"""LEAF's Shakespeare model: a character embedding, two stacked LSTM layers, a linear head."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fedsim.models.classifier import EmbeddingClassifier


class CharLSTM(EmbeddingClassifier):
    """Next-character model of LEAF (Caldas et al., "LEAF: A Benchmark for Federated
    Settings", arXiv 1812.01097; TalwalkarLab/leaf ``models/shakespeare/stacked_lstm.py``):
    an 8-dimensional embedding of each character, two LSTM layers of 256 units, and a
    linear layer from the last step's output to the vocabulary. The embedding is that last
    output.

    The LSTM is written out step by step from matrix products rather than ``nn.LSTM``:
    ``torch.func.vmap`` has no batching rule for ``aten::lstm``, and the batched backend
    trains a round's clients as one stacked model under ``vmap``. The parameters keep
    ``nn.LSTM``'s names, shapes and gate order (input, forget, cell, output). As TensorFlow's
    ``BasicLSTMCell``, which LEAF uses, 1 is added to the forget gate's pre-activation.

    Parameters
    ----------
    input_shape : tuple[int, ...]
        ``(seq_len,)``: windows of character indices (LEAF's 80).
    num_classes : int
        Size of the vocabulary (LEAF's 80), which the embedding and the head share.
    embedding_dim : int, default 8
        Width of the character embedding.
    hidden_size : int, default 256
        Units of each LSTM layer.
    num_layers : int, default 2
        Stacked LSTM layers.
    """

    forget_bias = 1.0

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, embedding_dim: int = 8,
                 hidden_size: int = 256, num_layers: int = 2) -> None:
        super().__init__()
        if len(input_shape) != 1:
            raise ValueError(f"char_lstm: input_shape {tuple(input_shape)} is not a window of characters (seq_len,)")
        if min(embedding_dim, hidden_size, num_layers) < 1:
            raise ValueError(f"char_lstm: embedding_dim {embedding_dim}, hidden_size {hidden_size} and num_layers "
                             f"{num_layers} must be >= 1")
        self.hidden_size, self.num_layers = hidden_size, num_layers
        self.embedding = nn.Embedding(num_classes, embedding_dim)
        bound = 1.0 / math.sqrt(hidden_size)  # nn.LSTM's initialisation
        for layer in range(num_layers):
            width_in = embedding_dim if layer == 0 else hidden_size
            for name, shape in ((f"weight_ih_l{layer}", (4 * hidden_size, width_in)),
                                (f"weight_hh_l{layer}", (4 * hidden_size, hidden_size)),
                                (f"bias_ih_l{layer}", (4 * hidden_size,)),
                                (f"bias_hh_l{layer}", (4 * hidden_size,))):
                self.register_parameter(name, nn.Parameter(torch.empty(shape).uniform_(-bound, bound)))
        self._set_head(hidden_size, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The top LSTM layer's output after the last character, ``(B, hidden_size)``."""
        sequence = self.embedding(x)
        for layer in range(self.num_layers):
            sequence = self._layer(sequence, layer)
        return sequence[:, -1]

    def _layer(self, sequence: torch.Tensor, layer: int) -> torch.Tensor:
        w_ih, w_hh = getattr(self, f"weight_ih_l{layer}"), getattr(self, f"weight_hh_l{layer}")
        inputs = F.linear(sequence, w_ih, getattr(self, f"bias_ih_l{layer}") + getattr(self, f"bias_hh_l{layer}"))
        h = c = inputs.new_zeros(inputs.shape[0], self.hidden_size)
        outputs = []
        for t in range(inputs.shape[1]):
            i, f, g, o = (inputs[:, t] + F.linear(h, w_hh)).chunk(4, dim=-1)
            c = torch.sigmoid(f + self.forget_bias) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            outputs.append(h)
        return torch.stack(outputs, dim=1)

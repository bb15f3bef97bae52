"""``build_model``: every model fedsim knows, by name."""

from __future__ import annotations

import inspect
from typing import Any

from fedsim.models.causal_lm import CausalLM
from fedsim.models.char_lstm import CharLSTM
from fedsim.models.classifier import EmbeddingClassifier
from fedsim.models.cnn import CNN
from fedsim.models.lenet5 import LeNet5
from fedsim.models.mlp import MLP
from fedsim.models.resnet8 import ResNet8

_MODEL_CLASSES: dict[str, type[EmbeddingClassifier]] = {
    "mlp": MLP,
    "cnn": CNN,
    "lenet5": LeNet5,
    "resnet8": ResNet8,
    "char_lstm": CharLSTM,
    "causal_lm": CausalLM,
}
MODELS = tuple(_MODEL_CLASSES)


def build_model(
    name: str, input_shape: tuple[int, ...], num_classes: int, **kwargs: Any
) -> EmbeddingClassifier:
    """Build a freshly initialised model.

    Parameters
    ----------
    name : str
        One of ``MODELS``: ``"mlp"`` (any input), ``"cnn"`` (images from 4x4),
        ``"lenet5"`` (images up to 32x32), ``"resnet8"`` (any image), ``"char_lstm"``
        (windows of character indices) or ``"causal_lm"`` (blocks of token ids).
    input_shape : tuple[int, ...]
        Shape of one sample, ``(C, H, W)`` for images, ``(seq_len,)`` for characters.
    num_classes : int
        Number of classes.
    **kwargs
        Model options: mlp takes ``hidden``, ``norm``; cnn takes ``channels``,
        ``embedding_dim``; resnet8 takes ``width``; char_lstm takes ``embedding_dim``,
        ``hidden_size``, ``num_layers``; causal_lm takes ``config``, ``path``, ``adapter``,
        ``base_quant``; lenet5 takes none.

    Returns
    -------
    EmbeddingClassifier
        The model, with ``features``, ``head`` and ``embedding_dim``.
    """
    if name not in _MODEL_CLASSES:
        raise ValueError(f"'{name}' is not a model; known: {', '.join(MODELS)}")
    model_class = _MODEL_CLASSES[name]
    options = [
        parameter
        for parameter in inspect.signature(model_class).parameters
        if parameter not in ("input_shape", "num_classes")
    ]
    for key in kwargs:
        if key not in options:
            raise ValueError(
                f"'{key}' is not an option of model {name}; known: {', '.join(options) or 'none'}"
            )
    return model_class(tuple(input_shape), num_classes, **kwargs)

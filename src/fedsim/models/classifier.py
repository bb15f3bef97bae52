"""The contract every fedsim model keeps: an embedding followed by a linear head."""

from __future__ import annotations

import torch
from torch import nn


class EmbeddingClassifier(nn.Module):
    """Base of the model zoo: ``forward(x) = head(features(x))``.

    Subclasses build their feature extractor and call ``super().__init__`` first,
    then ``_set_head(embedding_dim, num_classes)``. Algorithms that work on
    representations (prototype or contrastive losses, head-only personalisation)
    use ``features`` and ``head`` directly.

    Attributes
    ----------
    embedding_dim : int
        Size of the embedding returned by ``features``.
    head : nn.Linear
        Map from the embedding to the class logits.
    """

    embedding_dim: int
    head: nn.Linear

    def _set_head(self, embedding_dim: int, num_classes: int) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1; got {num_classes}")
        self.embedding_dim = embedding_dim
        self.head = nn.Linear(embedding_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Return the embedding, shape ``(B, embedding_dim)``."""
        raise NotImplementedError

    def targets(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The label of each row of ``features(x)``: ``y``, one per sample (a causal language
        model predicts every position of a sample, :class:`fedsim.models.causal_lm.CausalLM`)."""
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the class logits, shape ``(B, num_classes)``."""
        return self.head(self.features(x))


def image_shape(model: str, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """Check that ``input_shape`` is ``(C, H, W)`` and return it."""
    if len(input_shape) != 3:
        raise ValueError(
            f"{model}: input_shape {tuple(input_shape)} is not an image shape (C, H, W)"
        )
    channels, height, width = (int(d) for d in input_shape)
    return channels, height, width

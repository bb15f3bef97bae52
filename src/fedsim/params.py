"""A model's floating-point state as one flat vector, and back.

Aggregators work on an (N, D) matrix of client updates; Flower carries named arrays.
:class:`ParamSpec` is the one mapping between the two: the names, shapes and sizes of
the floating-point entries of a ``state_dict`` (parameters and float buffers such as
BatchNorm running statistics). Integer buffers (``num_batches_tracked``) are not
averaged; they stay as the server model has them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class ParamSpec:
    """Names, shapes and offsets of the float tensors in a model's state_dict."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    buffers: frozenset[str] = frozenset()  # the names that are buffers (BatchNorm statistics), not parameters

    @classmethod
    def of(cls, model: nn.Module) -> ParamSpec:
        state = model.state_dict()
        names = tuple(k for k, v in state.items() if v.is_floating_point())
        parameters = {name for name, _ in model.named_parameters()}
        return cls(names, tuple(tuple(state[k].shape) for k in names), frozenset(set(names) - parameters))

    def parameter_mask(self) -> torch.Tensor:
        """A bool ``(dim,)`` vector: True on the entries of parameters, False on buffers."""
        return torch.cat([torch.full((size,), name not in self.buffers) for name, size in
                          zip(self.names, self.sizes, strict=True)])

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(int(np.prod(s)) for s in self.shapes)

    @property
    def dim(self) -> int:
        return sum(self.sizes)

    def flatten(self, state: dict[str, torch.Tensor | np.ndarray]) -> torch.Tensor:
        """Concatenate the float entries of ``state`` (in spec order) into a float32 vector."""
        parts = []
        for name, shape in zip(self.names, self.shapes, strict=True):
            value = torch.as_tensor(state[name])
            if tuple(value.shape) != shape:
                raise ValueError(f"{name}: shape {tuple(value.shape)}, expected {shape}")
            parts.append(value.detach().reshape(-1).to(torch.float32))
        return torch.cat(parts) if parts else torch.zeros(0)

    def flatten_rows(self, stacked: dict[str, torch.Tensor]) -> torch.Tensor:
        """:meth:`flatten` of every row of ``stacked`` (each entry ``(N, *shape)``) at once: ``(N, D)``."""
        rows = next(iter(stacked.values())).shape[0]
        parts = []
        for name, shape in zip(self.names, self.shapes, strict=True):
            value = stacked[name]
            if tuple(value.shape[1:]) != shape:
                raise ValueError(f"{name}: rows of shape {tuple(value.shape[1:])}, expected {shape}")
            parts.append(value.detach().reshape(rows, -1).to(torch.float32))
        return torch.cat(parts, dim=1) if parts else torch.zeros(rows, 0)

    def unflatten(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a flat vector back into named tensors of the spec's shapes."""
        if vector.numel() != self.dim:
            raise ValueError(f"vector has {vector.numel()} values, the model has {self.dim}")
        chunks = torch.split(vector, self.sizes)
        return {n: c.reshape(s) for n, c, s in zip(self.names, chunks, self.shapes, strict=True)}

    def split_layers(self, matrix: torch.Tensor) -> list[torch.Tensor]:
        """Split an (N, D) matrix of flat updates into per-tensor (N, *shape) blocks."""
        chunks = torch.split(matrix, self.sizes, dim=1)
        return [c.reshape(matrix.shape[0], *s) for c, s in zip(chunks, self.shapes, strict=True)]

    def join_layers(self, layers: list[torch.Tensor]) -> torch.Tensor:
        """Inverse of :meth:`split_layers` for one aggregated update: list of tensors -> (D,)."""
        return torch.cat([t.reshape(-1) for t in layers])


def get_flat(model: nn.Module, spec: ParamSpec) -> torch.Tensor:
    """The model's float state as a flat float32 vector."""
    return spec.flatten(model.state_dict())


def set_flat(model: nn.Module, spec: ParamSpec, vector: torch.Tensor) -> None:
    """Load a flat vector into the model's float state (integer buffers untouched)."""
    state = model.state_dict()
    for name, value in spec.unflatten(vector).items():
        state[name].copy_(value.to(state[name].dtype))

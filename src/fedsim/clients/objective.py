"""What a client minimises: the configured loss, its auxiliary term, and the hooks.

The loss library's contract (see ``fedsim.losses``): every loss names the inputs its
``forward`` takes in ``inputs``, from ``logits``, ``targets``, ``embeddings``,
``embeddings2``, ``indices`` and ``classifier``. The objective computes only what the
losses ask for and passes exactly that. When the main loss trains embeddings only
(``task == "embedding"``), the classifier head is fitted at the same time with cross
entropy on the *detached* features, a linear probe, so the model still predicts classes
and federated accuracy stays meaningful.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedsim.clients.hooks import ClientHook


def second_view(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A second augmented view for contrastive losses: Gaussian noise (std 0.1) and
    random masking of 10% of the input values. Generic, so it works on any input shape."""
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    keep = (torch.rand(x.shape, generator=generator) >= 0.1).to(device=x.device, dtype=x.dtype)
    return (x + 0.1 * noise) * keep


class ClientObjective:
    """The training objective of one client: main loss + weight * aux + hook terms."""

    def __init__(
        self,
        main: nn.Module,
        aux: nn.Module | None = None,
        aux_weight: float = 0.0,
        hooks: tuple[ClientHook, ...] = (),
    ) -> None:
        self.main = main
        self.aux = aux
        self.aux_weight = aux_weight
        self.hooks = hooks
        self.needs = set(main.inputs) | (set(aux.inputs) if aux is not None else set())
        self.probe_head = getattr(main, "task", "classification") == "embedding"

    def __call__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        targets: torch.Tensor,
        indices: torch.Tensor,
        generator: torch.Generator,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (loss, logits) for one batch."""
        embeddings = model.features(x)
        logits = model.head(embeddings)
        available = {"logits": logits, "targets": targets, "embeddings": embeddings, "indices": indices}
        if "classifier" in self.needs:
            available["classifier"] = model.head.weight
        if "embeddings2" in self.needs:
            available["embeddings2"] = model.features(second_view(x, generator))
        loss = self.main(**{k: available[k] for k in self.main.inputs})
        if self.aux is not None and self.aux_weight:
            loss = loss + self.aux_weight * self.aux(**{k: available[k] for k in self.aux.inputs})
        if self.probe_head:
            loss = loss + F.cross_entropy(model.head(embeddings.detach()), targets)
        for hook in self.hooks:
            term = hook.extra_loss(model, logits)
            if term is not None:
                loss = loss + term
        return loss, logits

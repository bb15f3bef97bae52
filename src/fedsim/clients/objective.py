"""What a client minimises: the configured loss, its auxiliary term, and the hooks.

The loss library's contract (see ``fedsim.losses``): every loss names the inputs its
``forward`` takes in ``inputs``, from ``logits``, ``targets``, ``embeddings``,
``embeddings2``, ``indices`` and ``classifier``. The objective computes only what the
losses ask for and passes exactly that. When the main loss trains embeddings only
(``task == "embedding"``), the classifier head is fitted at the same time with cross
entropy on the *detached* features, a linear probe, so the model still predicts classes
and federated accuracy stays meaningful.

``classifier`` is the head as the loss's decision rule reads it. A loss with a rule of its own
(``predict``: HarmonicLoss, nearest class centre) gets the head's weight, whose rows are the
class centres; the bias plays no part in its training or its predictions. A loss without one
(LinearCrossEntropy) is evaluated like any classifier, by the argmax of the model's logits
``e W^T + b``, so it gets the whole affine head as one matrix ``[W | b]`` against the features
extended by a constant 1: ``[e, 1] [W | b]^T = e W^T + b``. It then trains exactly the logits
that are evaluated, bias included, with the head of the model zoo as it is.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from fedsim.clients.hooks import ClientHook, extra_term


def second_view(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A second augmented view for contrastive losses: Gaussian noise (std 0.1) and
    random masking of 10% of the input values. Generic, so it works on any input shape."""
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    keep = (torch.rand(x.shape, generator=generator) >= 0.1).to(device=x.device, dtype=x.dtype)
    return (x + 0.1 * noise) * keep


def with_bias_column(embeddings: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``([e, 1], [W | b])``: the affine head ``e W^T + b`` as one bias-free linear map."""
    ones = torch.ones(*embeddings.shape[:-1], 1, dtype=embeddings.dtype, device=embeddings.device)
    return torch.cat([embeddings, ones], dim=-1), torch.cat([weight, bias[:, None]], dim=1)


def chunked_argmax(embeddings: torch.Tensor, classifier: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """``argmax_k e W_k^T`` of every row, over chunks of ``chunk`` classes (one ``(rows, chunk)``
    block held at a time, as Cut Cross-Entropy holds its logits); ties go to the lower class."""
    best = torch.full((embeddings.shape[0],), float("-inf"), dtype=embeddings.dtype, device=embeddings.device)
    index = torch.zeros(embeddings.shape[0], dtype=torch.int64, device=embeddings.device)
    for start in range(0, classifier.shape[0], chunk):
        values, columns = (embeddings @ classifier[start : start + chunk].T).max(dim=1)
        better = values > best
        best, index = torch.where(better, values, best), torch.where(better, columns + start, index)
    return index


@contextlib.contextmanager
def dropout_from(generator: torch.Generator, draws: bool) -> Iterator[None]:
    """While the block runs, torch's global generator (which dropout layers draw from) is seeded
    from ``generator`` when ``draws``, and restored after; so a model with dropout trains the
    same from the same client generator (a resumed run as an uninterrupted one)."""
    if not draws:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
        yield


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
        # a classifier loss judged by argmax of the model's logits must see the bias too
        self.affine_classifier = "classifier" in main.inputs and not hasattr(main, "predict")
        # Cut Cross-Entropy alone never forms the (rows, classes) logits; a hook may read them
        self.forms_logits = "logits" in self.needs or bool(hooks)

    def __call__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        targets: torch.Tensor,
        indices: torch.Tensor,
        generator: torch.Generator,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (loss, predictions) for one batch: the loss, and the class each row of
        ``model.features(x)`` is predicted to be (the rows' labels are ``model.targets(x, targets)``)."""
        with dropout_from(generator, getattr(model, "draws_dropout", False)):
            embeddings = model.features(x)
        targets = model.targets(x, targets)
        logits = model.head(embeddings) if self.forms_logits else None
        embeddings2 = model.features(second_view(x, generator)) if "embeddings2" in self.needs else None
        loss = self.loss_terms(embeddings, logits, targets, model.head.weight, model.head.bias, indices, embeddings2)
        if self.probe_head:
            loss = loss + F.cross_entropy(model.head(embeddings.detach()), targets)
        for hook in self.hooks:
            term = extra_term(hook, model, logits, embeddings)
            if term is not None:
                loss = loss + term
        with torch.no_grad():
            if logits is None and model.head.bias is not None:
                logits = model.head(embeddings)
            predictions = chunked_argmax(embeddings, model.head.weight) if logits is None else logits.argmax(1)
        return loss, predictions

    def loss_terms(
        self,
        embeddings: torch.Tensor,
        logits: torch.Tensor,
        targets: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        indices: torch.Tensor | None = None,
        embeddings2: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``main + aux_weight * aux`` of one batch, given the model's outputs and its head
        (``weight``, ``bias``). Each term is reduced as its loss was built: the batch mean,
        or per sample where :mod:`fedsim.clients.batched` builds them so to mask padding."""
        available = {"logits": logits, "targets": targets, "embeddings": embeddings, "indices": indices,
                     "classifier": weight, "embeddings2": embeddings2}
        main_inputs = {k: available[k] for k in self.main.inputs}
        if self.affine_classifier and bias is not None:
            main_inputs["embeddings"], main_inputs["classifier"] = with_bias_column(embeddings, weight, bias)
        loss = self.main(**main_inputs)
        if self.aux is not None and self.aux_weight:
            loss = loss + self.aux_weight * self.aux(**{k: available[k] for k in self.aux.inputs})
        return loss

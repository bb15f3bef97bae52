"""linear_cross_entropy equals F.cross_entropy(e @ c.T) in value and gradient, without the (N, C) logits."""

import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from fedsim.losses import LinearCrossEntropy, linear_cross_entropy

TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-10, atol=1e-12)}


def _reference(e, c, targets, ignore_index, softcap, reduction):
    logits = e @ c.T
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction=reduction)


def _inputs(dtype, num_rows=37, num_classes=53, dim=11, with_ignored=False, seed=0):
    generator = torch.Generator().manual_seed(seed)
    e = torch.randn(num_rows, dim, generator=generator, dtype=dtype).requires_grad_()
    c = torch.randn(num_classes, dim, generator=generator, dtype=dtype).requires_grad_()
    targets = torch.randint(0, num_classes, (num_rows,), generator=generator)
    if with_ignored:
        targets[::4] = -100
    return e, c, targets


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("softcap", [None, 4.0])
@pytest.mark.parametrize("with_ignored", [False, True])
def test_linear_ce_matches_full_cross_entropy_value_and_gradients(dtype, reduction, softcap, with_ignored):
    e, c, targets = _inputs(dtype, with_ignored=with_ignored)
    ours = linear_cross_entropy(e, c, targets, softcap=softcap, reduction=reduction, chunk_size=16)
    reference = _reference(e, c, targets, -100, softcap, reduction)
    torch.testing.assert_close(ours, reference, **TOLERANCE[dtype])
    upstream = torch.randn(ours.shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(ours, (e, c), upstream)
    reference_grads = torch.autograd.grad(reference, (e, c), upstream)
    for got, expected in zip(grads, reference_grads, strict=True):
        torch.testing.assert_close(got, expected, **TOLERANCE[dtype])


def test_linear_ce_honours_a_custom_ignore_index():
    e, c, targets = _inputs(torch.float64)
    targets[:5] = 7
    ours = linear_cross_entropy(e, c, targets, ignore_index=7, chunk_size=10)
    torch.testing.assert_close(ours, _reference(e, c, targets, 7, None, "mean"))


@pytest.mark.parametrize("chunk_size", [1, 7, 53, 4096])
def test_linear_ce_does_not_depend_on_chunk_size(chunk_size):
    e, c, targets = _inputs(torch.float64)
    torch.testing.assert_close(
        linear_cross_entropy(e, c, targets, chunk_size=chunk_size), _reference(e, c, targets, -100, None, "mean")
    )


def test_linear_ce_keeps_leading_dimensions_for_reduction_none():
    e, c, targets = _inputs(torch.float64, num_rows=24)
    ours = linear_cross_entropy(e.reshape(4, 6, -1), c, targets.reshape(4, 6), reduction="none", chunk_size=8)
    assert ours.shape == (4, 6)
    torch.testing.assert_close(ours.reshape(-1), _reference(e, c, targets, -100, None, "none"))


@pytest.mark.parametrize("softcap", [None, 2.0])
def test_linear_ce_gradcheck_float64(softcap):
    e, c, targets = _inputs(torch.float64, num_rows=6, num_classes=9, dim=4, with_ignored=True)
    assert torch.autograd.gradcheck(
        lambda e_, c_: linear_cross_entropy(e_, c_, targets, softcap=softcap, chunk_size=4), (e, c)
    )


class _LiveBytes(TorchDispatchMode):
    """Tracks the peak bytes of storages that operators created and that are still referenced.

    Storages of the given inputs (and views of them) are not counted: what is measured is the
    extra memory of the pass, including the gradients it produces.
    """

    def __init__(self, inputs):
        super().__init__()
        self.excluded = {tensor.untyped_storage().data_ptr() for tensor in inputs}
        self.live: dict[int, tuple[int, list]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() not in self.excluded:
                storage = tensor.untyped_storage()
                nbytes, refs = self.live.get(storage.data_ptr(), (storage.nbytes(), []))
                if not any(ref() is not None for ref in refs):
                    nbytes, refs = storage.nbytes(), []
                refs.append(weakref.ref(tensor))
                self.live[storage.data_ptr()] = (nbytes, refs)
        current = sum(nbytes for nbytes, refs in self.live.values() if any(ref() is not None for ref in refs))
        self.peak = max(self.peak, current)
        return out


@pytest.mark.parametrize("softcap, chunks_alive", [(None, 1), (5.0, 2)])
def test_linear_ce_holds_one_chunk_of_logits_at_a_time(softcap, chunks_alive):
    num_rows, num_classes, dim, chunk = 64, 2000, 8, 100
    e, c, targets = _inputs(torch.float32, num_rows=num_rows, num_classes=num_classes, dim=dim)
    with _LiveBytes([e, c, targets]) as forward:
        loss = linear_cross_entropy(e, c, targets, softcap=softcap, chunk_size=chunk)
    with _LiveBytes([e, c, targets]) as backward:
        loss.backward()
    chunk_bytes, gradient_bytes, row_vectors = num_rows * chunk * 4, (num_rows + num_classes) * dim * 4, 64 * num_rows
    assert forward.peak <= chunks_alive * chunk_bytes + row_vectors
    assert backward.peak <= gradient_bytes + chunks_alive * chunk_bytes + row_vectors
    assert backward.peak < num_rows * num_classes * 4 / 4


def test_linear_ce_module_passes_its_settings():
    e, c, targets = _inputs(torch.float64, with_ignored=True)
    module = LinearCrossEntropy(softcap=3.0, reduction="sum", chunk_size=5)
    assert module.inputs == ("embeddings", "classifier", "targets")
    torch.testing.assert_close(module(e, c, targets), _reference(e, c, targets, -100, 3.0, "sum"))


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(targets=torch.full((37,), 53)), "targets must lie in"),
        (dict(reduction="avg"), "not a reduction"),
        (dict(softcap=0.0), "softcap must be > 0"),
        (dict(chunk_size=0), "chunk_size must be a positive int"),
        (dict(c=torch.randn(53, 5)), "same d"),
        (dict(targets=torch.zeros(37, dtype=torch.int32)), "targets must be int64"),
    ],
)
def test_linear_ce_rejects_bad_arguments(change, message):
    e, c, targets = _inputs(torch.float32)
    arguments = dict(e=e, c=c, targets=targets) | change
    with pytest.raises(ValueError, match=message):
        linear_cross_entropy(**arguments)

"""fedsim.quant.codecs: error bounds, exact byte counts, unbiasedness, array round trips."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from fedsim.quant import codecs

ALL = [
    ("identity", {}),
    ("float16", {}),
    ("qsgd", {"bits": 8}),
    ("qsgd", {"bits": 4, "block_size": 64}),
    ("qsgd", {"bits": 2}),
    ("topk", {"fraction": 0.05}),
    ("randk", {"k": 30}),
    ("randk", {"fraction": 0.1, "unbiased": True}),
    ("sign", {}),
]
IDS = [f"{name}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for name, kw in ALL]


def update(d: int = 1000, seed: int = 0) -> torch.Tensor:
    return torch.randn(d, generator=torch.Generator().manual_seed(seed)) * torch.linspace(0.1, 3.0, d)


def test_identity_and_float16_errors():
    x = update()
    assert torch.equal(codecs.build("identity").decode(codecs.build("identity").encode(x)), x)
    half = codecs.build("float16")
    assert torch.all((half.decode(half.encode(x)) - x).abs() <= 2**-11 * x.abs() + 2**-25)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_qsgd_error_is_below_one_level_of_its_block(bits):
    codec = codecs.build("qsgd", bits=bits, block_size=100)
    x = update(1001)
    error = (codec.decode(codec.encode(x)) - x).abs()
    block_max = torch.nn.functional.pad(x.abs(), (0, 99)).view(-1, 100).amax(1).repeat_interleave(100)[:1001]
    assert torch.all(error <= block_max / codec.levels * (1 + 1e-5))


def test_topk_keeps_the_largest_values_exactly_and_contracts():
    codec = codecs.build("topk", fraction=0.05)
    x = update()
    decoded = codec.decode(codec.encode(x))
    kept = decoded != 0
    assert kept.sum() == 50
    assert torch.equal(decoded[kept], x[kept])
    assert x[~kept].abs().max() <= x[kept].abs().min()
    assert (decoded - x).square().sum() <= (1 - 50 / 1000) * x.square().sum()


def test_randk_is_contractive_unscaled_and_unbiased_scaled():
    x = update(50)
    plain = codecs.build("randk", k=5)
    decoded = plain.decode(plain.encode(x))
    kept = decoded != 0
    assert kept.sum() == 5 and torch.equal(decoded[kept], x[kept])
    scaled = codecs.build("randk", k=5, unbiased=True)
    generator = torch.Generator().manual_seed(0)
    mean = torch.stack([scaled.decode(scaled.encode(x, generator=generator)) for _ in range(4000)]).mean(0)
    # E||mean - x||^2 = (d/k - 1) ||x||^2 / 4000, i.e. a relative error of about 0.05
    assert (mean - x).norm() < 0.15 * x.norm()


def test_sign_error_is_the_stated_identity():
    codec = codecs.build("sign")
    x = update(1001)
    decoded = codec.decode(codec.encode(x))
    assert torch.allclose(decoded.abs(), x.abs().mean().expand(1001))
    assert torch.equal(decoded > 0, x >= 0)
    expected = x.square().sum() - x.abs().sum() ** 2 / x.numel()
    assert torch.allclose((decoded - x).square().sum(), expected, rtol=1e-4)


def test_qsgd_is_unbiased():
    codec = codecs.build("qsgd", bits=4, block_size=64)
    x = update(300)
    generator = torch.Generator().manual_seed(0)
    mean = torch.stack([codec.decode(codec.encode(x, generator=generator)) for _ in range(2000)]).mean(0)
    step = x.abs().max() / codec.levels
    assert torch.all((mean - x).abs() < 0.06 * step)  # ~5 standard errors of a 2000-draw mean


@pytest.mark.parametrize(
    ("name", "kw", "shape", "expected"),
    [
        ("identity", {}, (1000,), 4000 + 6),
        ("float16", {}, (1000,), 2000 + 6),
        ("topk", {"fraction": 0.01}, (1000,), 10 * (2 + 4) + 6),  # uint16 indices: d <= 65536
        ("topk", {"k": 7}, (10, 20), 7 * (2 + 4) + 2 + 2 * 4),
        ("topk", {"k": 3}, (70_000,), 3 * (4 + 4) + 6),  # uint32 indices beyond 65536 values
        ("qsgd", {"bits": 4, "block_size": 256}, (1001,), 501 + 4 * 4 + 6),
        ("qsgd", {"bits": 8, "block_size": 100}, (1001,), 1001 + 4 * 11 + 6),
        ("qsgd", {"bits": 2, "block_size": 256}, (1001,), 251 + 4 * 4 + 6),
        ("randk", {"fraction": 0.01}, (1000,), 8 + 10 * 4 + 6),
        ("sign", {}, (1000,), 125 + 4 + 6),
        ("sign", {}, (1001,), 126 + 4 + 6),
    ],
)
def test_nbytes_equals_the_hand_computed_size(name, kw, shape, expected):
    codec = codecs.build(name, **kw)
    payload = codec.encode(torch.randn(shape))
    assert payload.nbytes == expected
    assert codec.payload_nbytes(shape) == expected


@pytest.mark.parametrize(("name", "kw"), ALL, ids=IDS)
def test_arrays_round_trip_through_a_flower_array_record(name, kw):
    codec = codecs.build(name, **kw)
    x = torch.randn(6, 50)
    payload = codec.encode(x, generator=torch.Generator().manual_seed(0))
    record = ArrayRecord(array_dict={k: Array(v) for k, v in payload.to_arrays().items()})
    received = codec.from_arrays({k: v.numpy() for k, v in record.items()})
    assert received.nbytes == payload.nbytes
    assert received.shape == (6, 50)
    assert torch.equal(codec.decode(received), codec.decode(payload))


@pytest.mark.parametrize(("name", "kw"), [c for c in ALL if codecs.build(c[0], **c[1]).stochastic])
def test_stochastic_codecs_are_reproducible_with_a_seeded_generator(name, kw):
    codec = codecs.build(name, **kw)
    x = update()
    first = codec.decode(codec.encode(x, generator=torch.Generator().manual_seed(7)))
    second = codec.decode(codec.encode(x, generator=torch.Generator().manual_seed(7)))
    assert torch.equal(first, second)


def test_from_arrays_rejects_a_malformed_payload():
    codec = codecs.build("topk", fraction=0.01)
    arrays = codec.encode(update()).to_arrays()
    with pytest.raises(ValueError, match=r"array 'values' has dtype float64 and 10 entries; expected float32 and 10"):
        codec.from_arrays({**arrays, "values": arrays["values"].astype(np.float64)})
    with pytest.raises(ValueError, match=r"expected \['indices', 'shape', 'values'\]"):
        codec.from_arrays({"shape": arrays["shape"], "values": arrays["values"]})
    with pytest.raises(ValueError, match=r"cannot decode a 'sign' payload"):
        codec.decode(codecs.build("sign").encode(update()))


def test_build_names_the_bad_codec_or_option():
    with pytest.raises(ValueError, match=r"'zip' is not a codec; known: identity, float16, qsgd, topk, randk, sign"):
        codecs.build("zip")
    with pytest.raises(ValueError, match=r"codec 'topk': unknown option\(s\) frac; allowed: fraction, k"):
        codecs.build("topk", frac=0.1)
    with pytest.raises(ValueError, match=r"qsgd.bits: 3 is not supported; allowed: 2, 4, 8"):
        codecs.build("qsgd", bits=3)
    with pytest.raises(ValueError, match=r"exactly one of fraction or k"):
        codecs.build("randk")
